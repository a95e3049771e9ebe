"""Speed model: a training step is bound either by the GPU's arithmetic or by the host launching it.

The host queues kernels asynchronously, so on a GPU a step takes about the longer of two times, not
their sum:

    GPU   FLOPs / (peak x mfu x d / (d + D))                       x EAGER_GPU_FACTOR unless compiled
    host  HOST_STEP_S + sum over layers of HOST_LAYER_S[eager|compiled]
              x CHECKPOINT_HOST_FACTOR (eager checkpointing)  x MOE_LAYER_LAUNCHES (an MoE layer)

Per token a d x d matmul moves about 2d elements but does 2d^2 FLOPs, so narrow layers wait on memory:
with the two times added, the matmuls reach a share d / (d + D) of the profile's `mfu`, where
D = bytes per element x peak / bandwidth is the roofline's ridge (412 on the H200; a fit of the H200's
measurements alone gives 406). Without a bandwidth the H200's D is used. Eager steps also run the unfused elementwise kernels and loss that torch.compile fuses away, and
launch about twice the kernels per layer. Small models on a fast GPU are therefore launch-bound: their
speed barely depends on width or batch. The constants were measured on the H200 with its host (torch
2.11, 2026-11-29) and are refitted by `scripts/fit_speed_model.py`; launch times depend on the host CPU,
so other machines differ. The CPU profile keeps FLOPs at its measured matmul rate x mfu, and every run
re-plans its steps from the speed it measures (pufferfish/train.py): a wrong prediction costs accuracy,
not the budget.
"""

from __future__ import annotations

from .memory import BYTES, Shape, count_params

# D when the bandwidth is not given: the width at which the matmuls reach half the profile's mfu (d = 768
# reaches 0.66 of it); fitted on the H200 fit grid (scripts/calibrate.py --grid fit), whose GPU-bound step
# is 12 x 768 compiled at 16 x 1024: 406, the H200's roofline 2 x 989 TFLOP/s / 4.8 TB/s: 412
HALF_SHARE_DIMS = 400
# eager GPU time / compiled GPU time of the same step (unfused elementwise kernels and loss): the H200's
# 12 x 768, 16 x 1024 bf16 step, both GPU-bound: 306k eager vs 519k tokens/s compiled (scripts/bench_throughput.py)
EAGER_GPU_FACTOR = 1.7
# host seconds per step outside the layers (embedding, loss, clipping, optimizer launches); fit grid
HOST_STEP_S = 3.8e-3
# host seconds to launch one layer's forward and backward kernels; fit grid (compiled: its launch-bound
# compiled step, 8 x 512 at 16 x 512)
HOST_LAYER_S = {"eager": 2.6e-3, "compiled": 1.2e-3}
# eager checkpointing launches the forward again, plus torch.utils.checkpoint's hooks; fit grid
CHECKPOINT_HOST_FACTOR = 2.1
# an MoE block launches this many times a dense block's ops (router, sort, gather, grouped GEMMs,
# scatter): aten ops of forward+backward under bf16 autocast, counted (scripts/fit_speed_model.py --count-ops)
MOE_LAYER_LAUNCHES = 1.27


def flops_per_token(s: Shape) -> float:
    """Training FLOPs per token: 6N for the matmuls (N active, tied embedding once) + 12 L d T attention."""
    n = count_params(s, active=True)
    attn = 12 * s.num_layers * s.num_dims * s.seq_len  # the convention used in published MFU figures
    per_token = 6 * n + attn
    if s.grad_ckpt:  # one more forward of every block
        per_token += 2 * (n - s.vocab_size * s.num_dims) + attn / 3
    return per_token


def half_share_dims(s: Shape, peak_flops: float, bandwidth: float = 0.0) -> float:
    """The width D at which matmuls reach half of mfu: the roofline's ridge, or the H200's without a bandwidth."""
    return BYTES[s.precision] * peak_flops / bandwidth if bandwidth > 0 else HALF_SHARE_DIMS


def gpu_seconds(s: Shape, peak_flops: float, mfu: float, bandwidth: float = 0.0) -> float:
    """Time the GPU spends computing one micro-step (forward, backward, optimizer share); bandwidth in bytes/s."""
    share = mfu * s.num_dims / (s.num_dims + half_share_dims(s, peak_flops, bandwidth))
    seconds = flops_per_token(s) * s.micro_batch * s.seq_len / (peak_flops * share)
    return seconds if s.compiled else seconds * EAGER_GPU_FACTOR


def host_seconds(s: Shape) -> float:
    """Time the host spends launching one micro-step's kernels."""
    kind = "compiled" if s.compiled else "eager"
    per_layer = HOST_LAYER_S[kind] * (CHECKPOINT_HOST_FACTOR if s.grad_ckpt and not s.compiled else 1.0)
    layers = s.num_layers - s.moe_layers + s.moe_layers * MOE_LAYER_LAUNCHES
    return HOST_STEP_S + layers * per_layer


def step_seconds(s: Shape, peak_flops: float, mfu: float, on_gpu: bool, bandwidth: float = 0.0) -> float:
    if not on_gpu:  # the CPU runs its ops one after another at the measured matmul rate
        return flops_per_token(s) * s.micro_batch * s.seq_len / (peak_flops * mfu)
    return max(gpu_seconds(s, peak_flops, mfu, bandwidth), host_seconds(s))


def predict_tokens_per_s(s: Shape, peak_flops: float, mfu: float, on_gpu: bool, bandwidth: float = 0.0) -> float:
    """Tokens per second of one process; `bandwidth` (bytes/s, Hardware.bandwidth) sets the GPU's own ridge."""
    return s.micro_batch * s.seq_len / step_seconds(s, peak_flops, mfu, on_gpu, bandwidth)
