"""Shapes the planner can build: the model dict of a (layers, dims) pair, its memory Shape on a card, and
the largest micro-batch that fits the card's memory."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..errors import ConfigError
from ..model import ModelConfig
from ..optim import ns_dtype_for
from .capabilities import card_path
from .hardware import CUDA_CONTEXT_BYTES, Hardware
from .memory import Shape, allocator_reserve_bytes, predict_peak_bytes

MAX_MICRO_BATCH = 2**16  # sequences; memory or the target batch binds long before
USABLE_MEMORY = 0.92  # plan to this share of the memory: headroom for fragmentation spikes


def memory_shape(mc: dict, cfg, hw: Hardware, micro_batch: int, grad_ckpt: bool, shards: int = 1, path=None) -> Shape:
    """The memory model's Shape of model dict `mc` (model_dict's) at this micro-batch on the card `hw`, as the
    planner counts it: the card's step (card_path: precision, compiled or eager, attention kernel, repeated K/V
    heads), the config's loss chunking, MoE layers, and FSDP2 shards. Gradients are taken to exist during the
    forward (Shape.grads_in_forward), the safe case; a step of one micro-batch may replace it."""
    moe_layers = sum(ModelConfig.from_dict(mc).is_moe_layer(i) for i in range(mc["num_layers"])) if mc["use_moe"] else 0
    path = path or card_path(cfg, hw)  # the step the card runs: eager fp32 keeps more than compiled bf16
    return Shape(
        num_layers=mc["num_layers"], num_dims=mc["num_dims"], num_heads=mc["num_heads"],
        num_kv_heads=mc["num_kv_heads"], ffn_dims=mc["ffn_dims"], vocab_size=mc["vocab_size"],
        seq_len=mc["seq_len"], micro_batch=micro_batch, precision=hw.precision, grad_ckpt=grad_ckpt,
        chunked_loss=bool(cfg.optimizations.chunked_loss), loss_chunk_tokens=int(cfg.optimizations.loss_chunk_tokens),
        attention_math=path.attention_kernel == "math", moe_layers=moe_layers, compiled=path.inductor,
        repeated_kv=hw.profile != "cpu" and path.attention_kernel != "flash",
        moe_num_experts=mc["moe_num_experts"] if moe_layers else 0,
        moe_active_experts=mc["moe_active_experts"] if moe_layers else 0,
        moe_expert_ffn_dims=mc["moe_expert_ffn_dims"] if moe_layers else 0,
        moe_shared_expert=bool(mc["moe_shared_expert"]) and moe_layers > 0, shards=shards,
        qk_norm=bool(mc.get("qk_norm", False)), optimizer=step_optimizer(cfg),
        ns_fp32=ns_dtype_for(None if hw.profile == "cpu" else hw.compute_capability) == torch.float32,
    )  # fmt: skip


def optimizer_name(cfg) -> str:
    """optim.name; a bare namespace (the calibration's) has no optim group: AdamW, which it measures."""
    return str(getattr(getattr(cfg, "optim", None), "name", "adamw"))


def step_optimizer(cfg) -> str:
    """The optimizer whose state a step holds: optim.name=auto names none until a plan chooses (resolver.plan's
    chosen_config or planned_config give the config that names it)."""
    name = optimizer_name(cfg)
    if name == "auto":
        raise ValueError("optim.name=auto: size the step with the optimizer a plan chose (resolver.plan.planned_config "
                         "or chosen_config), not with auto")  # fmt: skip
    return name


def kv_heads_for(num_heads: int, attention) -> int:
    """The divisor of num_heads whose group size is nearest the attention option's heads_per_kv_head."""
    per = int(attention.heads_per_kv_head)
    if per == 0:
        return 1  # mqa
    divisors = [k for k in range(1, num_heads + 1) if num_heads % k == 0]
    return min(divisors, key=lambda k: (abs(math.log(num_heads / k / per)), -k))


def heads_for(num_dims: int, attention) -> int:
    """num_dims / head_dim heads; under grouped attention the nearest count that splits num_dims into heads
    of a multiple of 8 dims (even for RoPE, aligned for the attention kernels) and into whole groups of
    heads_per_kv_head: 704 dims make 11 heads of 64, and 11 cannot share kv heads four to one, so 8 of 88."""
    plain = max(1, num_dims // int(attention.head_dim))
    per = int(attention.heads_per_kv_head)
    if per <= 1 or plain % per == 0:  # mha, mqa, or the plain count groups already
        return plain
    grouped = [h for h in range(per, num_dims // 8 + 1, per) if num_dims % h == 0 and (num_dims // h) % 8 == 0]
    return min(grouped, key=lambda h: (abs(math.log(h / plain)), -h)) if grouped else plain


def heads_reason(mc: dict, cfg) -> str:
    """The plan's "heads" line: the count, the head size, and how the query heads share the kv heads."""
    heads, kv, dims = mc["num_heads"], mc["num_kv_heads"], mc["num_dims"]
    per, plain = int(cfg.attention.heads_per_kv_head), max(1, dims // int(cfg.attention.head_dim))
    said = f"{heads} heads of {dims // heads} dims, {kv} kv heads: "
    said += f"{heads // kv} query heads share each kv head" if kv > 1 else f"all {heads} query heads share one kv head"
    said += f" (attention={cfg.attention.name}"
    said += f" asks {per} per kv head)" if per > 0 else ")"
    if cfg.model.num_heads or cfg.model.num_kv_heads:
        return said + "; set by you"
    if per > 1 and heads // kv != per:
        return said + f"; {dims} dims split into no head count of whole groups of {per} with heads of 8k dims"
    if heads != plain:
        return said + f"; not {plain} heads of {cfg.attention.head_dim}: {plain} do not split into groups of {per}"
    return said


def model_dict(cfg, num_layers: int, num_dims: int, vocab_size: int, seq_len: int) -> dict:
    spec, moe = cfg.model, cfg.moe
    num_heads = spec.num_heads or heads_for(num_dims, cfg.attention)
    mc = ModelConfig(
        num_layers=num_layers, num_dims=num_dims, num_heads=num_heads,
        num_kv_heads=spec.num_kv_heads or kv_heads_for(num_heads, cfg.attention),
        vocab_size=vocab_size, seq_len=seq_len, ffn_dims=spec.ffn_dims, rope_theta=spec.rope_theta,
        norm_eps=spec.norm_eps, init_std=spec.init_std, qk_norm=bool(spec.qk_norm), use_moe=bool(moe.enabled),
        moe_num_experts=moe.num_experts, moe_active_experts=moe.active_experts,
        use_lossfreebalance=bool(moe.lossfree_balance), moe_bias_update_rate=moe.bias_update_rate,
        moe_aux_loss_alpha=moe.aux_loss_alpha, moe_shared_expert=bool(moe.shared_expert),
        moe_every_n_layers=moe.every_n_layers, moe_first_dense_layers=moe.first_dense_layers,
        moe_score_func=moe.score_func, moe_expert_ffn_dims=moe.expert_ffn_dims,
    )  # fmt: skip
    return mc.to_dict()


GRAD_CKPT_OPTIONS = {"never": (False,), "always": (True,), "auto": (False, True)}  # optimizations.grad_ckpt, in order


def grad_ckpt_for(mc: dict, cfg, hw: Hardware, micro_batch: int, shards: int = 1, path=None) -> bool:
    """Whether the planner checkpoints model dict `mc` at this micro-batch on `hw`: as optimizations.grad_ckpt
    asks; under `auto` only when the step without it does not fit (`fits`). The shape search decides
    each shape with it (at train.micro_batch, or at 1 while the micro-batch is free), and so does a measuring
    job at its own micro-batch."""
    policy = cfg.optimizations.grad_ckpt
    if policy not in GRAD_CKPT_OPTIONS:
        raise ConfigError(f"optimizations.grad_ckpt={policy!r}; allowed: {', '.join(GRAD_CKPT_OPTIONS)}")
    *tried, last = GRAD_CKPT_OPTIONS[policy]
    for ckpt in tried:
        if fits(memory_shape(mc, cfg, hw, micro_batch, ckpt, shards, path), hw):
            return ckpt
    return last


def _candidates(cfg, relaxed: bool = False) -> list[tuple[int, int]]:
    """Shapes within the mode's bounds; relaxed: anything smaller too (when physics forbids the bounds)."""
    mode, spec = cfg.mode, cfg.model
    min_layers, min_dims = (1, 64) if relaxed else (mode.min_layers, mode.min_dims)
    layers = [spec.num_layers] if spec.num_layers else list(range(min_layers, mode.max_layers + 1))
    step = 128 if min_dims >= 256 else 64  # multiples of 128 keep head counts easy to group
    dims = [spec.num_dims] if spec.num_dims else list(range(min_dims, mode.max_dims + 1, step))
    return [(L, d) for L in layers for d in dims]


def usable_bytes(hw: Hardware) -> int:
    """The device's memory less the CUDA context (on a GPU): what PyTorch's allocator can have."""
    return hw.vram_bytes - (CUDA_CONTEXT_BYTES if hw.profile != "cpu" else 0)


def memory_budget(hw: Hardware) -> int:
    """The bytes a plan may fill: usable_bytes at USABLE_MEMORY."""
    return int(usable_bytes(hw) * USABLE_MEMORY)


def fits(shape: Shape, hw: Hardware) -> bool:
    """Whether a step of `shape` fits the card: its predicted peak within memory_budget, and with what the
    allocator may reserve beyond it (allocator_reserve_bytes) within the card's usable memory."""
    peak = predict_peak_bytes(shape).total
    return peak <= memory_budget(hw) and peak + allocator_reserve_bytes(shape) <= usable_bytes(hw)


def micro_batch_step(mb: int) -> int:
    """The planner's micro-batches are multiples of this: even from 8 (an out-of-memory back-off halves them
    exactly), of 4 from 32 and of 8 from 64, so rounding down gives up at most about a ninth of the fit."""
    return 1 if mb < 8 else 2 if mb < 32 else 4 if mb < 64 else 8


def _fit_micro_batch(mc, cfg, hw, grad_ckpt: bool, cap: int, shards: int = 1, path=None) -> int:
    """Largest micro-batch (at most `cap`) that fits (`fits`), rounded down to a multiple of micro_batch_step;
    train.micro_batch is kept as given."""
    # one Shape, its micro-batch replaced: the bisection reads no config (a DictConfig read costs microseconds)
    shape = memory_shape(mc, cfg, hw, 1, grad_ckpt, shards, path)
    fit = lambda mb: fits(replace(shape, micro_batch=mb), hw)  # noqa: E731
    if cfg.train.micro_batch:
        return cap if fit(cap) else 0
    if not fit(1):
        return 0
    lo, hi = 1, cap  # fit(lo); peak memory grows with the micro-batch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fit(mid) else (lo, mid - 1)
    return lo - lo % micro_batch_step(lo)
