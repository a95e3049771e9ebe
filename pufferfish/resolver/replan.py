"""Re-planning during a run: the resolver decides again and records each change as a revision of the plan
(plan.revisions, kept in plan.json); the loop carries on with the new plan.

- the speed: the steps are re-planned from the measured speed as it settles, so the run ends on time with its
  schedule complete (Pace); on a CPU its first two steps also choose the number of threads (CpuThreads);
- compilation fails on the device: the step runs eager, its memory planned again (plan_eager_step);
- out of memory: half the micro-batch, twice the accumulation, the same batch (plan_smaller_micro_batch);
- a run resumed on another number of ranks: the same batch, regrouped (plan_regroup).
"""

from __future__ import annotations

import os
from dataclasses import fields, replace

import torch

from ..errors import ConfigError, OutOfMemoryError
from .hardware import Hardware
from .memory import predict_peak_bytes
from .plan import EVALS_PER_RUN, planned_config
from .shapes import memory_budget, memory_shape
from .speed import predict_tokens_per_s


def plan_eager_step(plan, cfg, step: int, error: str) -> dict:
    """Compilation failed on the device (an old card, a driver, no Triton): the step runs eager from `step` on.
    An eager step keeps more than a compiled one (unfused elementwise tensors, 12-byte logits), so the memory is
    planned again for it: the micro-batch halves (the accumulation doubles, the batch stays) until the eager
    step's predicted peak fits the plan's memory. Updates `plan`; returns the record to log."""
    hw = Hardware(**{k: v for k, v in plan.hardware.items() if k in {f.name for f in fields(Hardware)}})
    budget = memory_budget(hw)
    shards = plan.world_size if cfg.train.get("parallel", "ddp") == "fsdp2" else 1
    cfg = planned_config(cfg, plan.optimizer)  # its optimizer's state, whatever optim.name=auto would choose now

    def eager(micro: int):
        return replace(memory_shape(plan.model, cfg, hw, micro, plan.grad_ckpt, shards), compiled=False,
                       grads_in_forward=plan.grad_accum > 1)  # fmt: skip

    old = plan.micro_batch
    while plan.micro_batch > 1 and predict_peak_bytes(eager(plan.micro_batch)).total > budget:
        new = max(d for d in range(1, plan.micro_batch // 2 + 1) if plan.micro_batch % d == 0)
        plan.grad_accum *= plan.micro_batch // new
        plan.micro_batch = new
    peak = predict_peak_bytes(eager(plan.micro_batch))
    plan.compile = False
    plan.predicted_peak_bytes, plan.memory_breakdown = peak.total, peak.to_dict()
    plan.predicted_tokens_per_s = plan.world_size * predict_tokens_per_s(
        eager(plan.micro_batch), hw.peak_flops, hw.mfu, hw.profile != "cpu", bandwidth=hw.bandwidth)
    plan.reasons["compile"] = f"eager from step {step}: compilation failed on this device ({error})"
    shrunk = f"; micro-batch {old} -> {plan.micro_batch}, {plan.grad_accum} accumulation step(s)" \
        if plan.micro_batch != old else ""  # fmt: skip
    plan.reasons["memory"] = (f"predicted peak {peak.total / 2**30:.2f} GiB of {hw.vram_bytes / 2**30:.2f} GiB for "
                              f"the eager step{shrunk}")  # fmt: skip
    if shrunk:
        plan.reasons["micro_batch"] += f"; eager from step {step}: {plan.micro_batch} per forward x " \
                                       f"{plan.grad_accum} accumulation steps"  # fmt: skip
    return plan.revise(step, "compile_fallback", plan.reasons["compile"], error=error, micro_batch=plan.micro_batch,
                       grad_accum=plan.grad_accum, predicted_peak_bytes=peak.total)  # fmt: skip


def plan_smaller_micro_batch(plan, step: int, error: str) -> dict:
    """Out of memory at `step`: halve the micro-batch and double the accumulation (the same global batch).
    Returns the revision, for the log."""
    old = plan.micro_batch
    if old <= 1:
        raise OutOfMemoryError(
            f"out of memory at step {step} even at micro_batch=1 ({plan.seq_len} tokens per forward pass; "
            f"{plan.params / 1e6:.1f}M parameters): this model does not fit here. Use optimizations.grad_ckpt="
            f"always, a shorter model.seq_len, a smaller model (model.num_layers, model.num_dims, or a shorter "
            f"mode), or the gpu profile of a smaller card so the plan leaves more room. ({error})"
        )
    new = max(d for d in range(1, old // 2 + 1) if old % d == 0)  # half: the planner's are even from 8 up
    plan.grad_accum *= old // new
    plan.micro_batch = new
    why = f"out of memory at step {step}: {new} per forward x {plan.grad_accum} accumulation steps from then on"
    plan.reasons["micro_batch"] = plan.reasons.get("micro_batch", "") + f"; {why}"
    return plan.revise(step, "oom_backoff", why, micro_batch=new, grad_accum=plan.grad_accum, error=error)


def plan_regroup(plan, world_size: int, step: int = 0) -> dict:
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
    why = (f"resumed on {world_size} rank(s) instead of {old}: {micro} x {plan.seq_len} tokens per forward, "
           f"{plan.grad_accum} accumulation step(s)")  # fmt: skip
    plan.reasons["micro_batch"] += f"; {why}"
    return plan.revise(step, "regroup", why, world_size=world_size, micro_batch=micro, grad_accum=plan.grad_accum)


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


CALIBRATE_FROM = 2  # steps before this include compilation and allocator warm-up
REPLAN_AT = (0.03, 0.15, 0.4, 0.7)  # shares of the budget after which the steps are re-planned from the speed
MAX_STEP_SHARE = 0.02  # a re-planned step takes at most this share of the budget: the run can still re-plan
# one sampled token (a forward of one position, latency-bound) costs about as much as this many tokens of an
# evaluation's batched forward
SAMPLE_COST = 8


class Pace:
    """The budget, not a step count, ends a run: the steps are re-planned from the measured speed as it
    settles (at REPLAN_AT shares of the budget; on a CPU, which compiles nothing, also after each of its first
    two steps), leaving time for the evaluations still to come and for the final checkpoint, evaluation and
    sample. Evaluations and checkpoints are overhead, not steps: they are left out of the speed."""

    def __init__(self, plan, device: str, distributed: bool, fixed_steps: bool, sample_tokens: int):
        self.plan, self.distributed, self.sample_tokens = plan, distributed, sample_tokens
        self.at = [] if fixed_steps or plan.measured_tokens_per_s else list(REPLAN_AT)
        self.cpu = device == "cpu" and not distributed and bool(self.at)
        self.threads = CpuThreads(self.cpu)
        self.overhead_s = 0.0  # seconds of evaluations and checkpoints
        self.save_s = 0.0  # what a checkpoint takes (the first one, timed)
        self._t0 = self._overhead0 = 0.0

    def finish_s(self, eval_s: float, eval_tokens: int, final_tokens: int) -> float:
        """Seconds the final checkpoint, evaluation and sample take after the loop, at the latest speed."""
        speed = self.plan.measured_tokens_per_s or self.plan.predicted_tokens_per_s
        final_eval_s = max(final_tokens / (3 * speed), eval_s * final_tokens / max(1, eval_tokens))
        return self.save_s + final_eval_s + SAMPLE_COST * self.sample_tokens / (3 * speed)

    def step_time(self, step: int, step_s: float) -> float:
        """A CPU run's first two steps try the thread counts; the time to plan with."""
        return self.threads.after_step(step, step_s, self.plan) if self.cpu and step in (1, 2) else step_s

    def replan(self, step: int, elapsed: float, step_s: float, eval_s: float, eval_tokens: int, final_tokens: int,
               may: bool = True) -> dict | None:  # fmt: skip
        """After `step`, `elapsed` seconds into the run: re-plan the steps when due (and `may`: with ranks, only
        where they agree). Returns the revision, or None."""
        if step == CALIBRATE_FROM:
            self._t0, self._overhead0 = elapsed, self.overhead_s
        first_on_cpu = self.cpu and step in (1, 2)
        budget = self.plan.time_budget_s
        if not (may and self.at and (first_on_cpu or step > CALIBRATE_FROM + 2 and elapsed > self.at[0] * budget)):
            return None
        per_step = step_s if first_on_cpu else             (elapsed - self._t0 - (self.overhead_s - self._overhead0)) / (step - CALIBRATE_FROM)  # fmt: skip
        if not first_on_cpu:
            self.at = self.at[1:]
        evals_left = EVALS_PER_RUN * (1 - elapsed / budget) + 1
        eval_s = max(eval_s, eval_tokens * per_step / self.plan.batch_tokens / 3)  # none yet at step 1
        left = budget - elapsed - evals_left * eval_s - self.finish_s(eval_s, eval_tokens, final_tokens)
        self.plan.recalibrate(step, per_step, left, None if self.distributed else MAX_STEP_SHARE * budget)
        return self.plan.revise(step, "steps", self.plan.reasons["steps"], steps=self.plan.steps,
                                measured_tokens_per_s=self.plan.measured_tokens_per_s,
                                data_fraction=self.plan.data_fraction, grad_accum=self.plan.grad_accum)  # fmt: skip
