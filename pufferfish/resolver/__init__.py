from .explain import format_plan
from .hardware import Hardware, apply_memory_cap, detect_hardware, prefer_expandable_segments
from .memory import MemoryBreakdown, Shape, count_params, predict_peak_bytes
from .plan import EVALS_PER_RUN, Plan, make_plan
from .shapes import fits, grad_ckpt_for, kv_heads_for, memory_budget, memory_shape, model_dict
from .speed import flops_per_token, plan_flops_per_token, predict_tokens_per_s

__all__ = [
    "EVALS_PER_RUN", "Hardware", "detect_hardware", "apply_memory_cap", "prefer_expandable_segments", "Shape", "MemoryBreakdown", "count_params",
    "predict_peak_bytes", "Plan", "make_plan", "flops_per_token", "plan_flops_per_token", "predict_tokens_per_s", "format_plan",
    "model_dict", "memory_shape", "memory_budget", "fits", "grad_ckpt_for", "kv_heads_for",
]  # fmt: skip
