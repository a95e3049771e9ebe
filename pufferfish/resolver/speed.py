"""Speed model: FLOPs per token over (peak x achievable utilisation)."""

from __future__ import annotations

from .memory import Shape, count_params

# Small matrices cannot fill a GPU: utilisation grows with width until it saturates. Fitted on the H200
# (scripts/calibrate_speed.py, docs/benchmarks.md); the CPU's probe already measures small matmuls.
GPU_WIDTH_HALF_SATURATION = 256  # utilisation is half its plateau at this many dims


def flops_per_token(s: Shape) -> float:
    """Training FLOPs per token: 6N for the matmuls (N active, tied embedding once) + 12 L d T attention."""
    n = count_params(s, active=True)
    attn = 12 * s.num_layers * s.num_dims * s.seq_len  # the convention used in published MFU figures
    per_token = 6 * n + attn
    if s.grad_ckpt:  # one more forward of every block
        per_token += 2 * (n - s.vocab_size * s.num_dims) + attn / 3
    return per_token


def utilisation(s: Shape, mfu: float, on_gpu: bool) -> float:
    if not on_gpu:
        return mfu
    w = s.num_dims
    return mfu * w / (w + GPU_WIDTH_HALF_SATURATION) * (1 + GPU_WIDTH_HALF_SATURATION / 768)  # = mfu at 768


def predict_tokens_per_s(s: Shape, peak_flops: float, mfu: float, on_gpu: bool) -> float:
    return peak_flops * utilisation(s, mfu, on_gpu) / flops_per_token(s)
