"""The resolver: from the hardware, the time budget and the data, decide the model and the batch.

Every derived field is filled once, here, with the reason for it; the plan is then frozen into the run
directory (plan.json) and a resumed run reuses it unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from omegaconf import OmegaConf

from ..errors import ConfigError
from ..model import ModelConfig
from ..optim import MUON_LR, MUON_MOMENTUM
from .capabilities import CardPath, card_path
from .hardware import Hardware
from .memory import allocator_reserve_bytes, count_params, muon_params, predict_peak_bytes
from .scaling import TOKEN_WORTH, TOKENS_PER_PARAM, effective_tokens
from .search import (
    CAP_SPEEDUP,
    MAX_EPOCHS,
    MIN_STEPS_PER_EPOCH,
    OUTSIDE_MODE_GAIN,
    Candidate,
    _choose,
    _search,
    batch_cap,
    min_steps_for,
)
from .shapes import _candidates, heads_reason, memory_budget, memory_shape, model_dict, optimizer_name
from .speed import compile_seconds

OPTIMIZER_KEYS = ("name", "weight_decay", "beta1", "beta2")  # of the optim group: what build_optimizer reads
SCHEDULE_KEYS = ("schedule", "warmup_frac", "min_lr_ratio", "decay_frac")  # and what schedule.lr_at reads
# what a plan.json written before these were kept ran with (the optim group's defaults of that time)
OPTIMIZER_DEFAULTS = {"name": "adamw", "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95}
SCHEDULE_DEFAULTS = {"schedule": "cosine", "warmup_frac": 0.05, "min_lr_ratio": 0.1, "decay_frac": 0.2}
ADAMW_LR_CAP = 3e-3  # AdamW's width rule, 6e-4 at 768 dims scaled by 1/width, goes no higher
# the AdamW part beside Muon (the embedding, which is also the output head, and the norms): the cap at every width;
# at 512 dims it handed over lower than the rule's 9e-4 (docs/benchmarks.md, "The default recipe")
MUON_ADAMW_LR = ADAMW_LR_CAP
# optim.name=auto: Muon where its plan reads the data at most this many times, AdamW beyond. On an H100 Muon handed
# over lower at 0.5-2.5 passes of the default corpus, AdamW on Shakespeare read many times, where Muon's best came
# at 4.5 passes and it then overfit, AdamW's later and lower; on the CPU (scripts/optimizer_passes.sh) Muon handed
# over 0.13 lower at 4.2 passes and the two were level at 5.3-13 (docs/benchmarks.md, "The optimizer by passes")
MUON_MAX_EPOCHS = 5.0
OVERHEAD_SHARE = 0.06  # of the budget kept for evaluation, checkpoints and start-up (compiling counted apart)
EVALS_PER_RUN = 20  # validation cadence: the best weights are kept, so finer evaluation finds them better
EVAL_SHARE = 0.05  # of the budget that all evaluations together may take
FINAL_EVAL_SHARE = 0.02  # and the final one, of the handed-over weights on the whole validation set
MIN_EVAL_SEQS = 8  # a run of fixed steps evaluates on no fewer sequences than this, however short it is
EARLY_STOP_EVALS = 3  # evaluations in a row that end above the best by EARLY_STOP_RISE before a run stops
EARLY_STOP_RISE = 0.01  # relative: 1 % above the best loss seen


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
    eval_interval: int = 0  # steps between evaluations (0: about EVALS_PER_RUN a run)
    eval_tokens: int = 65536  # validation tokens each evaluation reads
    final_eval_tokens: int = 65536  # and the final one
    early_stop_evals: int = 0  # stop after this many evaluations in a row above the best (0: never)
    early_stop_rise: float = EARLY_STOP_RISE
    predicted_loss: float = 0.0  # the scaling law's loss for the plan (its units, for comparing plans)
    limits: dict = field(default_factory=dict)  # what the hours allow, what the data allows, which binds
    # the card's path (resolver/capabilities.py), which the loop runs: plan.reasons says why each
    compile: bool = False
    compile_backend: str = "inductor"
    attention_kernel: str = "auto"
    fused_adamw: bool = False
    tf32: bool = False
    # the rest of what the loop runs, from the optim and optimizations groups: the loop reads the plan alone
    optimizer: dict = field(default_factory=lambda: dict(OPTIMIZER_DEFAULTS))  # name, weight_decay, betas (muon_lr)
    schedule: dict = field(default_factory=lambda: dict(SCHEDULE_DEFAULTS))  # lr schedule: schedule.lr_at's
    grad_clip: float = 1.0
    chunked_loss: bool = False
    loss_chunk_tokens: int = 4096
    prefetch_batches: int = 2
    ddp_graphs: str = "whole"
    # what changed during the run, in order: {"step", "kind", "why", and the new values}; plan.json keeps them
    revisions: list = field(default_factory=list)

    def revise(self, step: int, kind: str, why: str, **changes) -> dict:
        """Record a change made during the run (the fields are already set); returns the record, for the log."""
        record = {"kind": kind, "step": step, "why": why, **changes}
        self.revisions.append(record)
        return record

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
        data_steps = max(step + 1, self.limits.get("max_tokens", 0) // self.batch_tokens)
        self.reasons["steps"] = (f"{min(steps, data_steps)} steps: re-planned at step {step} from the measured "
                                 f"{self.measured_tokens_per_s:,.0f} tokens/s (predicted "
                                 f"{self.predicted_tokens_per_s:,.0f})"
                                 + (f"; the data's {MAX_EPOCHS:.0f} epochs end it first" if data_steps < steps else ""))
        self.set_steps(min(steps, data_steps) if self.limits.get("max_tokens") else steps)
        speed, each = self.measured_tokens_per_s, EVAL_SHARE / EVALS_PER_RUN
        work = self.time_budget_s * speed  # the tokens the whole budget trains on at the measured speed
        self.eval_tokens = eval_tokens_for(self.eval_tokens, work, self.seq_len, each)
        self.final_eval_tokens = eval_tokens_for(self.final_eval_tokens, work, self.seq_len, FINAL_EVAL_SHARE)
        self._restate()

    def set_steps(self, steps: int) -> None:
        """A re-planned number of steps (every rank calls it with the same number): the evaluation cadence
        follows, and the share of the corpus grows to feed the new steps fresh text, never shrinks (a loader
        drawing from it is rebuilt where it changes)."""
        self.steps, self.train_tokens = steps, steps * self.batch_tokens
        self.data_fraction = min(1.0, max(self.data_fraction, self.train_tokens / max(1, self.corpus_tokens)))
        self.epochs = self.train_tokens / max(1, self.data_fraction * self.corpus_tokens)
        if not self.reasons.get("eval", "").endswith("set by you"):
            self.eval_interval = max(1, steps // EVALS_PER_RUN)
        self._restate()

    def _restate(self) -> None:
        """The data and evaluation reasons say the re-planned values (what follows them stays)."""
        if "data" in self.reasons:
            _, sep, rest = self.reasons["data"].partition(" (")
            self.reasons["data"] = data_reason(self.data_fraction, self.corpus_tokens, self.epochs) + sep + rest
        if "eval" in self.reasons:
            by_you = self.reasons["eval"].endswith("set by you")
            self.reasons["eval"] = eval_reason(self.eval_interval, self.eval_tokens, by_you)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, cfg=None) -> Plan:
        """A plan.json read back; with `cfg`, what a plan.json from before the plan kept the loop's settings
        lacks is taken from the config it resumes with, not from the schema's defaults."""
        plan = cls(**({**loop_settings(cfg), **d} if cfg is not None else d))
        if not plan.eval_interval:  # a plan.json written before evaluations were planned
            plan.eval_interval = max(1, plan.steps // EVALS_PER_RUN)
        return plan


def data_reason(fraction: float, unique: int, epochs: float) -> str:
    return f"{fraction:.1%} of {unique / 1e6:.2f}M corpus tokens, {epochs:.2f} epoch(s)"


def eval_reason(interval: int, tokens: int, by_you: bool) -> str:
    return (f"every {interval} steps on {tokens:,} validation tokens; the best weights are kept"
            + ("; set by you" if by_you else ""))  # fmt: skip


def loop_settings(cfg) -> dict:
    """What the loop runs beyond the shape, from the optim and optimizations groups (Muon's lr is planned). Under
    optim.name=auto, for a plan.json that lacks them, AdamW: such a plan was made before Muon existed."""
    optimizer = {k: cfg.optim[k] for k in OPTIMIZER_KEYS}
    if optimizer["name"] == "auto":
        optimizer["name"] = OPTIMIZER_DEFAULTS["name"]
    return {"optimizer": optimizer, "schedule": {k: cfg.optim[k] for k in SCHEDULE_KEYS},
            "grad_clip": float(cfg.optim.grad_clip), "chunked_loss": bool(cfg.optimizations.chunked_loss),
            "loss_chunk_tokens": int(cfg.optimizations.loss_chunk_tokens),
            "prefetch_batches": int(cfg.optimizations.prefetch_batches),
            "ddp_graphs": str(cfg.optimizations.ddp_graphs)}  # fmt: skip


def lr_for(cfg, optimizer: str, dims: int) -> tuple[float, str]:
    """The schedule's peak learning rate (AdamW's, or under Muon its AdamW part's: the embedding and norms), and
    the reason."""
    if cfg.optim.lr:
        lr, why = float(cfg.optim.lr), "set by you"
    elif optimizer == "muon":
        lr, why = MUON_ADAMW_LR, ("the embedding and norms beside Muon, at every width (AdamW's width rule's cap): "
                                  "at 512 dims on an H100 it handed over lower than the rule's 9e-4")  # fmt: skip
    else:
        lr, why = min(ADAMW_LR_CAP, 6e-4 * 768 / dims), f"6e-4 at 768 dims, scaled by 1/width, capped at {ADAMW_LR_CAP:g}"
    return lr, f"{lr:.2e}: {why}"


def muon_lr_for(cfg, lr: float, shape) -> tuple[float, str]:
    """Muon's learning rate for the hidden matrices, and the reason; AdamW keeps `lr` for the rest."""
    muon_lr = float(cfg.optim.muon_lr or MUON_LR)
    why = "set by you (optim.muon_lr)" if cfg.optim.muon_lr else \
        "Muon's own scale (modded-nanogpt's), best of 0.01/0.02/0.04 at both widths of `make sweep-lr`"  # fmt: skip
    return muon_lr, (f"Muon for {muon_params(shape) / 1e6:.2f}M parameters (the blocks' attention and MLP matrices) "
                     f"at {muon_lr:.2e}, {why}, times sqrt(rows/cols) for a tall matrix (torch.optim.Muon's "
                     f"'original' adjustment); momentum {MUON_MOMENTUM}, Nesterov; AdamW at {lr:.2e} for the "
                     f"embedding and norms; Muon's weight decay scaled so that a step shrinks the matrices by "
                     f"lr x {cfg.optim.weight_decay}, as AdamW's does")  # fmt: skip


def eval_tokens_for(wanted: int, train_tokens: float, floor: int, share: float) -> int:
    """Validation tokens (at most `wanted`, at least `floor`) whose forward, ~1/3 of a training step's work per
    token, is `share` of the work of training on `train_tokens` (the budget's, or a fixed-step run's own)."""
    return int(min(wanted, max(floor, share * 3 * train_tokens)))


SOURCE_BYTES_PER_TOKEN = 4.0  # Python source per token at 8192 pieces: 3.1-3.2 measured (stdlib, pysource), and a margin


def corpus_mb_wanted(cfg, hw: Hardware, world_size: int = 1) -> float:
    """The most text the budget can use: what the best plan would read were data unlimited, in MB of Python
    source, rounded up to a power of two (budgets close together share one prepared corpus)."""
    unlimited = make_plan(cfg, hw, cfg.model.vocab_size or 8192, 10**13, world_size)
    mb = unlimited.limits["hours_tokens"] * SOURCE_BYTES_PER_TOKEN / 2**20
    return float(2 ** max(3, math.ceil(math.log2(max(mb, 1)))))


def weigh_compile(path: CardPath, compiled: list[Candidate], eager_search: Callable[..., list[Candidate]],
                  budget_s: float) -> tuple[CardPath, list[Candidate]]:  # fmt: skip
    """Compile only where it pays within the budget. A compiled step runs faster (fused kernels, where the GPU,
    not the host, is the bound) but its steps start after the compilation (speed.compile_seconds, from a cold
    cache). On the shape the compiled step's plan would choose, eager is chosen if it trains more tokens in the
    budget (where the data's epochs end both runs early they train the same, and the compiled one ends sooner);
    the shape is then chosen again for the eager step. `eager_search(shapes)` weighs those shapes (None: all) on
    the eager step. The path and the candidates of the step chosen, its compile reason saying why."""
    c = _choose(compiled, "loss")[0] if compiled else None
    e = next(iter(eager_search([(c.layers, c.dims)])), None) if c else None
    if e is None:  # nothing fits compiled, or this shape only compiled (it keeps less): nothing to weigh
        return path, compiled
    versus = (f"{c.layers} x {c.dims} trains {c.tokens / 1e6:.1f}M tokens compiled, after about "
              f"{compile_seconds(c.layers):.0f} s of compiling (a cold cache), and {e.tokens / 1e6:.1f}M eager")
    if e.tokens > c.tokens:
        return path.eager(f"eager: in a {budget_s:.0f} s budget compiling does not pay: {versus}"), eager_search(None)
    return replace(path, reasons={**path.reasons, "compile": f"{path.reasons['compile']}; it pays in the "
                                                             f"{budget_s:.0f} s budget: {versus}"}), compiled


def make_plan(cfg, hw: Hardware, vocab_size: int, corpus_tokens: int, world_size: int = 1,
              val_tokens: int | None = None) -> Plan:  # fmt: skip
    """The plan for `cfg` on `hw`; under optim.name=auto, Muon's plan, or AdamW's where Muon's would read the data
    more than MUON_MAX_EPOCHS times (its reasons say which and why)."""
    if optimizer_name(cfg) != "auto":
        return plan_with_optimizer(cfg, hw, vocab_size, corpus_tokens, world_size, val_tokens)
    muon = plan_with_optimizer(with_optimizer(cfg, "muon"), hw, vocab_size, corpus_tokens, world_size, val_tokens)
    passes = f"Muon's plan reads the data {muon.epochs:.1f} times"
    if muon.epochs <= MUON_MAX_EPOCHS:
        muon.reasons["optimizer"] = f"chosen by optim.name=auto: {passes}, at most {MUON_MAX_EPOCHS:g}; " + muon.reasons["optimizer"]
        return muon
    adamw = plan_with_optimizer(with_optimizer(cfg, "adamw"), hw, vocab_size, corpus_tokens, world_size, val_tokens)
    adamw.reasons["optimizer"] = (f"AdamW, chosen by optim.name=auto: {passes}, over {MUON_MAX_EPOCHS:g}; on text "
                                  f"read this often Muon overfits sooner and hands over a higher loss "
                                  f"(optim.name=muon keeps it)")  # fmt: skip
    return adamw


def with_optimizer(cfg, name: str):
    """cfg with optim.name set to `name` (cfg itself is left as it is)."""
    return OmegaConf.merge(cfg, {"optim": {"name": name}})


def ran_optimizer_name(plan_optimizer: dict) -> str:
    """The optimizer a plan's `optimizer` runs (one without a name was made before Muon: AdamW)."""
    return plan_optimizer.get("name", OPTIMIZER_DEFAULTS["name"])


def planned_config(cfg, plan_optimizer: dict):
    """cfg with the optimizer a plan runs, for sizing that plan's step again: under optim.name=auto, the one the
    plan chose."""
    return with_optimizer(cfg, ran_optimizer_name(plan_optimizer))


def chosen_config(cfg, hw: Hardware, vocab_size: int, corpus_tokens: int):
    """cfg with optim.name=auto replaced by the optimizer a plan for this corpus on `hw` chooses, for what builds or
    sizes a step from the config alone (cfg itself where an optimizer is named)."""
    if optimizer_name(cfg) != "auto":
        return cfg
    return planned_config(cfg, make_plan(cfg, hw, vocab_size, corpus_tokens).optimizer)


def plan_with_optimizer(cfg, hw: Hardware, vocab_size: int, corpus_tokens: int, world_size: int = 1,
                        val_tokens: int | None = None) -> Plan:  # fmt: skip
    """The plan for cfg's own optimizer (optim.name muon or adamw)."""
    mode, train = cfg.mode, cfg.train
    path = card_path(cfg, hw)  # compile, precision, attention kernel: what the card runs
    reasons: dict[str, str] = dict(path.reasons)
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
    mem_budget = memory_budget(hw)
    ckpt_policy = cfg.optimizations.grad_ckpt
    if ckpt_policy not in ("never", "auto", "always"):
        raise ConfigError(f"optimizations.grad_ckpt={ckpt_policy!r}; allowed: never, auto, always")
    compute_s = budget_s * (1 - OVERHEAD_SHARE)
    # FSDP2 splits weights, gradients and optimizer state across the ranks: each GPU holds 1/shards of them
    shards = world_size if train.get("parallel", "ddp") == "fsdp2" else 1
    unique = max(1, corpus_tokens)

    def search(step: CardPath, shapes: list[tuple[int, int]] | None = None) -> list[Candidate]:
        return _search(cfg, hw, vocab, seq_len, compute_s, unique, world_size, shards, step, shapes)

    cands = search(path)
    if path.inductor and not train.max_steps:  # fixed steps: the budget only reports, compiling costs no tokens
        eager = path.eager("")
        path, cands = weigh_compile(path, cands, lambda shapes: search(eager, shapes), budget_s)
        reasons["compile"] = path.reasons["compile"]
    if not cands:
        smallest = _candidates(cfg, relaxed=True)[0]
        micro = train.micro_batch or 1
        need = predict_peak_bytes(memory_shape(model_dict(cfg, *smallest, vocab, seq_len), cfg, hw, micro, True, shards)).total
        fix = "a smaller train.micro_batch (or null: the largest that fits)" if train.micro_batch else \
            "a smaller mode, a shorter model.seq_len, or optimizations=lean"  # fmt: skip
        raise ConfigError(
            f"even {smallest[0]} layer(s) of {smallest[1]} dims at micro-batch {micro} needs about "
            f"{need / 2**30:.2f} GiB but gpu={hw.profile} leaves {mem_budget / 2**30:.2f} GiB; choose {fix}"
        )
    best, best_inside = _choose(cands, "loss")
    bounds = f"{mode.min_layers}-{mode.max_layers} layers, {mode.min_dims}-{mode.max_dims} dims"
    if best_inside is None:
        smallest = _candidates(cfg)[0]
        need = predict_peak_bytes(memory_shape(model_dict(cfg, *smallest, vocab, seq_len), cfg, hw, 1, True, shards)).total
        reasons["outside_mode"] = (f"mode={mode.name}'s smallest shape ({smallest[0]} x {smallest[1]}) needs about "
                                   f"{need / 2**30:.2f} GiB at micro-batch 1; gpu={hw.profile} leaves "
                                   f"{mem_budget / 2**30:.2f} GiB: planned below the mode's bounds")  # fmt: skip
    elif best is not best_inside:
        reasons["outside_mode"] = (
            f"within mode={mode.name}'s bounds ({bounds}) the best is {best_inside.layers} x {best_inside.dims} "
            f"({best_inside.params / 1e6:.2f}M parameters, {best_inside.tokens / 1e6:.1f}M tokens in the budget, "
            f"predicted loss {best_inside.loss:.3f}); below them {best.layers} x {best.dims} predicts "
            f"{best.loss:.3f}, better by more than {OUTSIDE_MODE_GAIN:.0%}")  # fmt: skip
    L, d, ckpt, mc, shape, n = best.layers, best.dims, best.grad_ckpt, best.model, best.shape, best.params
    tps, tokens = best.tokens_per_s, best.tokens
    n_active = count_params(shape, active=True)

    # what the hours allow (the best shape were data unlimited) against what the data allows
    hours, _ = _choose(cands, "loss_unlimited")
    data_binds = hours.time_tokens > unique  # the hours' best would need more fresh text than the corpus has
    fixed = [k for k in ("num_layers", "num_dims") if cfg.model[k]]
    if fixed:
        why_shape = "set by you (" + ", ".join(fixed) + ")"
    elif data_binds:
        why_shape = ("the shape the data-constrained scaling law (Muennighoff et al. 2023) predicts best for "
                     f"{unique / 1e6:.2f}M unique tokens in this budget")  # fmt: skip
    else:
        why_shape = "the shape the scaling law (Hoffmann et al. 2022) predicts best for this budget"
    reasons["shape"] = (f"{L} layers x {d} dims ({n / 1e6:.2f}M parameters): {why_shape}; the budget gives "
                        f"{tokens / 1e6:.1f}M tokens ({tokens / n:.1f} per parameter)")  # fmt: skip
    if TOKEN_WORTH.get(cfg.optim.name, 1.0) != 1.0:
        reasons["shape"] += (f"; a token trained with {cfg.optim.name} counted as {TOKEN_WORTH[cfg.optim.name]:g} of "
                             f"AdamW's, for which the law was fitted (python -m pufferfish.lab.isoflop)")  # fmt: skip
    reasons["heads"] = heads_reason(mc, cfg)
    if ckpt:
        reasons["grad_ckpt"] = "on: " + ("optimizations asks for it always" if ckpt_policy == "always"
                                         else "the step does not fit in memory without it")  # fmt: skip
    target = best.target_batch
    procs = f" over {world_size} processes" if world_size > 1 else ""
    if train.batch_tokens:
        reasons["batch"] = f"{target} tokens per step{procs}: set by you"
    else:
        steps, why = min_steps_for(hw)
        reasons["batch"] = (f"{target} tokens per step{procs}: the largest power of two giving >= {steps} steps"
                            f"{f' ({why})' if why else ''} and >= {MIN_STEPS_PER_EPOCH} steps per pass over the data")
        cap = batch_cap(best.params, cfg.optim.name)
        if target == cap:
            reasons["batch"] += (f", at its cap for {cfg.optim.name} at this size: on an H100 more, smaller steps "
                                 f"reached a lower loss in the same time than larger ones")  # fmt: skip
        elif target > cap:
            reasons["batch"] += (f", above its cap for {cfg.optim.name} at this size ({cap:,}): a model this small "
                                 f"runs over {CAP_SPEEDUP - 1:.0%} faster at twice the batch")  # fmt: skip
    micro = best.micro_batch
    accum = max(1, round(target / (micro * seq_len * world_size)))
    batch_tokens = micro * seq_len * accum * world_size  # over all data-parallel ranks
    how = " (set by you)" if train.micro_batch and micro == best.fit_micro_batch else \
        " (the largest that fits)" if micro == best.fit_micro_batch else ""  # fmt: skip
    if batch_tokens != target:  # whole micro-batches: the step runs the nearest multiple of one
        reasons["batch"] += (f"; {batch_tokens:,} run: {accum} micro-batch(es) of {micro} x {seq_len} tokens"
                             + (f" on each of {world_size} processes" if world_size > 1 else "")
                             + ", the nearest whole number")  # fmt: skip
    reasons["micro_batch"] = (f"{micro} x {seq_len} tokens per forward{how}, {accum} accumulation step(s)"
                              + (f" on each of {world_size} processes" if world_size > 1 else ""))  # fmt: skip

    if train.max_steps:
        steps = int(train.max_steps)
        reasons["steps"] = f"{steps} steps: set by train.max_steps (the time budget then only reports)"
    else:
        steps = max(1, int(tokens // batch_tokens))
        reasons["steps"] = f"{steps} steps: what the predicted {tps:,.0f} tokens/s covers in {best.seconds / 3600:.3f} h"
        if best.seconds < compute_s:
            reasons["steps"] += f", after about {compute_s - best.seconds:.0f} s of compiling"
        if tokens < best.time_tokens:
            reasons["steps"] = (f"{steps} steps: {MAX_EPOCHS:.0f} epochs of the data (another would be worth under a "
                                f"quarter of fresh text); at the predicted {tps:,.0f} tokens/s the run ends, its "
                                f"schedule complete, after about {tokens / best.time_tokens:.0%} of the budget")  # fmt: skip
    train_tokens = steps * batch_tokens

    # data: the share of the corpus the run draws from
    # the loader cuts windows of seq_len + 1 tokens and needs at least one micro-batch of them
    want_fraction = max(train_tokens, micro * (seq_len + 1) + 1) / unique
    fraction = min(1.0, max(mode.min_data_fraction, want_fraction))
    epochs = train_tokens / max(1, fraction * unique)
    reasons["data"] = data_reason(fraction, unique, epochs)
    if want_fraction > mode.max_data_fraction and fraction > mode.max_data_fraction:
        reasons["data"] += f" (above mode={mode.name}'s {mode.max_data_fraction:.0%}: the budget can use more)"
    worth = effective_tokens(train_tokens, unique)
    limits = {"hours_tokens": int(hours.time_tokens), "max_tokens": int(MAX_EPOCHS * unique), "hours_params": hours.params, "unique_tokens": unique,
              "planned_tokens": train_tokens, "fresh_equivalent_tokens": int(worth)}  # fmt: skip
    reasons["hours_vs_data"] = (
        f"the hours allow {hours.time_tokens / 1e6:.1f}M tokens (best with unlimited data: {hours.layers} x "
        f"{hours.dims}, {hours.params / 1e6:.2f}M parameters); the data holds {unique / 1e6:.2f}M unique tokens: "
        + (f"the data binds: {epochs:.1f} epochs, worth about {worth / 1e6:.1f}M fresh tokens by the law"
           if data_binds else "the hours bind")
    )  # fmt: skip

    if train.max_steps:
        binding = "user"
    elif "outside_mode" in reasons and best_inside is None:
        binding = "memory"
    elif data_binds:
        binding = "data"
    elif not fixed and (L, d) == (mode.max_layers, mode.max_dims) and tokens > TOKENS_PER_PARAM * n:
        binding = "mode"
        reasons["binding"] = f"the largest shape mode={mode.name} allows; the budget could train a bigger one"
    elif ckpt and ckpt_policy == "auto":
        binding = "memory"
    else:
        binding = "time"
    # planned with the gradients alive all step (safe); reported as the run will hold them
    peak = predict_peak_bytes(replace(shape, micro_batch=micro, grads_in_forward=accum > 1))
    optimizer = {k: cfg.optim[k] for k in OPTIMIZER_KEYS}
    lr, reasons["lr"] = lr_for(cfg, optimizer["name"], d)
    if optimizer["name"] == "muon":
        optimizer["muon_lr"], reasons["optimizer"] = muon_lr_for(cfg, lr, shape)
    reasons["memory"] = (f"predicted peak {peak.total / 2**30:.2f} GiB of {hw.vram_bytes / 2**30:.2f} GiB "
                         f"({'emulated ' if hw.emulated else ''}{hw.profile})")  # fmt: skip
    reserve = allocator_reserve_bytes(replace(shape, micro_batch=micro))
    if reserve:
        reasons["memory"] += (f", and {reserve / 2**30:.2f} GiB left beside it for what the allocator holds "
                              "around the compiled step's logits")  # fmt: skip
    if shards > 1:
        reasons["memory"] += f" per GPU: weights, gradients and optimizer state sharded over {shards} (FSDP2)"

    wanted_eval = min(int(train.eval_tokens), val_tokens or int(train.eval_tokens))
    eval_interval = int(train.eval_interval) if train.eval_interval else max(1, steps // EVALS_PER_RUN)
    if train.max_steps:  # the budget only reports: the same shares of the run's own training tokens (no clock,
        # so its evaluations are the same on every machine), on at least MIN_EVAL_SEQS sequences
        work, floor, evals = train_tokens, MIN_EVAL_SEQS * seq_len, max(1, steps // eval_interval)
    else:
        work, floor, evals = budget_s * tps, seq_len, EVALS_PER_RUN
    eval_tokens = eval_tokens_for(wanted_eval, work, floor, EVAL_SHARE / evals)
    final_eval_tokens = eval_tokens_for(wanted_eval, work, floor, FINAL_EVAL_SHARE)
    stop_evals = 0 if train.max_steps or not train.early_stop else EARLY_STOP_EVALS
    reasons["eval"] = eval_reason(eval_interval, eval_tokens, bool(train.eval_interval))
    reasons["early_stop"] = (f"after {stop_evals} evaluations in a row {EARLY_STOP_RISE:.0%} or more above the best"
                             if stop_evals else "off: " + ("train.max_steps fixes the steps" if train.max_steps
                                                           else "train.early_stop=false"))  # fmt: skip
    return Plan(
        model=mc, params=n, active_params=n_active, precision=hw.precision, grad_ckpt=ckpt, seq_len=seq_len,
        micro_batch=micro, grad_accum=accum, batch_tokens=batch_tokens, steps=steps, train_tokens=train_tokens,
        lr=lr, time_budget_s=budget_s, predicted_tokens_per_s=tps, predicted_peak_bytes=peak.total,
        memory_breakdown=peak.to_dict(), vram_bytes=hw.vram_bytes, corpus_tokens=corpus_tokens,
        data_fraction=fraction, epochs=epochs, binding_constraint=binding, hardware=hw.to_dict(), reasons=reasons,
        world_size=world_size, eval_interval=eval_interval, eval_tokens=eval_tokens, early_stop_evals=stop_evals,
        final_eval_tokens=final_eval_tokens,
        predicted_loss=best.loss, limits=limits,
        compile=path.compile, compile_backend=path.compile_backend, attention_kernel=path.attention_kernel,
        fused_adamw=path.fused_adamw, tf32=path.tf32,
        **{**loop_settings(cfg), "optimizer": optimizer},
    )  # fmt: skip
