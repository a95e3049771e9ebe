"""What the training loop does when a step goes wrong, so that hours of training are not lost.

Non-finite loss: a step whose loss or gradient norm is NaN or Inf makes no update (its gradients are
dropped); it is counted and logged. After train.max_bad_steps such steps in a row the weights themselves
are suspect, so the loop rolls back to the last good checkpoint and carries on past the offending batches
(PaLM's remedy for loss spikes). If that keeps happening the run stops with a message. With fp16 the
GradScaler already skips a step whose gradients overflowed and lowers its scale: that is routine and not
counted here; a non-finite loss is.

Compilation fails on the device (an old card, a driver, no Triton): the step runs eager from then on, its
memory re-planned by the resolver (resolver/replan.py), with one line saying why.

Out of memory: the micro-batch is halved and accumulation doubled (resolver/replan.py), and the same step is
tried again. The loader serves the same sequences in the same order in smaller pieces, so the global batch and
the loss curve stay the same (up to the order of summation).

Preemption: a signal ends the step, the checkpoint is written and the process exits for a requeue (StopFlag).
"""

from __future__ import annotations

import gc
import math
import os
import signal
import sys

import torch

from .errors import PufferfishError
from .model.moe import moe_layers

MAX_ROLLBACKS = 3  # rollbacks that do not get past the failing step before the run gives up


class DivergedError(PufferfishError):
    pass


def finite_on_device(loss: torch.Tensor, grad_norm: torch.Tensor, scaler_enabled: bool = False) -> torch.Tensor:
    """Should this step update? A bool tensor, left on the device (no sync). A non-finite loss is ours to
    skip; with fp16 an overflowed gradient is the GradScaler's business (scaler.step skips it by itself)."""
    finite = torch.isfinite(loss.float())
    return finite if scaler_enabled else finite & torch.isfinite(grad_norm.float())


def skip_on_device(optimizer) -> bool:
    """Can this optimizer skip a step from a device-side flag? Fused AdamW reads `found_inf` (the hook
    GradScaler uses) and then neither updates the weights nor counts the step. Otherwise the loop reads
    finite_on_device's answer on the host before stepping: one sync a step (Muon with AdamW, optim.name=muon,
    is never fused: the host decides)."""
    return bool(optimizer.defaults.get("fused"))


class PendingSteps:
    """Steps whose loss, gradient norm and finiteness are known on the device but not yet on the host.
    Reading them syncs the device, so the loop reads them at log intervals, before a checkpoint and at
    the end: one sync per read, not per step."""

    def __init__(self):
        self._items: list[tuple[int, torch.Tensor]] = []

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, ok: torch.Tensor) -> None:
        self._items.append((step, torch.stack([loss.detach().float(), grad_norm.detach().float(), ok.float()])))

    def __len__(self) -> int:
        return len(self._items)

    def read(self) -> list[tuple[int, float, float, bool]]:
        """(step, loss, grad norm, finite) of every pending step, oldest first; empties the list."""
        if not self._items:
            return []
        values = torch.stack([v for _, v in self._items]).tolist()
        steps = [s for s, _ in self._items]
        self._items = []
        return [(s, loss, norm, ok > 0.5) for s, (loss, norm, ok) in zip(steps, values)]


class StepLedger:
    """Steps on their way from the device to the host: their losses averaged for the train line, and the
    non-finite ones counted, logged and judged (NonFiniteGuard). A checkpoint keeps its counts."""

    def __init__(self, guard: NonFiniteGuard, log):
        self.guard, self.log, self.pending = guard, log, PendingSteps()
        self.loss_sum, self.window_steps = 0.0, 0  # finite step losses since the last train line, and how many
        self.skipped, self.grad_norm = 0, math.nan  # non-finite steps so far; the latest step's gradient norm

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, ok: torch.Tensor) -> None:
        self.pending.add(step, loss, grad_norm, ok)

    def settle(self) -> bool:
        """Read the pending steps: count, log and judge the non-finite ones. True: time to roll back."""
        for s, loss, norm, ok in self.pending.read():
            self.grad_norm = norm
            if ok:
                self.guard.good(s)
                self.loss_sum, self.window_steps = self.loss_sum + loss, self.window_steps + 1
                continue
            self.skipped += 1
            self.log.log({"kind": "skip", "step": s + 1, "reason": f"loss={loss} grad_norm={norm}",
                          "in_a_row": self.guard.in_a_row + 1, "skipped_steps": self.skipped})  # fmt: skip
            if self.guard.bad(s):  # raises DivergedError when rolling back keeps failing
                self.pending.read()  # the steps after the streak go with the rollback
                return True
        return False

    def window_loss(self) -> float:
        """The mean loss of the finite steps since the last call (NaN if none); starts a new window."""
        loss = self.loss_sum / self.window_steps if self.window_steps else math.nan
        self.loss_sum, self.window_steps = 0.0, 0
        return loss

    def state_dict(self) -> dict:
        return {"window": (self.loss_sum, self.window_steps), "skipped_steps": self.skipped}

    def load_state_dict(self, state: dict, rollback: bool = False) -> None:
        """From a checkpoint; a rollback keeps counting the skipped steps (they happened)."""
        self.loss_sum, self.window_steps = state.get("window", (0.0, 0))
        if not rollback:
            self.skipped = state.get("skipped_steps", 0)


