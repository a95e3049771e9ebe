"""ModelConfig: the one typed description a model is built from, in the original README's names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError


def swiglu_hidden(num_dims: int) -> int:
    return 64 * -(-(8 * num_dims // 3) // 64)  # 8/3 * dims keeps SwiGLU at the MLP's 4x parameter count


@dataclass
class ModelConfig:
    num_layers: int = 4
    num_dims: int = 256
    num_heads: int = 4
    num_kv_heads: int | None = None  # None = num_heads (MHA); 1 = MQA; between = GQA
    vocab_size: int = 8192
    seq_len: int = 512  # longest context (RoPE tables and the KV cache are this long)
    ffn_dims: int | None = None  # None = swiglu_hidden(num_dims)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE: bounded attention logits
    # mixture of experts (the original README's names)
    use_moe: bool = False
    moe_num_experts: int = 8
    moe_active_experts: int = 2
    use_lossfreebalance: bool = True
    moe_bias_update_rate: float = 1e-3
    moe_aux_loss_alpha: float = 0.0
    moe_shared_expert: bool = False
    moe_every_n_layers: int = 1
    moe_first_dense_layers: int = 0
    moe_score_func: str = "sigmoid"
    moe_expert_ffn_dims: int | None = None  # None = ffn_dims / moe_active_experts

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.ffn_dims is None:
            self.ffn_dims = swiglu_hidden(self.num_dims)
        if self.moe_expert_ffn_dims is None:
            self.moe_expert_ffn_dims = max(64, 64 * round(self.ffn_dims / max(1, self.moe_active_experts) / 64))
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.num_dims // self.num_heads

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.use_moe
            and layer >= self.moe_first_dense_layers
            and (layer - self.moe_first_dense_layers) % self.moe_every_n_layers == 0
        )

    def validate(self) -> None:
        positive = ["num_layers", "num_dims", "num_heads", "num_kv_heads", "vocab_size", "seq_len", "ffn_dims"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{name}={value!r} must be a positive whole number")
        if self.num_dims % self.num_heads:
            raise ConfigError(
                f"model.num_dims={self.num_dims} is not divisible by model.num_heads={self.num_heads}; "
                f"pick num_heads from {[h for h in range(1, 65) if self.num_dims % h == 0]}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head dim {self.head_dim} (num_dims/num_heads) must be even for RoPE")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads}; "
                f"allowed: {[k for k in range(1, self.num_heads + 1) if self.num_heads % k == 0]}"
            )
        if self.use_moe:
            if not 1 <= self.moe_active_experts <= self.moe_num_experts:
                raise ConfigError(
                    f"moe_active_experts={self.moe_active_experts} must be between 1 and "
                    f"moe_num_experts={self.moe_num_experts}"
                )
            if self.moe_score_func not in ("sigmoid", "softmax"):
                raise ConfigError(f"moe_score_func={self.moe_score_func!r}; choose sigmoid or softmax")
            if self.moe_every_n_layers < 1:
                raise ConfigError(f"moe_every_n_layers={self.moe_every_n_layers} must be at least 1")

    def update(self, changes: dict[str, Any]) -> ModelConfig:
        """Change fields in place (the original README: `config.update({"use_moe": True})`)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {unknown}; known: {sorted(known)}")
        for key, value in changes.items():
            setattr(self, key, value)
        if "ffn_dims" in changes or "moe_active_experts" in changes:
            if "moe_expert_ffn_dims" not in changes:
                self.moe_expert_ffn_dims = None
        if "num_dims" in changes and "ffn_dims" not in changes:
            self.ffn_dims = None
        self.__post_init__()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
