"""The resolver: from the hardware, the time budget and the data, decide the model and the batch.

Every derived field is filled once, here, with the reason for it; the plan is then frozen into the run
directory (plan.json) and a resumed run reuses it unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from ..errors import ConfigError
from ..model import ModelConfig
from .hardware import CUDA_CONTEXT_BYTES, Hardware
from .memory import Shape, count_params, predict_peak_bytes
from .speed import predict_tokens_per_s

TOKENS_PER_PARAM = 20  # Chinchilla's compute-optimal ratio
MAX_EPOCHS = 4  # repeated data is almost as good as fresh up to ~4 epochs (Muennighoff et al. 2023)
MAX_MICRO_BATCH = 2**16  # sequences; memory or the target batch binds long before
USABLE_MEMORY = 0.92  # plan to this share of the memory: headroom for fragmentation spikes
OVERHEAD_SHARE = 0.06  # of the budget kept for evaluation, checkpoints and start-up
ASPECT = 48  # preferred num_dims / num_layers: deep and thin for small models (MobileLLM)


@dataclass
class Plan:
    model: dict  # ModelConfig fields
    params: int
    active_params: int
    precision: str
    grad_ckpt: bool
    seq_len: int
    micro_batch: int
    grad_accum: int
    batch_tokens: int  # per optimizer step
    steps: int
    train_tokens: int
    lr: float
    time_budget_s: float
    predicted_tokens_per_s: float
    predicted_peak_bytes: int
    memory_breakdown: dict
    vram_bytes: int
    corpus_tokens: int
    data_fraction: float
    epochs: float
    binding_constraint: str  # what limits the plan: time | memory | data | mode | user
    hardware: dict
    reasons: dict = field(default_factory=dict)
    measured_tokens_per_s: float | None = None  # set once early in the run; steps re-planned from it
    world_size: int = 1  # data-parallel processes; batch_tokens and the speeds are totals over them

    def recalibrate(self, step: int, seconds_per_step: float, seconds_left: float, max_step_s: float | None = None):
        """Fit the schedule to the measured speed, so the run ends on time with its schedule complete; a step
        longer than max_step_s accumulates fewer micro-batches (a smaller batch) from here on."""
        if max_step_s and seconds_per_step > max_step_s and self.grad_accum > 1:
            accum = max(1, int(self.grad_accum * max_step_s / seconds_per_step))
            seconds_per_step *= accum / self.grad_accum
            self.batch_tokens = self.batch_tokens // self.grad_accum * accum
            self.reasons["batch"] += (f"; from step {step} {self.batch_tokens} tokens ({accum} accumulation "
                                      f"step(s)): a measured step took over {max_step_s:.1f} s")  # fmt: skip
            self.grad_accum = accum
        self.measured_tokens_per_s = self.batch_tokens / seconds_per_step
        steps = max(step + 1, step + int(seconds_left / seconds_per_step))
        self.reasons["steps"] = (f"{steps} steps: re-planned at step {step} from the measured "
                                 f"{self.measured_tokens_per_s:,.0f} tokens/s (predicted "
                                 f"{self.predicted_tokens_per_s:,.0f})")  # fmt: skip
        self.steps, self.train_tokens = steps, steps * self.batch_tokens
        self.epochs = self.train_tokens / max(1, self.data_fraction * self.corpus_tokens)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        return cls(**d)


def _shape(mc: dict, cfg, hw: Hardware, micro_batch: int, grad_ckpt: bool, shards: int = 1) -> Shape:
    moe_layers = sum(ModelConfig.from_dict(mc).is_moe_layer(i) for i in range(mc["num_layers"])) if mc["use_moe"] else 0
    return Shape(
        num_layers=mc["num_layers"], num_dims=mc["num_dims"], num_heads=mc["num_heads"],
        num_kv_heads=mc["num_kv_heads"], ffn_dims=mc["ffn_dims"], vocab_size=mc["vocab_size"],
        seq_len=mc["seq_len"], micro_batch=micro_batch, precision=hw.precision, grad_ckpt=grad_ckpt,
        chunked_loss=bool(cfg.optimizations.chunked_loss), loss_chunk_tokens=int(cfg.optimizations.loss_chunk_tokens),
        attention_math=cfg.attention.sdpa_backend == "math", moe_layers=moe_layers,
        compiled=bool(cfg.optimizations.compile) and hw.profile != "cpu",
        repeated_kv=hw.profile != "cpu" and (hw.precision == "fp32" or hw.compute_capability < 8.0),
        moe_num_experts=mc["moe_num_experts"] if moe_layers else 0,
        moe_active_experts=mc["moe_active_experts"] if moe_layers else 0,
        moe_expert_ffn_dims=mc["moe_expert_ffn_dims"] if moe_layers else 0,
        moe_shared_expert=bool(mc["moe_shared_expert"]) and moe_layers > 0, shards=shards,
    )  # fmt: skip


def kv_heads_for(num_heads: int, attention) -> int:
    """The divisor of num_heads whose group size is nearest the attention option's heads_per_kv_head."""
    per = int(attention.heads_per_kv_head)
    if per == 0:
        return 1  # mqa
    divisors = [k for k in range(1, num_heads + 1) if num_heads % k == 0]
    return min(divisors, key=lambda k: (abs(math.log(num_heads / k / per)), -k))


