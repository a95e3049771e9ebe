"""Speed model: a training step is bound either by the GPU's arithmetic or by the host launching it.

The host queues kernels asynchronously, so on a GPU a step takes about the longer of two times, not
their sum:

    GPU   FLOPs / (peak x mfu x d / (d + D))                       x eager_gpu_factor unless compiled
    host  host_step_s + sum over layers of host_layer_s[eager|compiled]
              x checkpoint_host_factor (checkpointed blocks, eager or compiled)
              x moe_layer_launches (an MoE layer)

Per token a d x d matmul moves about 2d elements but does 2d^2 FLOPs, so narrow layers wait on memory:
with the two times added, the matmuls reach a share d / (d + D) of the profile's `mfu`, where
D = bytes per element x peak / bandwidth is the roofline's ridge (412 on the H200). Without a bandwidth
the fitted D (half_share_dims) is used. Eager steps also run the unfused elementwise kernels and loss that
torch.compile fuses away. Small models on a fast GPU are therefore launch-bound: their speed barely
depends on width or batch. The host's time per layer is as large for a compiled step as for an eager one
on the H200's host (the eager optimizer, clipping and autograd's per-parameter work stay, and the
compiled graphs' launches cost about what the eager ones save), and checkpointed blocks double it in
both: the recomputed forward is launched again in the backward. The chunked loss's per-chunk launches
were fitted too and came out nil (a few chunks per step), so they have no term. The constants were fitted
on the H200 with its host (torch 2.11, 2026-11-29) on three calibration grids by
`python -m pufferfish.lab.fit_speed_model --refit`; launch times depend on the host CPU (they varied by
about 20 % between machines of the same kind), so other machines differ. The CPU runs its ops one after
another: a step is its FLOPs at the probed matmul rate x mfu x d / (d + cpu_half_share_dims), narrow layers
spending more of their time outside the matmuls. Every run re-plans its steps from the speed it measures
(pufferfish/train.py): a wrong prediction costs accuracy, not the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..optim import MUON_NS_STEPS
from .memory import BYTES, Shape, count_params, muon_matrices


@dataclass(frozen=True)
class SpeedConstants:
    """The speed model's fitted and measured constants; the defaults are the committed ones. The step-time
    functions below take another set to try it (pufferfish/lab/fit_speed_model.py --refit fits them)."""

    # Fitted: python -m pufferfish.lab.fit_speed_model --refit --fit fit.json check.json check2.json
    # --predates fit.json (the H200 grids of pufferfish/lab/calibrate.py --grid fit|check|check2, 70 rows;
    # least squares of log step time). D when the bandwidth is not given: the width at which the matmuls reach
    # half the profile's mfu (d = 768 reaches 0.67 of it); the H200's roofline 2 x 989 TFLOP/s / 4.8 TB/s
    # would be 412
    half_share_dims: float = 371
    # eager GPU time / compiled GPU time of the same step (unfused elementwise kernels and loss): the H200's
    # 12 x 768, 16 x 1024 bf16 step, both GPU-bound: 306k eager vs 519k tokens/s compiled
    # (pufferfish/lab/bench_throughput.py; measured, not fitted)
    eager_gpu_factor: float = 1.7
    # host seconds per step outside the layers (embedding, loss, clipping, optimizer launches); fitted
    host_step_s: float = 4.0e-3
    # host seconds to launch one layer's forward and backward kernels (and its optimizer share); fitted. The
    # compiled one is nearly the eager one: compiled steps took 2-3 ms per layer on the check2 grid, 1.1-1.8
    # ms on the older fit and check grids. Checked (docs/benchmarks.md, speed model accuracy): six compiled
    # check3 rows predicted within 6 % median, 17 % worst (H200, 2026-11-29); check3's ten compiled rows
    # re-measured by `calibrate --grid check3 --only compiled` (H200, 2026-11-30) on a host that launched
    # faster ran 6-37 % faster than predicted (median 17 %). Host-bound speeds differ by machine more than the
    # model's error, so the value stands; each run re-plans from the speed it measures
    host_layer_s: dict[str, float] = field(default_factory=lambda: {"eager": 2.35e-3, "compiled": 2.25e-3})
    # checkpointed blocks launch their forward again in the backward (eager: plus torch.utils.checkpoint's
    # hooks); fitted on eager rows of all grids and the compiled checkpointed rows of check2 (5.6-7 ms per
    # layer where compiled rows without checkpointing took 2-3 ms)
    checkpoint_host_factor: float = 2.2
    # an MoE layer's host time / a dense layer's (router, sort, gather, grouped GEMMs, scatter); fitted on the
    # four MoE rows of check and check2 (eager, eager checkpointed, compiled: each +20..+66 % too fast with
    # the 1.27 of counted aten ops, fit_speed_model --count-ops: routing's ops cost more than a matmul's
    # launch)
    moe_layer_launches: float = 1.77
    # the CPU's D: the width at which a step reaches half of the cpu profile's mfu (its matmuls against the
    # norms, activations, attention and loss, which scale with d, not d^2). Fitted with that mfu (1.0) by least
    # squares of log share on the 12 shapes of `python -m pufferfish.lab.cpu_speed` (2 cores of an AMD EPYC,
    # torch 2.13, 2026-12-05; docs/measurements/2026-12-05/cpu_speed.json): 1 x 64 to 12 x 768, every row within 17 %
    cpu_half_share_dims: float = 134
    # seconds torch.compile (Inductor: the forward and loss, and their backward) adds to a run's start from a cold
    # cache: base + per layer, since Inductor compiles the unrolled model. Fitted by `python -m
    # pufferfish.lab.fit_compile_time` on the ten cold compiles of the H100 time-to-loss runs (6-12 layers, torch
    # 2.11, 2026-12-06; each within 7 s of the line). A warm cache (the same graph compiled before on the machine)
    # took 5-7 s whatever the depth; the planner counts the cold cost
    compile_base_s: float = 9.0
    compile_layer_s: float = 1.60


CONSTANTS = SpeedConstants()  # the committed values


def compile_seconds(num_layers: int, constants: SpeedConstants = CONSTANTS) -> float:
    """Seconds a cold torch.compile of the forward and loss adds to a run's start (fit_compile_time's line)."""
    return constants.compile_base_s + constants.compile_layer_s * num_layers


def model_flops_per_token(active_params: float, num_layers: int, num_dims: int, seq_len: int) -> float:
    """Training FLOPs per token, the convention of published MFU figures: 6N for the matmuls (N active, tied
    embedding once) + 12 L d T for attention."""
    return 6 * active_params + 12 * num_layers * num_dims * seq_len


def plan_flops_per_token(plan: dict) -> float:
    """model_flops_per_token of a plan (a Plan's to_dict or plan.json)."""
    m = plan["model"]
    return model_flops_per_token(plan["active_params"], m["num_layers"], m["num_dims"], plan["seq_len"])


def flops_per_token(s: Shape) -> float:
    """model_flops_per_token of a shape, with a checkpointed step's second forward of every block."""
    n = count_params(s, active=True)
    attn = 12 * s.num_layers * s.num_dims * s.seq_len
    per_token = model_flops_per_token(n, s.num_layers, s.num_dims, s.seq_len)
    if s.grad_ckpt:  # one more forward of every block
        per_token += 2 * (n - s.vocab_size * s.num_dims) + attn / 3
    return per_token


def half_share_dims(s: Shape, peak_flops: float, bandwidth: float = 0.0,
                    constants: SpeedConstants = CONSTANTS) -> float:  # fmt: skip
    """The width D at which matmuls reach half of mfu: the roofline's ridge, or the H200's without a bandwidth."""
    return BYTES[s.precision] * peak_flops / bandwidth if bandwidth > 0 else constants.half_share_dims


def gpu_seconds(s: Shape, peak_flops: float, mfu: float, bandwidth: float = 0.0,
                constants: SpeedConstants = CONSTANTS) -> float:  # fmt: skip
    """Time the GPU spends computing one micro-step (forward, backward, optimizer share); bandwidth in bytes/s."""
    share = mfu * s.num_dims / (s.num_dims + half_share_dims(s, peak_flops, bandwidth, constants))
    seconds = flops_per_token(s) * s.micro_batch * s.seq_len / (peak_flops * share)
    return seconds if s.compiled else seconds * constants.eager_gpu_factor


def host_seconds(s: Shape, constants: SpeedConstants = CONSTANTS) -> float:
    """Time the host spends launching one micro-step's kernels."""
    k, kind = constants, "compiled" if s.compiled else "eager"
    per_layer = k.host_layer_s[kind] * (k.checkpoint_host_factor if s.grad_ckpt else 1.0)
    layers = s.num_layers - s.moe_layers + s.moe_layers * k.moe_layer_launches
    return k.host_step_s + layers * per_layer


def newton_schulz_flops(s: Shape, steps: int = MUON_NS_STEPS) -> float:
    """FLOPs of Muon's orthogonalisation in one optimizer step (0 under AdamW). For a matrix with short side m and
    long side n each iteration makes the Gram matrix x x^T (2 m^2 n), its square (2 m^3) and that times x (2 m^2 n):
    the same for every optimizer step, however many tokens it takes, so it weighs on small batches."""
    if s.optimizer != "muon":
        return 0.0
    flops = 0.0
    for (rows, cols), count in muon_matrices(s).items():
        short, long = min(rows, cols), max(rows, cols)
        flops += count * steps * (4 * short * short * long + 2 * short**3)
    return flops


def with_optimizer_step(tokens_per_s: float, s: Shape, batch_tokens: int, peak_flops: float, mfu: float) -> float:
    """Tokens per second once the optimizer's own per-step work is counted: Muon's orthogonalisation, the same
    for every optimizer step of `batch_tokens` tokens (AdamW's is in the fitted step time)."""
    extra_s = newton_schulz_flops(s) / (peak_flops * mfu)
    return batch_tokens / (batch_tokens / tokens_per_s + extra_s) if extra_s else tokens_per_s


def cpu_share(mfu: float, num_dims: int, half_share_dims: float = CONSTANTS.cpu_half_share_dims) -> float:
    """The share of the CPU's probed matmul rate a step of width num_dims reaches: mfu x d / (d + D)."""
    return mfu * num_dims / (num_dims + half_share_dims)


def step_seconds(s: Shape, peak_flops: float, mfu: float, on_gpu: bool, bandwidth: float = 0.0,
                 constants: SpeedConstants = CONSTANTS) -> float:  # fmt: skip
    if not on_gpu:  # the CPU runs its ops one after another: matmuls at the probed rate, the rest in proportion
        share = cpu_share(mfu, s.num_dims, constants.cpu_half_share_dims)
        return flops_per_token(s) * s.micro_batch * s.seq_len / (peak_flops * share)
    return max(gpu_seconds(s, peak_flops, mfu, bandwidth, constants), host_seconds(s, constants))


def predict_tokens_per_s(s: Shape, peak_flops: float, mfu: float, on_gpu: bool, bandwidth: float = 0.0,
                         constants: SpeedConstants = CONSTANTS) -> float:  # fmt: skip
    """Tokens per second of one process; `bandwidth` (bytes/s, Hardware.bandwidth) sets the GPU's own ridge."""
    return s.micro_batch * s.seq_len / step_seconds(s, peak_flops, mfu, on_gpu, bandwidth, constants)