def divergence_advice(lr: float, grad_clip: float, precision: str, ckpt_dir) -> str:
    fp16 = ", or optimizations.precision=bf16 (or fp32) instead of fp16" if precision == "fp16" else ""
    return (f"Lower optim.lr (now {lr:.2e}) or optim.grad_clip (now {grad_clip}){fp16}, and check the data; "
            f"the checkpoints in {ckpt_dir} are kept")  # fmt: skip


class NonFiniteGuard:
    """Counts non-finite steps in a row and says when to roll back; gives up after MAX_ROLLBACKS."""

    def __init__(self, max_bad_steps: int, advice: str):
        self.max_bad_steps, self.advice = max_bad_steps, advice
        self.in_a_row = 0  # bad steps since the last good one
        self.rollbacks = 0  # rollbacks since training last got past the step where it failed
        self.failed_at = -1

    def good(self, step: int) -> None:
        self.in_a_row = 0
        if step > self.failed_at:
            self.rollbacks = 0

    def bad(self, step: int) -> bool:
        """Count one skipped step; True when it is time to roll back."""
        self.in_a_row += 1
        if self.in_a_row < self.max_bad_steps:
            return False
        if self.rollbacks >= MAX_ROLLBACKS:
            raise DivergedError(
                f"training diverged: the loss or gradient norm was NaN or Inf for {self.max_bad_steps} steps in "
                f"a row (train.max_bad_steps) at step {step}, after {self.rollbacks} rollbacks to the last good "
                f"checkpoint that each skipped the batches in between. {self.advice}"
            )
        self.in_a_row = 0
        self.rollbacks += 1
        self.failed_at = max(self.failed_at, step)
        return True


def reset_moe_counts(model) -> None:
    """Forget the expert loads of a step that made no update (skipped, or retried after an OOM)."""
    for layer in moe_layers(model):
        layer.tokens_per_expert.zero_()


def is_out_of_memory(error: BaseException | None) -> bool:
    """A CUDA or CPU allocator out-of-memory, also when raised inside compiled code and wrapped by the
    compiler's own error (so the cause chain is followed)."""
    while error is not None:
        text = str(error).lower()
        if isinstance(error, torch.cuda.OutOfMemoryError) or (
            isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
        ):
            return True
        error = error.__cause__
    return False


def is_compile_failure(error: BaseException | None) -> bool:
    """An error raised by torch.compile's machinery (Dynamo, AOTAutograd, Inductor, Triton) rather than by the
    model's own code; the cause chain is followed, as compilers wrap what they catch."""
    while error is not None:
        module = type(error).__module__
        if module.startswith(("torch._dynamo", "torch._inductor", "torch._functorch", "triton")):
            return True
        error = error.__cause__ or getattr(error, "inner_exception", None)
    return False


def root_cause(error: BaseException) -> str:
    """The innermost cause's type and first line: a compiler's wrapper says only that its backend raised."""
    while (inner := error.__cause__ or getattr(error, "inner_exception", None)) is not None:  # Dynamo: inner_exception
        error = inner
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def free_memory(model, optimizer, device: str) -> None:
    """After an OOM (and after the exception, which holds the step's tensors, has been let go)."""
    optimizer.zero_grad(set_to_none=True)
    reset_moe_counts(model)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


class StopFlag:
    """A preemption notice asks the loop to checkpoint at the next step boundary and exit for a requeue.

    Slurm and Kubernetes send SIGTERM, many schedulers SIGUSR1, submitit SIGUSR2 (or the signal named by
    SUBMITIT_PREEMPT_SIGNAL). A Python handler that was there before (submitit's) is called once our
    checkpoint is written, so the launcher requeues the job its own way.
    """

    # submitit_local's controller restarts a task that exits with 144 (LOCAL_REQUEUE_RETURN_CODE in
    # submitit/local/local.py); on Slurm submitit requeues with `scontrol requeue` from its handler instead.
    REQUEUE_EXIT = 144

    def __init__(self):
        self.signal: int | None = None
        self._old = {}
        names = ["SIGTERM", "SIGUSR1", "SIGUSR2", "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]
        for sig in dict.fromkeys(getattr(signal, n) for n in [*names, "SIGINT"] if hasattr(signal, n)):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no preemption handling
                pass

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:  # Ctrl-C: save at the step boundary; a second one quits at once
            if self.signal == signal.SIGINT:
                raise KeyboardInterrupt
            print("\npufferfish: stopping at the end of this step to save a checkpoint (Ctrl-C again to quit now)",
                  file=sys.stderr, flush=True)  # fmt: skip
        self.signal = signum

    def __bool__(self) -> bool:
        return self.signal is not None

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def exit_for_requeue(self) -> None:
        """Called after the checkpoint is written: hand the signal on, then exit with REQUEUE_EXIT."""
        self.restore()
        name = signal.Signals(self.signal).name
        if self.signal == signal.SIGINT:  # a person stopped it: no launcher to hand over to
            print("pufferfish: interrupted: checkpoint saved; run the same command again to resume",
                  file=sys.stderr, flush=True)  # fmt: skip
            raise SystemExit(130)
        print(f"pufferfish: {name}: checkpoint saved; exiting with {self.REQUEUE_EXIT} so a launcher requeues "
              f"the job (run the same command again to resume)", file=sys.stderr, flush=True)  # fmt: skip
        previous = self._old.get(self.signal)
        if callable(previous):  # submitit's: it requeues the job its own way, then exits
            previous(self.signal, None)
        raise SystemExit(self.REQUEUE_EXIT)
