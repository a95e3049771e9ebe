"""The measuring job's config (python -m pufferfish.lab.measure, conf/measure.yaml): the training config's
groups and keys, which say what step is measured, plus its own `measure` node, which says how. Registered in
Hydra's ConfigStore here, so the training schema (pufferfish/config.py) holds no measuring settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from pufferfish.config import PufferfishConfig


@dataclass
class MeasureSettings:
    steps: int = 2  # training steps run: peak memory over all of them, tokens/s over those after the warm-up
    batches: str = "random"  # random (tokens: no data preparation) | data (the real, threaded loader)


@dataclass
class MeasureConfig(PufferfishConfig):
    measure: MeasureSettings = field(default_factory=MeasureSettings)


ConfigStore.instance().store(name="measure_schema", node=MeasureConfig)  # conf/measure.yaml's first default