def model_dict(cfg, num_layers: int, num_dims: int, vocab_size: int, seq_len: int) -> dict:
    spec, moe = cfg.model, cfg.moe
    num_heads = spec.num_heads or max(1, num_dims // int(cfg.attention.head_dim))
    mc = ModelConfig(
        num_layers=num_layers, num_dims=num_dims, num_heads=num_heads,
        num_kv_heads=spec.num_kv_heads or kv_heads_for(num_heads, cfg.attention),
        vocab_size=vocab_size, seq_len=seq_len, ffn_dims=spec.ffn_dims, rope_theta=spec.rope_theta,
        norm_eps=spec.norm_eps, init_std=spec.init_std, use_moe=bool(moe.enabled),
        moe_num_experts=moe.num_experts, moe_active_experts=moe.active_experts,
        use_lossfreebalance=bool(moe.lossfree_balance), moe_bias_update_rate=moe.bias_update_rate,
        moe_aux_loss_alpha=moe.aux_loss_alpha, moe_shared_expert=bool(moe.shared_expert),
        moe_every_n_layers=moe.every_n_layers, moe_first_dense_layers=moe.first_dense_layers,
        moe_score_func=moe.score_func, moe_expert_ffn_dims=moe.expert_ffn_dims,
    )  # fmt: skip
    return mc.to_dict()


def _candidates(cfg, relaxed: bool = False) -> list[tuple[int, int]]:
    """Shapes within the mode's bounds; relaxed: anything smaller too (when physics forbids the bounds)."""
    mode, spec = cfg.mode, cfg.model
    min_layers, min_dims = (1, 64) if relaxed else (mode.min_layers, mode.min_dims)
    layers = [spec.num_layers] if spec.num_layers else list(range(min_layers, mode.max_layers + 1))
    step = 128 if min_dims >= 256 else 64  # multiples of 128 keep head counts easy to group
    dims = [spec.num_dims] if spec.num_dims else list(range(min_dims, mode.max_dims + 1, step))
    return [(L, d) for L in layers for d in dims]


def memory_budget(hw: Hardware) -> int:
    """The bytes a plan may fill: the device's memory less the CUDA context (on a GPU), at USABLE_MEMORY."""
    return int((hw.vram_bytes - (CUDA_CONTEXT_BYTES if hw.profile != "cpu" else 0)) * USABLE_MEMORY)


def micro_batch_step(mb: int) -> int:
    """The planner's micro-batches are multiples of this: even from 8 (an out-of-memory back-off halves them
    exactly), of 4 from 32 and of 8 from 64, so rounding down gives up at most about a ninth of the fit."""
    return 1 if mb < 8 else 2 if mb < 32 else 4 if mb < 64 else 8


def _fit_micro_batch(mc, cfg, hw, budget_bytes: int, grad_ckpt: bool, cap: int, shards: int = 1) -> int:
    """Largest micro-batch (at most `cap`) whose predicted peak fits, rounded down to a multiple of
    micro_batch_step; train.micro_batch is kept as given."""
    fits = lambda mb: predict_peak_bytes(_shape(mc, cfg, hw, mb, grad_ckpt, shards)).total <= budget_bytes  # noqa: E731
    if cfg.train.micro_batch:
        return cap if fits(cap) else 0
    if not fits(1):
        return 0
    lo, hi = 1, cap  # fits(lo); peak memory grows with the micro-batch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo - lo % micro_batch_step(lo)


def make_plan(cfg, hw: Hardware, vocab_size: int, corpus_tokens: int, world_size: int = 1) -> Plan:
    mode, train, opt = cfg.mode, cfg.train, cfg.optimizations
    reasons: dict[str, str] = {}
    if mode.target_hours <= 0:
        raise ConfigError(f"mode.target_hours={mode.target_hours} must be positive (hours of training)")
    if mode.target_hours > 24 * 30:
        raise ConfigError(f"mode.target_hours={mode.target_hours} is more than 30 days; give hours, e.g. 2.5")
    if mode.min_hours and mode.target_hours < mode.min_hours or mode.max_hours and mode.target_hours > mode.max_hours:
        reasons["mode"] = (f"{mode.target_hours} h is outside mode={mode.name}'s band "
                           f"({mode.min_hours}-{mode.max_hours or 'inf'} h); its shape bounds still apply")  # fmt: skip
    budget_s = mode.target_hours * 3600
    vocab = cfg.model.vocab_size or vocab_size
    seq_len = cfg.model.seq_len or mode.seq_len
    on_gpu = hw.profile != "cpu"  # a GPU profile planned on a CPU-only machine is planned as that GPU
    mem_budget = memory_budget(hw)
    ckpt_policy = opt.grad_ckpt
    if ckpt_policy not in ("never", "auto", "always"):
        raise ConfigError(f"optimizations.grad_ckpt={ckpt_policy!r}; allowed: never, auto, always")
    compute_s = budget_s * (1 - OVERHEAD_SHARE)
    # FSDP2 splits weights, gradients and AdamW state across the ranks: each GPU holds 1/shards of them
    shards = world_size if train.get("parallel", "ddp") == "fsdp2" else 1

    def score_candidates(relaxed: bool) -> list:
        scored = []
        for L, d in _candidates(cfg, relaxed):
            mc = model_dict(cfg, L, d, vocab, seq_len)
            for ckpt in {"never": [False], "always": [True], "auto": [False, True]}[ckpt_policy]:
                mb = _fit_micro_batch(mc, cfg, hw, mem_budget, ckpt, train.micro_batch or MAX_MICRO_BATCH, shards)
                if mb == 0:
                    continue
                shape = _shape(mc, cfg, hw, mb, ckpt, shards)
                tps = predict_tokens_per_s(shape, hw.peak_flops, hw.mfu, on_gpu, bandwidth=hw.bandwidth) * world_size
                tokens = tps * compute_s
                n = count_params(shape)
                wanted = min(TOKENS_PER_PARAM * n, MAX_EPOCHS * corpus_tokens)  # data-limited: grow the model
                score = abs(math.log(tokens / wanted)) + 0.15 * abs(math.log(d / L / ASPECT))
                scored.append((score, L, d, ckpt, mb, mc, shape, tps, tokens, wanted))
                break  # checkpointing only when the plain step does not fit
        return scored

    scored = score_candidates(relaxed=False)
    best = min(scored, key=lambda r: r[0]) if scored else None
    undertrained = best is not None and best[8] < count_params(best[6])  # under one token per parameter
    if best is None or undertrained:
        smallest = _candidates(cfg)[0]
        if best is None:
            need = predict_peak_bytes(_shape(model_dict(cfg, *smallest, vocab, seq_len), cfg, hw, 1, True, shards)).total
            why = (f"mode={mode.name}'s smallest shape ({smallest[0]} x {smallest[1]}) needs about "
                   f"{need / 2**30:.2f} GiB at micro-batch 1; gpu={hw.profile} leaves {mem_budget / 2**30:.2f} GiB")
        else:
            why = (f"in {mode.target_hours} h gpu={hw.profile} processes about {best[8] / 1e6:.1f}M tokens: "
                   f"under one token per parameter of mode={mode.name}'s smallest shape")
        relaxed = score_candidates(relaxed=True)
        if relaxed and not (cfg.model.num_layers and cfg.model.num_dims):
            scored = relaxed
            reasons["outside_mode"] = why + "; planned below the mode's bounds instead"
    if not scored:
        smallest = _candidates(cfg, relaxed=True)[0]
        micro = train.micro_batch or 1
        need = predict_peak_bytes(_shape(model_dict(cfg, *smallest, vocab, seq_len), cfg, hw, micro, True, shards)).total
        fix = "a smaller train.micro_batch (or null: the largest that fits)" if train.micro_batch else \
            "a smaller mode, a shorter model.seq_len, or optimizations=lean"  # fmt: skip
        raise ConfigError(
            f"even {smallest[0]} layer(s) of {smallest[1]} dims at micro-batch {micro} needs about "
            f"{need / 2**30:.2f} GiB but gpu={hw.profile} leaves {mem_budget / 2**30:.2f} GiB; choose {fix}"
        )
    _, L, d, ckpt, mb, mc, shape, tps, tokens, wanted = min(scored, key=lambda r: r[0])
    if L >= cfg.mode.min_layers and d >= cfg.mode.min_dims:  # the relaxed search chose a shape inside the bounds
        reasons.pop("outside_mode", None)
    n, n_active = count_params(shape), count_params(shape, active=True)

    fixed = [k for k in ("num_layers", "num_dims") if cfg.model[k]]
    reasons["shape"] = (
        f"{L} layers x {d} dims ({n / 1e6:.2f}M parameters): {'set by you (' + ', '.join(fixed) + ')' if fixed else ''}"
        f"{'' if fixed else 'the shape within mode bounds whose budget of tokens is closest to ' + str(TOKENS_PER_PARAM) + ' per parameter'}"
        f"; the budget gives {tokens / 1e6:.1f}M tokens, compute-optimal would be {TOKENS_PER_PARAM * n / 1e6:.1f}M"
    )
    reasons["heads"] = (f"{mc['num_heads']} heads of {mc['num_dims'] // mc['num_heads']} dims, "
                        f"{mc['num_kv_heads']} kv heads (attention={cfg.attention.name})")  # fmt: skip
    if ckpt:
        reasons["grad_ckpt"] = "on: " + ("optimizations asks for it always" if ckpt_policy == "always"
                                         else "the step does not fit in memory without it")  # fmt: skip
    # batch: big enough for a stable gradient, small enough for a few hundred optimizer steps at least
    if train.batch_tokens:
        target = int(train.batch_tokens)
        reasons["batch"] = f"{target} tokens per step: set by you"
    else:
        cap = 2**19 if n > 100e6 else 2**18
        target = 2 ** int(math.log2(max(tokens / 300, seq_len)))
        target = max(seq_len, min(cap, target))
        reasons["batch"] = f"{target} tokens per step: about {tokens / 300:.0f} gives >= 300 steps (capped at {cap})"
    micro = min(mb, max(1, target // (seq_len * world_size)))
    accum = max(1, round(target / (micro * seq_len * world_size)))
    batch_tokens = micro * seq_len * accum * world_size  # over all data-parallel ranks
    how = " (set by you)" if train.micro_batch and micro == mb else " (the largest that fits)" if micro == mb else ""
    reasons["micro_batch"] = f"{micro} x {seq_len} tokens per forward{how}, {accum} accumulation step(s)"

    if train.max_steps:
        steps = int(train.max_steps)
        binding = "user"
        reasons["steps"] = f"{steps} steps: set by train.max_steps (the time budget then only reports)"
    else:
        steps = max(1, int(tokens // batch_tokens))
        binding = "time"
        reasons["steps"] = f"{steps} steps: what the predicted {tps:,.0f} tokens/s covers in {compute_s / 3600:.3f} h"
    train_tokens = steps * batch_tokens

    # data: the share of the corpus the run draws from
    # the loader cuts windows of seq_len + 1 tokens and needs at least one micro-batch of them
    want_fraction = max(train_tokens, micro * (seq_len + 1) + 1) / max(1, corpus_tokens)
    fraction = min(1.0, max(mode.min_data_fraction, want_fraction))
    epochs = train_tokens / max(1, fraction * corpus_tokens)
    reasons["data"] = f"{fraction:.1%} of {corpus_tokens / 1e6:.1f}M corpus tokens, {epochs:.2f} epoch(s)"
    if want_fraction > mode.max_data_fraction and fraction > mode.max_data_fraction:
        reasons["data"] += f" (above mode={mode.name}'s {mode.max_data_fraction:.0%}: the budget can use more)"
    if epochs > MAX_EPOCHS:
        binding = "data" if binding == "time" else binding
        reasons["data"] += f"; more than {MAX_EPOCHS} epochs: the data, not the time, limits this run"
    if "outside_mode" in reasons:
        binding = "memory" if "GiB" in reasons["outside_mode"] else "time"
    elif binding == "time" and not fixed and (L, d) == (cfg.mode.max_layers, cfg.mode.max_dims) and tokens > wanted:
        binding = "mode"
        reasons["binding"] = f"the largest shape mode={mode.name} allows; the budget could train a bigger one"
    elif binding == "time" and ckpt and ckpt_policy == "auto":
        binding = "memory"
    # planned with the gradients alive all step (safe); reported as the run will hold them
    peak = predict_peak_bytes(replace(shape, micro_batch=micro, grads_in_forward=accum > 1))
    lr = float(cfg.optim.lr) if cfg.optim.lr else min(3e-3, 6e-4 * 768 / d)
    reasons["lr"] = f"{lr:.2e}: " + ("set by you" if cfg.optim.lr else "6e-4 at 768 dims, scaled by 1/width, capped at 3e-3")
    reasons["memory"] = (f"predicted peak {peak.total / 2**30:.2f} GiB of {hw.vram_bytes / 2**30:.2f} GiB "
                         f"({'emulated ' if hw.emulated else ''}{hw.profile})")  # fmt: skip
    if shards > 1:
        reasons["memory"] += f" per GPU: weights, gradients and AdamW state sharded over {shards} (FSDP2)"
    return Plan(
        model=mc, params=n, active_params=n_active, precision=hw.precision, grad_ckpt=ckpt, seq_len=seq_len,
        micro_batch=micro, grad_accum=accum, batch_tokens=batch_tokens, steps=steps, train_tokens=train_tokens,
        lr=lr, time_budget_s=budget_s, predicted_tokens_per_s=tps, predicted_peak_bytes=peak.total,
        memory_breakdown=peak.to_dict(), vram_bytes=hw.vram_bytes, corpus_tokens=corpus_tokens,
        data_fraction=fraction, epochs=epochs, binding_constraint=binding, hardware=hw.to_dict(), reasons=reasons,
        world_size=world_size,
    )  # fmt: skip
