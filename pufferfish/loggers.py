"""Views of metrics.jsonl, keyed by the `logger` group's option: one registry, no flag thicket.

metrics.jsonl is always written; a logger here mirrors its records elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError


def _jsonl(cfg, plan, run_dir: Path):
    return None  # metrics.jsonl itself: nothing to mirror


LOGGERS = {"jsonl": _jsonl}


def attach_loggers(cfg, log, plan, run_dir: Path) -> None:
    name = cfg.logger.name
    if name not in LOGGERS:
        raise ConfigError(f"logger={name} is not known; known: {', '.join(sorted(LOGGERS))}")
    mirror = LOGGERS[name](cfg, plan, run_dir)
    if mirror is not None:
        log.mirrors.append(mirror)
