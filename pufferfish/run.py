"""Helpers of the training function: run directory, plan, evaluation, sample, preemption flag."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .checkpoint import atomic_write_text, checkpoint_files
from .errors import CheckpointError, ConfigError
from .loss import lm_loss
from .resolver import Plan, detect_hardware, make_plan
from .resolver.plan import corpus_mb_wanted

MIN_FREE_DISK = 256 * 1024**2
CHECKPOINT_BYTES_PER_PARAM = 12  # fp32 weights and AdamW's two fp32 moments; the rest is small
# one sampled token (a forward of one position, latency-bound) costs about as much as this many tokens of an
# evaluation's batched forward
SAMPLE_COST = 8
# a re-planned step takes at most this share of the budget: the run can still re-plan, and stop on time
MAX_STEP_SHARE = 0.02
# groups and keys that change the result: a run directory cannot be resumed with different ones
RESULT_KEYS = ("mode", "model", "attention", "moe", "data", "optim", "train.seed", "train.batch_tokens",
               "train.micro_batch", "train.max_steps")  # fmt: skip


def run_directory(cfg: DictConfig) -> Path:
    if cfg.run_dir:
        path = Path(cfg.run_dir)
    else:
        try:
            from hydra.core.hydra_config import HydraConfig

            path = Path(HydraConfig.get().runtime.output_dir)
        except ValueError:  # not under @hydra.main (the Python API, tests)
            raise ConfigError("run_dir is not set; pass run_dir=PATH") from None
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{os.getpid()}"  # per process: data-parallel ranks probe at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run directory {path} is not writable ({e.strerror}); choose another with run_dir=PATH "
                          f"or hydra.run.dir=PATH") from None  # fmt: skip
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_DISK:
        raise ConfigError(f"only {free / 2**20:.0f} MiB free on the disk of {path}; checkpoints need more. "
                          f"Free some space or choose another run_dir")  # fmt: skip
    return path


def _select(cfg, key: str):
    return OmegaConf.select(cfg, key)


def check_same_run(cfg: DictConfig, run_dir: Path) -> None:
    """A run directory resumes only with the settings that made it."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return
    saved = OmegaConf.load(saved_path)
    changed = []
    for key in RESULT_KEYS:
        old, new = _select(saved, key), _select(cfg, key)
        if OmegaConf.is_config(old):
            old, new = OmegaConf.to_container(old), OmegaConf.to_container(new)
        if old != new:
            changed.append(key)
    if changed:
        raise ConfigError(
            f"{run_dir} holds a run made with different {', '.join(changed)}; its checkpoint belongs to that "
            f"model. Resume it with its own settings, or start a new run with hydra.run.dir=NEW_DIR (or run_dir=)"
        )


def data_config(cfg: DictConfig, world_size: int = 1) -> DictConfig:
    """cfg.data, with the default corpus capped to what the budget can use (data.max_mb=null)."""
    if cfg.data.source != "python" or cfg.data.max_mb:
        return cfg.data
    data = cfg.data.copy()
    hw = detect_hardware(cfg.gpu, cfg.optimizations, cfg.train.device)
    data.max_mb = corpus_mb_wanted(cfg, hw, world_size)
    return data


def plan_for(cfg: DictConfig, run_dir: Path, data, resuming: bool,
             checkpoint_model: dict | None = None, world_size: int = 1) -> tuple[Plan, bool]:  # fmt: skip
    """The frozen plan of a resumed run, or a new one. Returns (plan, reused).

    A new plan for a run directory that holds a checkpoint must plan the model in that checkpoint;
    otherwise nothing is written and the error says so.
    """
    path = run_dir / "plan.json"
    if resuming and path.exists():
        try:
            plan = Plan.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as e:  # edited or damaged by hand: it is written atomically
            raise ConfigError(f"{path} cannot be read ({e}); restore it, or start a new run directory") from None
        if plan.world_size != world_size:
            regroup(plan, world_size)
            atomic_write_text(path, json.dumps(plan.to_dict(), indent=2))  # the other ranks read it from here
        return plan, True
    hw = detect_hardware(cfg.gpu, cfg.optimizations, cfg.train.device)
    plan = make_plan(cfg, hw, data.vocab_size, data.train_tokens, world_size, val_tokens=data.val_tokens)
    if checkpoint_model and checkpoint_model != plan.model:
        changed = {k: (v, plan.model.get(k)) for k, v in checkpoint_model.items() if plan.model.get(k) != v}
        raise CheckpointError(
            f"the checkpoint in {run_dir} holds another model than these settings plan: "
            + ", ".join(f"{k} {old} there, {new} here" for k, (old, new) in changed.items())
            + ". Resume it with the settings that made it, or start a new run directory"
        )
    atomic_write_text(path, json.dumps(plan.to_dict(), indent=2))
    return plan, False


