"""Every config value checked once, before anything is written, loaded or trained.

Hydra and the schemas in config.py already reject values of the wrong type and unknown keys set without
`+`; these are the rest: keys added with `+`, ranges and choices a type cannot say, and relations between
values. Each check names the key, the value and what is allowed, so a bad value is one clear message up
front instead of a traceback (or a silent misbehaviour) minutes or hours later. The upper bounds are far
beyond what this tool trains; they stop an absurd value from hanging the planner or a single step.
"""

from __future__ import annotations

import dataclasses
import math
import typing

from omegaconf import DictConfig, OmegaConf

from .config import GROUPS
from .errors import ConfigError
from .optim import OPTIMIZERS
from .schedule import SCHEDULES


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def whole(low: int, high: int | None = None):
    if high is None:
        return lambda v: _number(v) and v >= low, f"a whole number >= {low}"
    return lambda v: _number(v) and low <= v <= high, f"a whole number from {low} to {high}"


def above(low):
    return lambda v: _number(v) and v > low, f"a number > {low}"


def at_least(low):
    return lambda v: _number(v) and v >= low, f"a number >= {low}"


def fraction(open_low: bool = False, open_high: bool = False):
    def ok(v):
        return _number(v) and (0 < v if open_low else 0 <= v) and (v < 1 if open_high else v <= 1)

    return ok, f"a number in {'(' if open_low else '['}0, 1{')' if open_high else ']'}"


def within(low, high):
    return lambda v: _number(v) and low <= v <= high, f"a number from {low} to {high}"


def one_of(*choices):
    return lambda v: v in choices, "one of " + ", ".join(map(str, choices))


LAYERS, DIMS = whole(1, 256), whole(2, 16384)
# key: (test, what is allowed). A null passes wherever the schema allows one (the resolver decides).
RULES = {
    "mode.target_hours": (lambda v: _number(v) and 0 < v <= 720, "hours of training, > 0 and at most 720 (30 days)"),
    "mode.seq_len": whole(2, 2**20),
    "mode.min_layers": LAYERS,
    "mode.max_layers": LAYERS,
    "mode.min_dims": DIMS,
    "mode.max_dims": DIMS,
    "mode.min_data_fraction": fraction(open_low=True),
    "mode.max_data_fraction": fraction(open_low=True),
    "model.num_layers": LAYERS,
    "model.num_dims": DIMS,
    "model.num_heads": whole(1, 1024),
    "model.num_kv_heads": whole(1, 1024),
    "model.vocab_size": whole(1, 2**24),
    "model.ffn_dims": whole(1, 2**18),
    "model.seq_len": whole(2, 2**20),
    "model.rope_theta": above(0),
    "model.norm_eps": above(0),
    "model.init_std": above(0),
    "attention.heads_per_kv_head": whole(0, 1024),
    "attention.head_dim": (lambda v: _number(v) and 2 <= v <= 1024 and v % 2 == 0, "an even number from 2 to 1024"),
    "attention.sdpa_backend": one_of("auto", "flash", "efficient", "cudnn", "math"),
    "optimizations.precision": one_of("fp32", "auto", "bf16", "fp16"),
    "optimizations.grad_ckpt": one_of("never", "auto", "always"),
    "optimizations.loss_chunk_tokens": whole(1, 2**24),
    "optimizations.prefetch_batches": whole(0, 64),
    "optimizations.ddp_graphs": one_of("split", "whole"),
    "gpu.vram_gb": within(0, 100_000),
    "gpu.compute_capability": within(0, 100),
    "gpu.tflops_fp32": within(0, 1e6),
    "gpu.tflops_tensor": within(0, 1e6),
    "gpu.bandwidth_gbs": within(0, 1e7),
    "gpu.mfu": fraction(open_low=True),
    "data.vocab_size": whole(300, 2**24),
    "data.max_hub_documents": whole(0),
    "optim.name": one_of("auto", *OPTIMIZERS),
    "optim.lr": above(0),
    "optim.muon_lr": above(0),
    "optim.min_lr_ratio": fraction(),
    "optim.schedule": one_of(*SCHEDULES),
    "optim.warmup_frac": fraction(),
    "optim.decay_frac": fraction(),
    "optim.weight_decay": at_least(0),
    "optim.beta1": fraction(open_high=True),
    "optim.beta2": fraction(open_high=True),
    "optim.grad_clip": above(0),
    "train.seed": whole(0, 2**32 - 1),  # numpy seeds the data order from it
    "train.batch_tokens": whole(1, 2**24),  # a bigger step would run for ages between budget checks
    "train.micro_batch": whole(1, 2**16),
    "train.max_steps": whole(1),
    "train.stop_at_step": whole(1),
    "train.eval_interval": whole(1),
    "train.eval_tokens": whole(1),
    "train.log_interval": whole(1),
    "train.ckpt_interval_s": at_least(0),
    "train.keep_checkpoints": (lambda v: _number(v) and v >= 0, "a whole number >= 0 (0 keeps every checkpoint)"),
    "train.max_bad_steps": whole(1),
    "train.sample_tokens": whole(0, 100_000),
    "train.parallel": one_of("ddp", "fsdp2"),
    "train.profile_steps": whole(0, 1000),
    "train.profile_start": whole(0),
}
MOE_RULES = {  # only when moe.enabled
    "moe.num_experts": whole(1, 1024),
    "moe.active_experts": whole(1, 1024),
    "moe.bias_update_rate": at_least(0),
    "moe.aux_loss_alpha": at_least(0),
    "moe.every_n_layers": whole(1),
    "moe.first_dense_layers": whole(0),
    "moe.score_func": one_of("sigmoid", "softmax"),
    "moe.expert_ffn_dims": whole(1, 2**18),
}


