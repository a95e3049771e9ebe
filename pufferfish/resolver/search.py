"""The shape search: every shape the mode allows and every smaller one, weighed by the tokens the budget
buys on the card and the loss the data-constrained scaling law (resolver/scaling.py) predicts for them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .capabilities import card_path
from .hardware import Hardware
from .memory import Shape, count_params
from .scaling import TOKEN_WORTH, epochs_worth_training, predicted_loss
from .shapes import (
    MAX_MICRO_BATCH,
    _candidates,
    _fit_micro_batch,
    grad_ckpt_for,
    memory_shape,
    model_dict,
)
from .speed import compile_seconds, predict_tokens_per_s, with_optimizer_step

MAX_EPOCHS = epochs_worth_training()  # ~22: another epoch would be worth under a quarter of fresh text
ASPECT = 48  # preferred num_dims / num_layers: deep and thin for small models (MobileLLM)
ASPECT_WEIGHT = 0.02  # share of the predicted loss added per e-fold away from ASPECT (the law is blind to shape)
# where the law is indifferent (excess parameters saturate as repeated data does), spend the hours the user
# gave on a larger model rather than end early: the share of the loss added per unused share of the budget
UNUSED_WEIGHT = 0.02
OUTSIDE_MODE_GAIN = 0.02  # a shape outside the mode's bounds must predict a loss this much lower to be chosen
# optimizer steps a run should get at least (the batch is sized for it), whatever the optimizer: on one H100 a
# Muon plan given half of them (a batch twice AdamW's, as the CPU's batch sweep suggested) lost to AdamW at 8 x 512
# in 60 s, 2.061 against 1.823, where at 6 x 384 with AdamW's batch it was 0.46 below at equal steps (docs/benchmarks.md
# "Candidates on the default corpus")
MIN_STEPS = 300
# on the CPU, whose tokens/s does not grow with the batch (the speed model's and pufferfish.lab.cpu_speed's),
# more and smaller steps cost nothing: at equal tokens 1,170 steps beat 585 and 293 (docs/benchmarks.md)
CPU_MIN_STEPS = 1000
MIN_STEPS_PER_EPOCH = 32  # with little data: small batches, so every pass over it makes many updates
# the largest batch (tokens a step) for a model of up to 100M parameters, by optimizer: on one H100, each plan for
# 300 s on the default corpus, AdamW handed over 1.251 at 65,536 against 1.314 at 262,144, Muon 1.231 at 131,072
# against 1.257 at both 65,536 and 262,144 (docs/benchmarks.md "Batch on the GPU"); GPU speed barely moves across
# these batches. Larger models keep 2^19 (not measured here).
SMALL_MODEL_BATCH_CAP = {"adamw": 2**16, "muon": 2**17}
LARGE_MODEL_BATCH_CAP = 2**19
# a plan's batch goes above its cap while the speed model predicts twice the batch this much faster: a model too
# small to fill the GPU (1 x 64 on an H100) needs large micro-batches for its speed
CAP_SPEEDUP = 1.05


@dataclass
class Candidate:
    """One shape as the planner weighs it: what fits, how fast, and what the scaling law predicts."""

    layers: int
    dims: int
    grad_ckpt: bool
    fit_micro_batch: int  # the largest micro-batch that fits
    micro_batch: int  # as planned for the target batch
    target_batch: int  # tokens per optimizer step
    model: dict
    shape: Shape
    params: int
    tokens_per_s: float
    seconds: float  # of the budget the steps run for: less a compiled step's compilation
    tokens: float  # what the run trains on: the budget's tokens, at most MAX_EPOCHS of the data
    loss: float  # the law's loss on this corpus
    loss_unlimited: float  # the same with unlimited fresh data
    inside: bool  # within the mode's shape bounds

    @property
    def time_tokens(self) -> float:
        """What the budget could process: the steps' seconds at this speed."""
        return self.tokens_per_s * self.seconds

    def score(self, loss: float) -> float:
        aspect = abs(math.log(self.dims / self.layers / ASPECT))
        # of the budget, when the data's epochs end the run first (all of it where compiling would take it all)
        unused = 1 - self.tokens / self.time_tokens if self.time_tokens else 1.0
        return loss * (1 + ASPECT_WEIGHT * aspect + UNUSED_WEIGHT * unused + (0 if self.inside else OUTSIDE_MODE_GAIN))


def min_steps_for(hw: Hardware) -> tuple[int, str]:
    """The steps a plan's batch is sized to give at least, and why when not the usual: more on the CPU, where
    smaller batches run as fast."""
    if hw.profile == "cpu":
        return CPU_MIN_STEPS, "the CPU: smaller batches run as fast"
    return MIN_STEPS, ""


def batch_cap(params: int, optimizer: str) -> int:
    """The largest batch a plan gives, in tokens a step: past it more steps beat larger ones (see above)."""
    small = SMALL_MODEL_BATCH_CAP.get(optimizer, SMALL_MODEL_BATCH_CAP["adamw"])
    return LARGE_MODEL_BATCH_CAP if params > 100e6 else small


