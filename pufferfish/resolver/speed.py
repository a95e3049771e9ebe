"""Speed model: a step's matmul FLOPs at an achievable share of the peak, plus per-layer launch time.

Small models do not fill a GPU: each layer costs kernel launches and memory-bound work that barely
depends on its width. Both constants were fitted on the H200 (scripts/calibrate.py, docs/benchmarks.md);
the CPU profile instead measures its own matmul rate at start-up, and every run re-plans its steps
from the speed it measures (pufferfish/train.py), so a wrong prediction costs accuracy, not the budget.
"""

from __future__ import annotations

from .memory import Shape, count_params

# seconds per layer per micro-step (forward, backward and the optimizer's share), measured on the H200 host
LAYER_OVERHEAD_S = {"eager": 2.2e-3, "compiled": 0.8e-3}
STEP_OVERHEAD_S = {"eager": 5e-3, "compiled": 2e-3}  # embedding, loss, clipping, the optimizer's launch
CHECKPOINT_OVERHEAD = 1.6  # recomputation launches the forward's kernels again
MOE_LAYER_OVERHEAD_S = 4e-3  # routing, sorting and the per-expert dispatch


def flops_per_token(s: Shape) -> float:
    """Training FLOPs per token: 6N for the matmuls (N active, tied embedding once) + 12 L d T attention."""
    n = count_params(s, active=True)
    attn = 12 * s.num_layers * s.num_dims * s.seq_len  # the convention used in published MFU figures
    per_token = 6 * n + attn
    if s.grad_ckpt:  # one more forward of every block
        per_token += 2 * (n - s.vocab_size * s.num_dims) + attn / 3
    return per_token


def step_seconds(s: Shape, peak_flops: float, mfu: float, on_gpu: bool) -> float:
    tokens = s.micro_batch * s.seq_len
    seconds = flops_per_token(s) * tokens / (peak_flops * mfu)
    if on_gpu:
        kind = "compiled" if s.compiled else "eager"
        per_layer = LAYER_OVERHEAD_S[kind] * (CHECKPOINT_OVERHEAD if s.grad_ckpt else 1.0)
        seconds += STEP_OVERHEAD_S[kind] + s.num_layers * per_layer + s.moe_layers * MOE_LAYER_OVERHEAD_S
    return seconds


def predict_tokens_per_s(s: Shape, peak_flops: float, mfu: float, on_gpu: bool) -> float:
    return s.micro_batch * s.seq_len / step_seconds(s, peak_flops, mfu, on_gpu)