def _get(cfg, key: str):
    return OmegaConf.select(cfg, key, default=None)


def unknown_keys(cfg) -> list[str]:
    """Keys the schema does not have: Hydra lets `+key=value` add them, and nothing would read them."""
    from .config import PufferfishConfig

    def walk(node, schema, prefix: str) -> list[str]:
        hints = typing.get_type_hints(schema)
        known = {f.name for f in dataclasses.fields(schema)}
        found = []
        for key in node:
            if key not in known:
                found.append(f"{prefix}{key}")
            elif isinstance(node[key], DictConfig) and dataclasses.is_dataclass(hints[key]):
                found += walk(node[key], hints[key], f"{prefix}{key}.")
        return found

    return walk(cfg, PufferfishConfig, "")


def validate(cfg) -> None:
    """Raise a ConfigError naming the first bad value; return quietly when all are in range."""
    extra = unknown_keys(cfg)
    if extra:
        raise ConfigError(f"{', '.join(extra)}: not a Pufferfish setting (added with +?); nothing would read it. "
                          f"`python -m pufferfish.train --cfg job` lists every setting")  # fmt: skip
    rules = {**RULES, **(MOE_RULES if _get(cfg, "moe.enabled") else {})}
    for key, (ok, allowed) in rules.items():
        value = _get(cfg, key)
        if value is not None and not ok(value):
            raise ConfigError(f"{key}={value!r} is out of range; allowed: {allowed}")
    heads, kv_heads, dims = (_get(cfg, f"model.{k}") for k in ("num_heads", "num_kv_heads", "num_dims"))
    if heads and kv_heads and heads % kv_heads:
        raise ConfigError(f"model.num_kv_heads={kv_heads} must divide model.num_heads={heads}; allowed: "
                          f"{[k for k in range(1, heads + 1) if heads % k == 0]}")  # fmt: skip
    if heads and dims and dims % heads:
        divisors = [h for h in range(1, min(dims, 64) + 1) if dims % h == 0]
        raise ConfigError(f"model.num_dims={dims} is not divisible by model.num_heads={heads}; "
                          f"allowed num_heads: {divisors}")  # fmt: skip
    for low, high in (("mode.min_layers", "mode.max_layers"), ("mode.min_dims", "mode.max_dims"),
                      ("mode.min_data_fraction", "mode.max_data_fraction")):  # fmt: skip
        if _get(cfg, low) > _get(cfg, high):
            raise ConfigError(f"{low}={_get(cfg, low)} is above {high}={_get(cfg, high)}")
    model_vocab, data_vocab = _get(cfg, "model.vocab_size"), _get(cfg, "data.vocab_size")
    if model_vocab and data_vocab and model_vocab < data_vocab:
        raise ConfigError(f"model.vocab_size={model_vocab} is below data.vocab_size={data_vocab}: tokens past "
                          f"{model_vocab - 1} would have no embedding; make them equal, or leave "
                          f"model.vocab_size null")  # fmt: skip
    active, experts = _get(cfg, "moe.active_experts"), _get(cfg, "moe.num_experts")
    if _get(cfg, "moe.enabled") and active > experts:
        raise ConfigError(f"moe.active_experts={active} must be at most moe.num_experts={experts}")


def check_overrides(overrides: list[str]) -> None:
    """What Hydra itself fails on with a traceback rather than a message: `model=null` for a config group."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.lstrip("+~").split("@")[0] in (*GROUPS, "experiment") and value.strip().lower() in ("null", "~", ""):
            group = key.lstrip("+~").split("@")[0]
            raise ConfigError(f"{item}: a config group needs an option name, e.g. {group}=NAME; "
                              f"`python -m pufferfish.train --help` lists the options of each group")  # fmt: skip
