"""The Python API of the original README:

    from pufferfish import Trainer, ModelConfig
    Trainer(config=ModelConfig(num_layers=4, num_dims=256, num_heads=4, vocab_size=8192),
            dataset_path="path/to/text", target_hours=0.01).train()

It composes the same Hydra config as the CLI and calls the same train() function.
"""

from __future__ import annotations

import time
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from .config import compose_config  # importable from here too, as scripts and tests do
from .errors import ConfigError
from .model import ModelConfig

MODE_BANDS = [("ultra_fast", 0.01), ("quick_dev", 0.5), ("standard", 3.0), ("extended", float("inf"))]


def mode_for_hours(hours: float) -> str:
    return next(name for name, upper in MODE_BANDS if hours <= upper)


def model_overrides(mc: ModelConfig) -> list[str]:
    out = [f"model.{k}={getattr(mc, k)}" for k in
           ("num_layers", "num_dims", "num_heads", "num_kv_heads", "vocab_size", "seq_len", "ffn_dims")]  # fmt: skip
    out.append(f"data.vocab_size={mc.vocab_size}")  # the tokenizer is trained to the model's vocabulary
    if mc.use_moe:
        out += ["moe=topk", f"moe.num_experts={mc.moe_num_experts}", f"moe.active_experts={mc.moe_active_experts}",
                f"moe.lossfree_balance={mc.use_lossfreebalance}", f"moe.bias_update_rate={mc.moe_bias_update_rate}",
                f"moe.aux_loss_alpha={mc.moe_aux_loss_alpha}", f"moe.shared_expert={mc.moe_shared_expert}",
                f"moe.every_n_layers={mc.moe_every_n_layers}", f"moe.first_dense_layers={mc.moe_first_dense_layers}",
                f"moe.score_func={mc.moe_score_func}", f"moe.expert_ffn_dims={mc.moe_expert_ffn_dims}"]  # fmt: skip
    return out


class Trainer:
    def __init__(
        self,
        config: ModelConfig | None = None,
        dataset_path: str | list[str] | None = None,
        target_hours: float | None = None,
        mode: str | None = None,
        gpu: str = "auto",
        run_dir: str | Path | None = None,
        overrides: list[str] | tuple[str, ...] = (),
    ):
        if target_hours is not None and target_hours <= 0:
            raise ConfigError(f"target_hours={target_hours} must be positive")
        ov = [f"gpu={gpu}", f"mode={mode or mode_for_hours(target_hours if target_hours is not None else 0.01)}"]
        if target_hours is not None:
            ov.append(f"mode.target_hours={target_hours}")
        if config is not None:
            ov += model_overrides(config)
        if dataset_path is not None:
            paths = [dataset_path] if isinstance(dataset_path, (str, Path)) else list(dataset_path)
            ov += ["data=text_files", "data.paths=[" + ",".join(f"'{Path(p)}'" for p in paths) + "]"]
            if config is not None:
                ov.append(f"data.vocab_size={config.vocab_size}")
        self.run_dir = Path(run_dir or f"outputs/api/{time.strftime('%Y-%m-%d/%H-%M-%S')}")
        ov.append(f"run_dir='{self.run_dir}'")
        try:
            self.cfg = compose_config(ov + list(overrides))
        except (HydraException, OmegaConfBaseException) as e:  # the CLI's one-line message for it
            from .overrides import check_command_line, one_line

            check_command_line(ov + list(overrides))
            raise ConfigError(one_line(e)) from None

    def plan(self) -> dict:
        from .train import train

        cfg = self.cfg.copy()
        cfg.dry_run = True
        return train(cfg)["plan"]

    def train(self) -> dict:
        from .train import train

        return train(self.cfg)

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 50,
                 top_p: float = 1.0, seed: int = 0) -> str:  # fmt: skip
        from omegaconf import OmegaConf

        from .generate import sample_text

        cfg = OmegaConf.create({"checkpoint": str(self.run_dir), "prompt": prompt, "max_new_tokens": max_new_tokens,
                                "temperature": temperature, "top_k": top_k, "top_p": top_p, "num_samples": 1,
                                "seed": seed, "device": "auto", "tokenizer": None})  # fmt: skip
        return sample_text(cfg)[0]