def regroup(plan: Plan, world_size: int) -> None:
    """A run resumed on another number of ranks keeps its global batch, so the same samples make each
    step: the sequences of a step are split anew into micro-batches and accumulation steps per rank."""
    per_step = plan.micro_batch * plan.grad_accum * plan.world_size  # sequences per optimizer step
    micro = next((m for m in range(plan.micro_batch, 0, -1) if per_step % (m * world_size) == 0), None)
    if micro is None:
        raise ConfigError(f"this run takes {per_step} sequences a step, which {world_size} ranks cannot share "
                          f"evenly; resume it on {plan.world_size} rank(s), or on a number that divides "
                          f"{per_step}")  # fmt: skip
    old = plan.world_size
    plan.micro_batch, plan.grad_accum, plan.world_size = micro, per_step // (micro * world_size), world_size
    plan.reasons["micro_batch"] += (f"; resumed on {world_size} rank(s) instead of {old}: {micro} x "
                                    f"{plan.seq_len} tokens per forward, {plan.grad_accum} accumulation step(s)")  # fmt: skip


def check_disk_for_checkpoints(run_dir: Path, params: int, keep: int) -> None:
    """Fail before training, not at the first checkpoint an hour in, when the checkpoints cannot fit."""
    each = CHECKPOINT_BYTES_PER_PARAM * params
    at_once = keep + 1 if keep > 0 else 3  # the kept ones and the one being written (keep=0: at least 3)
    existing = sum(f.stat().st_size for f in checkpoint_files(run_dir / "checkpoints"))
    need = max(0, each * at_once - existing)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise ConfigError(
            f"checkpoints of this model take about {each / 2**20:,.0f} MiB each and {at_once} exist at once "
            f"(train.keep_checkpoints={keep}, plus the one being written): {need / 2**20:,.0f} MiB more, but "
            f"only {free / 2**20:,.0f} MiB is free on the disk of {run_dir}. Free some space, lower "
            f"train.keep_checkpoints, or choose another run_dir"
        )


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


@torch.no_grad()
def evaluate(model, batches, ctx, bytes_per_token: float, chunk_tokens: int = 4096) -> dict:
    """Validation loss, perplexity and bits per byte. The loss is taken in chunks of `chunk_tokens`: the eager
    full-batch loss would hold ~10 bytes per logit (16-bit logits, their fp32 copy and log-softmax), more than
    a compiled training step keeps for the same micro-batch, and an evaluation must not peak above training."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with ctx:
            total += lm_loss(model, x, y, chunked=True, chunk_tokens=chunk_tokens).item() * y.numel()
        count += y.numel()
    model.train(was_training)
    loss = total / max(1, count)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_bpb": loss / math.log(2) / bytes_per_token}


class CpuThreads:
    """PyTorch's CPU threads wait for each other by spinning, so on cores shared with other work all of them
    can be slower than fewer: with one of this 2-core machine's cores busy, a 512 x 512 matmul ran at 58
    GFLOP/s on one thread and 14 on two. A CPU run's first step uses every thread, its second half of them,
    and the faster count stays for the rest of the run (then the process gets its own count back)."""

    def __init__(self, active: bool):
        self.all = torch.get_num_threads()
        self.half = max(1, self.all // 2)
        self.active, self.times = active and self.all > 1, {}
        if self.active and os.getloadavg()[0] >= self.all:  # already busy: a step on every thread could take
            torch.set_num_threads(self.half)  # many times its share of the budget; half of them, no trial
            self.active = False

    def after_step(self, step: int, seconds: float, plan) -> float:
        """The step's time as the speed to plan with: from step 2 on, that of the faster thread count."""
        if not self.active or step not in (1, 2):
            return seconds
        self.times[torch.get_num_threads()] = seconds
        if step == 1:
            torch.set_num_threads(self.half)
            return seconds
        best = min(self.times, key=self.times.get)
        torch.set_num_threads(best)
        plan.reasons["threads"] = (f"{best} of {self.all} CPU threads: the first step took {self.times[self.all]:.2f} s "
                                   f"on {self.all}, the second {self.times[self.half]:.2f} s on {self.half}")  # fmt: skip
        return self.times[best]

    def restore(self) -> None:
        torch.set_num_threads(self.all)


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


def write_sample(model, tokenizer, prompt: str, tokens: int, device: str, seed: int, path: Path) -> str:
    from .model.sampling import generate

    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    g = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    out = generate(model, torch.tensor([ids], device=device), tokens, temperature=0.8, top_k=50, generator=g)
    model.train()
    text = tokenizer.decode(out[0].tolist())
    atomic_write_text(path, text)
    return text
