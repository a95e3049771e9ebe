"""Views of metrics.jsonl, keyed by the `logger` group's option: one registry, no flag thicket.

metrics.jsonl is always written; a logger here mirrors its records elsewhere. A mirror is an object with
`log(record)` and `close()`; MetricsLog calls both, and train() closes the log before it returns, so a
mirror's run ends inside its own job even when a Hydra multirun runs many jobs in one process.
"""

from __future__ import annotations

import netrc
import os
import re
import secrets
import sys
from pathlib import Path
from urllib.parse import urlsplit

from omegaconf import OmegaConf

from .checkpoint import atomic_write_text
from .errors import ConfigError, one_of

COMPARED_GROUPS = ("gpu", "mode", "attention", "moe", "optimizations", "data")  # the options an ablation varies
WANDB_MODES = ("auto", "online", "offline", "disabled")


def chosen_options(cfg) -> dict[str, str]:
    """{group: option} of a composed (or saved, resolved) config, e.g. {"gpu": "cpu", "mode": "ultra_fast"}."""
    return {g: str(OmegaConf.select(cfg, f"{g}.name")) for g in COMPARED_GROUPS if OmegaConf.select(cfg, f"{g}.name")}


def _jsonl(cfg, plan, run_dir: Path):
    return None  # metrics.jsonl itself: nothing to mirror


def has_wandb_key() -> bool:
    """An API key in the environment or in ~/.netrc for the W&B host, found without importing wandb."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])


def wandb_mode(requested: str) -> tuple[str | None, str]:
    """(mode for wandb.init, why). None leaves the choice to WANDB_MODE, which wandb reads itself."""
    if requested not in WANDB_MODES:
        raise one_of("logger.wandb_mode", requested, WANDB_MODES)
    if requested != "auto":
        return requested, f"logger.wandb_mode={requested}"
    if os.environ.get("WANDB_MODE"):
        return None, f"WANDB_MODE={os.environ['WANDB_MODE']}"
    if not has_wandb_key():
        return "offline", "no W&B API key (WANDB_API_KEY or ~/.netrc)"
    return "online", "an API key was found"


def hydra_job() -> tuple[str | None, str | None]:
    """(sweep name, the job's override dirname) under a Hydra multirun; (None, override dirname or None)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # not under @hydra.main: the Python API, tests
        return None, None
    overrides = hc.job.override_dirname or None
    if hc.mode != RunMode.MULTIRUN:
        return None, overrides
    sweep = Path(hc.sweep.dir)
    # the default sweep dir is multirun/DATE/TIME: the time alone would repeat across days
    name = f"{sweep.parent.name}_{sweep.name}" if re.fullmatch(r"\d\d-\d\d-\d\d", sweep.name) else sweep.name
    return name, overrides


class WandbMirror:
    """One W&B run per training job; records mirrored at their own step, non-numbers into the summary."""

    def __init__(self, cfg, plan, run_dir: Path):
        try:
            import wandb  # imported only when logger=wandb: start-up costs seconds
        except ImportError:
            raise ConfigError("logger=wandb needs the wandb package: pip install wandb") from None
        mode, why = wandb_mode(cfg.logger.wandb_mode)
        sweep, overrides = hydra_job()
        group = cfg.logger.get("wandb_group") or sweep  # an explicit group wins over the sweep's name
        id_file = run_dir / "wandb_run_id"  # a resumed run directory continues the same W&B run
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        atomic_write_text(id_file, run_id + "\n")
        if wandb.run is not None:
            wandb.run.finish()  # a job that crashed before closing its log: never log into its run
        self.run = wandb.init(
            project=cfg.logger.wandb_project, entity=cfg.logger.wandb_entity, group=group,
            name=overrides or run_dir.name, tags=[f"{g}={o}" for g, o in chosen_options(cfg).items()],
            config={**OmegaConf.to_container(cfg, resolve=True), "plan": plan.to_dict(), "run_dir": str(run_dir)},
            dir=str(run_dir), id=run_id, resume="allow", mode=mode, job_type="train",
            settings=wandb.Settings(quiet=True),  # no sparkline history and summary at the end: metrics.jsonl has them
        )  # fmt: skip
        if self.run.settings.mode == "offline":
            print(f"wandb: offline ({why}); upload later with: wandb sync {self.run.settings.sync_dir}",
                  file=sys.stderr)  # fmt: skip

    def log(self, record: dict) -> None:
        numbers, others = {}, {}
        for key, value in record.items():
            if key in ("kind", "step", "final") or value is None:
                continue
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            (numbers if is_number else others)[key] = value
        if numbers:
            self.run.log(numbers, step=int(record["step"]))  # the same names and steps as metrics.jsonl
        if others:  # git revision, transforms, stop reason: not plottable
            self.run.summary.update(others)

    def close(self) -> None:
        self.run.finish()


LOGGERS = {"jsonl": _jsonl, "wandb": WandbMirror}


def attach_loggers(cfg, log, plan, run_dir: Path) -> None:
    name = cfg.logger.name
    if name not in LOGGERS:
        raise ConfigError(f"logger={name} is not known; known: {', '.join(sorted(LOGGERS))}")
    mirror = LOGGERS[name](cfg, plan, run_dir)
    if mirror is not None:
        log.mirrors.append(mirror)