def target_batch_tokens(tokens: float, unique: float, seq_len: int, world_size: int, min_steps: int = MIN_STEPS,
                        cap: int = LARGE_MODEL_BATCH_CAP) -> int:  # fmt: skip
    """Tokens per step: a power of two giving >= min_steps steps in the budget and, with little data,
    >= MIN_STEPS_PER_EPOCH steps per epoch; at most `cap`."""
    want = min(tokens / min_steps, unique / MIN_STEPS_PER_EPOCH)
    target = 2 ** int(math.log2(max(want, seq_len * world_size)))
    return max(seq_len * world_size, min(cap, target))


def _weigh(cfg, hw: Hardware, L: int, d: int, ckpt: bool, mb: int, mc: dict, compute_s: float, unique: float,
           world_size: int, shards: int, path) -> Candidate:  # fmt: skip
    seq_len, on_gpu = mc["seq_len"], hw.profile != "cpu"

    def speed(s: Shape) -> float:
        return predict_tokens_per_s(s, hw.peak_flops, hw.mfu, on_gpu, bandwidth=hw.bandwidth) * world_size

    shape = memory_shape(mc, cfg, hw, mb, ckpt, shards, path)
    n = count_params(shape)
    tps = speed(shape)
    seconds = max(0.0, compute_s - (compile_seconds(L) if path.inductor else 0.0))  # the steps' share of the budget

    def speed_at(batch: int) -> float:
        return speed(memory_shape(mc, cfg, hw, min(mb, max(1, batch // (seq_len * world_size))), ckpt, shards, path))

    if cfg.train.batch_tokens:
        target = int(cfg.train.batch_tokens)
    else:
        roof = target_batch_tokens(tps * seconds, unique, seq_len, world_size, min_steps_for(hw)[0])
        target = max(seq_len * world_size, min(roof, batch_cap(n, cfg.optim.name)))
        # the cap buys steps where they cost no speed: above it while twice the batch runs CAP_SPEEDUP faster
        while target < roof and speed_at(2 * target) > CAP_SPEEDUP * speed_at(target):
            target *= 2
    micro = min(mb, max(1, target // (seq_len * world_size)))
    if micro != mb:  # a smaller micro-batch than fits: the speed at the one that will run
        tps = speed_at(target)
    tps = with_optimizer_step(tps, shape, target, hw.peak_flops, hw.mfu)
    # the budget's tokens, but no more epochs than are worth training: past them the run ends, schedule complete
    time_tokens = tps * seconds
    tokens = min(time_tokens, MAX_EPOCHS * unique)
    # the law counts the blocks' (active) parameters: a small model's embedding table is most of its
    # parameters but little of what it can learn (Kaplan et al. 2020 fit non-embedding counts)
    n_law = count_params(shape, active=True) - mc["vocab_size"] * d
    mode, spec = cfg.mode, cfg.model
    inside = bool(spec.num_layers or mode.min_layers <= L) and bool(spec.num_dims or mode.min_dims <= d)
    k = TOKEN_WORTH.get(shape.optimizer, 1.0)  # the optimizer's tokens, in the law's (AdamW's)
    return Candidate(L, d, ckpt, mb, micro, target, mc, shape, n, tps, seconds, tokens,
                     predicted_loss(n_law, k * tokens, k * unique), predicted_loss(n_law, k * time_tokens),
                     inside)  # fmt: skip


def _search(cfg, hw: Hardware, vocab: int, seq_len: int, compute_s: float, unique: float, world_size: int,
            shards: int, path=None, shapes: list[tuple[int, int]] | None = None) -> list[Candidate]:  # fmt: skip
    """Every shape the mode allows, and every smaller one (or only `shapes`, layers x dims), at the largest
    micro-batch that fits, on `path` (the card's step, card_path's: the same for every shape)."""
    path = path or card_path(cfg, hw)
    cap = cfg.train.micro_batch or MAX_MICRO_BATCH
    out = []
    for L, d in shapes or _candidates(cfg, relaxed=True):
        mc = model_dict(cfg, L, d, vocab, seq_len)
        ckpt = grad_ckpt_for(mc, cfg, hw, cfg.train.micro_batch or 1, shards, path)  # only when needed to fit
        mb = _fit_micro_batch(mc, cfg, hw, ckpt, cap, shards, path)
        if mb:
            out.append(_weigh(cfg, hw, L, d, ckpt, mb, mc, compute_s, unique, world_size, shards, path))
    return out


def _choose(cands: list[Candidate], loss) -> tuple[Candidate, Candidate | None]:
    """The best shape by `loss` (a Candidate's field), and the best within the mode's bounds (None if none
    fits). A shape outside the bounds must beat the best inside by OUTSIDE_MODE_GAIN; shapes trained on at
    least a token per parameter are preferred whenever one exists."""

    def best_of(group):
        trained = [c for c in group if c.tokens >= c.params] or group
        return min(trained, key=lambda c: c.score(getattr(c, loss))) if trained else None

    def rank(c: Candidate) -> tuple:
        return c.tokens < c.params, c.score(getattr(c, loss))  # an undertrained shape loses to any other

    inside = best_of([c for c in cands if c.inside])
    overall = best_of(cands)
    if inside is not None and rank(inside) <= rank(overall):
        overall = inside
    return overall, inside
