"""Pufferfish: train small language models sized for the GPU you have and the hours you have."""

from .model import ModelConfig

__version__ = "0.1.0"
__all__ = ["Trainer", "ModelConfig", "__version__"]


def __getattr__(name):  # Trainer pulls in Hydra and the data stack: import it only when asked for
    if name == "Trainer":
        from .api import Trainer

        return Trainer
    raise AttributeError(name)
