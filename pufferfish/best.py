"""The model a run hands over: the weights of its lowest validation loss, and when to stop looking.

A run evaluates every plan.eval_interval steps. Each evaluation that beats the best so far copies the
weights to the host (cheap next to writing them); they are written to checkpoints/best.pt with the next
regular checkpoint and at the end, so a crash loses no more than the step checkpoints do, and a resumed run
replays the same evaluations to the same best. With a time budget the run also stops early once its
validation loss has stayed above its best for plan.early_stop_evals evaluations in a row: more steps on
repeated data would only overfit (a healthy run's loss keeps setting new bests, or stays near one).
"""

from __future__ import annotations

import math
from pathlib import Path

from .checkpoint import BEST, load_checkpoint, save_best
from .sharding import load_full_weights

EARLY_SHARE = 0.2  # no early stop in the run's first fifth
PATIENCE_SHARE = 0.1  # the evaluations above the best must span at least a tenth of the run


class BestModel:
    def __init__(self, folder: Path, model_config: dict, stop_after: int = 0, rise: float = 0.01):
        self.folder, self.model_config = Path(folder), model_config
        self.stop_after, self.rise = stop_after, rise  # stop_after=0: never stop early
        self.loss, self.step, self.record = math.inf, 0, {}  # the best evaluation so far
        self.above = 0  # evaluations in a row at least `rise` above the best
        self.weights: dict | None = None  # the best weights, on the host, until written
        self.unsaved = False
        self.last_loss = math.inf  # the latest evaluation's

    def update(self, step: int, record: dict, snapshot) -> bool:
        """Take an evaluation (record["val_loss"] at `step`); snapshot() copies the weights when it is the
        best so far (a collective under FSDP2, so every rank calls update). True: it was the best."""
        loss = self.last_loss = record["val_loss"]
        if math.isfinite(loss) and loss < self.loss:
            self.loss, self.step, self.record, self.above = loss, step, dict(record, step=step), 0
            self.weights, self.unsaved = snapshot(), True
            return True
        if not math.isfinite(loss) or loss > self.loss * (1 + self.rise):
            self.above += 1
        else:
            self.above = 0  # near the best: a plateau, not a rise
        return False

    def stop(self, step: int, total_steps: int, epoch: float) -> bool:
        """Whether to end the run at `step` of `total_steps`, `epoch` passes into its data: `stop_after`
        evaluations in a row above the best, spanning at least a tenth of the run, not in its first fifth, and
        only once the data repeats. Within the first pass a rise is instability (a high learning rate, a
        router settling), not overfitting: more steps on fresh text still pay."""
        return (self.stop_after > 0 and self.above >= self.stop_after and epoch >= 1
                and step >= total_steps * EARLY_SHARE and step - self.step >= total_steps * PATIENCE_SHARE)

    def why_stop(self, step: int, elapsed_s: float, budget_s: float) -> str:
        unused = max(0.0, 1 - elapsed_s / budget_s)
        return (f"stopped early at step {step}: validation loss stayed over {self.rise:.0%} above its best "
                f"({self.loss:.4f} at step {self.step}) for {self.above} evaluations in a row; "
                f"{unused:.0%} of the {budget_s:,.0f} s budget left unused")  # fmt: skip

    def save(self, is_main: bool) -> None:
        """Write best.pt if a better evaluation came since the last write (rank 0 only)."""
        if self.unsaved and is_main and self.weights is not None:
            save_best(self.folder, self.weights, self.model_config, self.record)
        self.unsaved = False

    def state_dict(self) -> dict:
        return {"loss": self.loss, "step": self.step, "record": self.record, "above": self.above}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the counters from the checkpoint, the weights from best.pt (written with that checkpoint)."""
        self.loss, self.step = state["loss"], state["step"]
        self.record, self.above = state["record"], state["above"]
        path = self.folder / BEST
        if self.step and path.exists():
            self.weights = load_checkpoint(path)["model"]

    def hand_over(self, model, last_loss: float) -> bool:
        """Load the best weights into the model unless the last ones are as good. True: the best were loaded."""
        if self.step == 0 or last_loss <= self.loss:
            return False
        load_full_weights(model, self.weights or {})
        return True
