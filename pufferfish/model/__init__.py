from .config import ModelConfig
from .llama import KVCache, Transformer, build_model, count_parameters

__all__ = ["ModelConfig", "Transformer", "KVCache", "build_model", "count_parameters"]
