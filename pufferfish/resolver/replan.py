"""Re-planning during a run, when the device cannot run the step the plan chose: the resolver decides again and
records why; the loop carries on with the new plan."""

from __future__ import annotations

from dataclasses import fields, replace

from .hardware import Hardware
from .memory import predict_peak_bytes
from .plan import _shape, memory_budget
from .speed import predict_tokens_per_s


def plan_eager_step(plan, cfg, step: int, error: str) -> dict:
    """Compilation failed on the device (an old card, a driver, no Triton): the step runs eager from `step` on.
    An eager step keeps more than a compiled one (unfused elementwise tensors, 12-byte logits), so the memory is
    planned again for it: the micro-batch halves (the accumulation doubles, the batch stays) until the eager
    step's predicted peak fits the plan's memory. Updates `plan`; returns the record to log."""
    hw = Hardware(**{k: v for k, v in plan.hardware.items() if k in {f.name for f in fields(Hardware)}})
    budget = memory_budget(hw)
    shards = plan.world_size if cfg.train.get("parallel", "ddp") == "fsdp2" else 1

    def eager(micro: int):
        return replace(_shape(plan.model, cfg, hw, micro, plan.grad_ckpt, shards), compiled=False,
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
    return {"kind": "compile_fallback", "step": step, "error": error, "micro_batch": plan.micro_batch,
            "grad_accum": plan.grad_accum, "predicted_peak_bytes": peak.total}  # fmt: skip
