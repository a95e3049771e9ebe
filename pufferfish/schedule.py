"""Learning-rate schedules as plain functions of the step: nothing to save but the step itself."""

from __future__ import annotations

import math

from .errors import ConfigError

SCHEDULES = ("cosine", "wsd", "constant")


def lr_at(step: int, total: int, lr: float, schedule: str, warmup_frac: float, min_lr_ratio: float,
          decay_frac: float = 0.2) -> float:  # fmt: skip
    if schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={schedule!r}; allowed: {', '.join(SCHEDULES)}")
    warmup = max(1, int(warmup_frac * total))
    if step < warmup:
        return lr * (step + 1) / warmup
    floor = lr * min_lr_ratio
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
        return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * progress))
    decay_start = total - max(1, int(decay_frac * total))  # warmup-stable-decay: linear decay at the end
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start - 1))
    return lr - (lr - floor) * progress
