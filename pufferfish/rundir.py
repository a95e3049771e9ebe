"""A run's directory: where it lives, what it was made with (config.yaml, plan.json), whether it may be resumed
with these settings, and whether its disk can hold its checkpoints."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .checkpoint import atomic_write_text, checkpoint_files
from .errors import CheckpointError, ConfigError
from .model import ModelConfig
from .resolver import Plan, detect_hardware, make_plan
from .resolver.plan import OPTIMIZER_DEFAULTS, corpus_mb_wanted, ran_optimizer_name
from .resolver.replan import plan_regroup

MIN_FREE_DISK = 256 * 1024**2
# fp32 weights and AdamW's two fp32 moments; the rest is small. Muon keeps one moment for the blocks' matrices:
# its checkpoints are smaller, and this bound holds for them too
CHECKPOINT_BYTES_PER_PARAM = 12
# groups and keys that change the result: a run directory cannot be resumed with different ones
RESULT_KEYS = ("mode", "model", "attention", "moe", "data", "optim", "train.seed", "train.batch_tokens",
               "train.micro_batch", "train.max_steps")  # fmt: skip


def run_directory(cfg: DictConfig) -> Path:
    if cfg.run_dir:
        path = Path(cfg.run_dir)
    else:
        try:
            from hydra.core.hydra_config import HydraConfig

            path = Path(HydraConfig.get().runtime.output_dir)
        except ValueError:  # not under @hydra.main (the Python API, tests)
            raise ConfigError("run_dir is not set; pass run_dir=PATH") from None
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{os.getpid()}"  # per process: data-parallel ranks probe at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run directory {path} is not writable ({e.strerror}); choose another with run_dir=PATH "
                          f"or hydra.run.dir=PATH") from None  # fmt: skip
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_DISK:
        raise ConfigError(f"only {free / 2**20:.0f} MiB free on the disk of {path}; checkpoints need more. "
                          f"Free some space or choose another run_dir")  # fmt: skip
    return path


def _select(cfg, key: str):
    return OmegaConf.select(cfg, key)


# settings whose default changed after they were added: what a run made before they existed had (its plan's too)
FIRST_DEFAULTS = {"optim": {"name": OPTIMIZER_DEFAULTS["name"]}}


def ran_optimizer(run_dir: Path) -> str | None:
    """The optimizer a run made under optim.name=auto runs: its plan's (None where it has no readable plan)."""
    try:
        return ran_optimizer_name(json.loads((run_dir / "plan.json").read_text())["optimizer"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def check_same_run(cfg: DictConfig, run_dir: Path) -> None:
    """A run directory resumes only with the settings that made it. A setting added to Pufferfish since the
    run was made counts as what the run had (its first default: optim.name=adamw, model.qk_norm=false).
    optim.name compares as the optimizer the run ran: a run made under optim.name=auto as the one its plan chose,
    and optim.name=auto resumes a run made with any optimizer (the run's frozen plan keeps the one it ran)."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return
    from .config import PufferfishConfig

    saved, schema = OmegaConf.load(saved_path), OmegaConf.structured(PufferfishConfig)
    changed, had = [], []
    for key in RESULT_KEYS:
        old, new = _select(saved, key), _select(cfg, key)
        if OmegaConf.is_config(old):
            default = _select(schema, key)  # None for a group whose schema has no defaults (mode, data, ...)
            defaults = OmegaConf.to_container(default) if OmegaConf.is_dict(default) and OmegaConf.is_dict(old) else {}
            defaults.update(FIRST_DEFAULTS.get(key, {}))
            old, new = OmegaConf.to_container(old), OmegaConf.to_container(new)
            old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
            if key == "optim":  # no plan to say what auto chose: the checkpoint's optimizer state is the check
                old["name"] = (ran_optimizer(run_dir) if old.get("name") == "auto" else old.get("name")) or new.get("name")
                new["name"] = old["name"] if new.get("name") == "auto" else new.get("name")
        if old != new:
            changed.append(key)
            if isinstance(old, dict) and isinstance(new, dict):
                had += [f"{key}.{k}={old.get(k)}" for k in old if old.get(k) != new.get(k) and not isinstance(old.get(k), dict)]
    if changed:
        said = f" (it had {' '.join(had)})" if had else ""
        raise ConfigError(
            f"{run_dir} holds a run made with different {', '.join(changed)}{said}; its checkpoint belongs to that "
            f"run. Resume it with its own settings, or start a new run with hydra.run.dir=NEW_DIR (or run_dir=)"
        )


def data_config(cfg: DictConfig, world_size: int = 1, hw=None) -> DictConfig:
    """cfg.data, with the default corpus capped to what the budget can use (data.max_mb=null) on `hw` (default:
    the hardware detected here)."""
    if cfg.data.source != "python" or cfg.data.max_mb:
        return cfg.data
    data = cfg.data.copy()
    hw = hw or detect_hardware(cfg.gpu, cfg.optimizations, cfg.train.device)
    data.max_mb = corpus_mb_wanted(cfg, hw, world_size)
    return data


def plan_for(cfg: DictConfig, run_dir: Path, data, resuming: bool, checkpoint_model: dict | None = None,
             world_size: int = 1, step: int = 0, hw=None) -> tuple[Plan, bool]:  # fmt: skip
    """The frozen plan of a resumed run, or a new one for `hw` (default: the hardware detected here). Returns
    (plan, reused).

    A new plan for a run directory that holds a checkpoint must plan the model in that checkpoint;
    otherwise nothing is written and the error says so.
    """
    path = run_dir / "plan.json"
    if resuming and path.exists():
        try:
            saved = json.loads(path.read_text())
            plan = Plan.from_dict(saved, cfg)
        except (ValueError, TypeError) as e:  # edited or damaged by hand: it is written atomically
            raise ConfigError(f"{path} cannot be read ({e}); restore it, or start a new run directory") from None
        if plan.world_size != world_size:
            plan_regroup(plan, world_size, step)
        if plan.to_dict() != saved:
            write_plan(run_dir, plan)  # regrouped, or completed from the config: the other ranks read it here
        return plan, True
    hw = hw or detect_hardware(cfg.gpu, cfg.optimizations, cfg.train.device)
    plan = make_plan(cfg, hw, data.vocab_size, data.train_tokens, world_size, val_tokens=data.val_tokens)
    if checkpoint_model:  # one written before a model setting was added: it had that setting's default
        checkpoint_model = ModelConfig.from_dict(checkpoint_model).to_dict()
    if checkpoint_model and checkpoint_model != plan.model:
        changed = {k: (v, plan.model.get(k)) for k, v in checkpoint_model.items() if plan.model.get(k) != v}
        raise CheckpointError(
            f"the checkpoint in {run_dir} holds another model than these settings plan: "
            + ", ".join(f"{k} {old} there, {new} here" for k, (old, new) in changed.items())
            + ". Resume it with the settings that made it, or start a new run directory"
        )
    write_plan(run_dir, plan)
    return plan, False


def write_plan(run_dir: Path, plan: Plan) -> None:
    """plan.json: the plan and its revisions so far; a resumed run continues from it."""
    atomic_write_text(run_dir / "plan.json", json.dumps(plan.to_dict(), indent=2))


def check_disk_for_checkpoints(run_dir: Path, params: int, keep: int) -> None:
    """Fail before training, not at the first checkpoint an hour in, when the checkpoints cannot fit."""
    each = CHECKPOINT_BYTES_PER_PARAM * params
    at_once = keep + 1 if keep > 0 else 3  # the kept ones and the one being written (keep=0: at least 3)
    existing = sum(f.stat().st_size for f in checkpoint_files(run_dir / "checkpoints"))
    need = max(0, each * at_once - existing)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise ConfigError(
            f"checkpoints of this model take about {each / 2**20:,.0f} MiB each and {at_once} exist at once "
            f"(train.keep_checkpoints={keep}, plus the one being written): {need / 2**20:,.0f} MiB more, but "
            f"only {free / 2**20:,.0f} MiB is free on the disk of {run_dir}. Free some space, lower "
            f"train.keep_checkpoints, or choose another run_dir"
        )


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
