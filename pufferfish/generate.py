"""python -m pufferfish.generate checkpoint=PATH prompt="..." max_new_tokens=N temperature=T top_k=K top_p=P"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from .checkpoint import resolve_checkpoint_path
from .data.tokenizer import Tokenizer
from .errors import CheckpointError, ConfigError, exit_on_user_error
from .model import ModelConfig, build_model
from .model.sampling import generate


def load_model(checkpoint: str | Path, device: str = "cpu"):
    """The model of a run directory or checkpoint file, in eval mode, and the file it came from."""
    path = resolve_checkpoint_path(checkpoint)
    try:
        state = torch.load(path, map_location=device, weights_only=False)
        cfg = ModelConfig.from_dict(state["model_config"])
    except (KeyError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} is not a Pufferfish checkpoint ({e})") from None
    model = build_model(cfg, device)
    model.load_state_dict(state["model"])
    return model.eval(), path


def find_tokenizer(checkpoint_file: Path, explicit: str | None) -> Tokenizer:
    candidates = [Path(explicit)] if explicit else [p / "tokenizer.model" for p in checkpoint_file.parents[:3]]
    for c in candidates:
        if c.is_file():
            return Tokenizer.load(c)
    raise ConfigError(f"no tokenizer.model next to {checkpoint_file}; pass tokenizer=PATH")


def sample_text(cfg: DictConfig) -> list[str]:
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, path = load_model(cfg.checkpoint, device)
    tok = find_tokenizer(path, cfg.tokenizer)
    if cfg.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={cfg.max_new_tokens} must be at least 1")
    if not 0 < cfg.top_p <= 1:
        raise ConfigError(f"top_p={cfg.top_p} must be in (0, 1]")
    ids = tok.encode(cfg.prompt) or [tok.eos_id]
    prompt = torch.tensor([ids] * cfg.num_samples, device=device)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    out = generate(model, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, generator=g)
    return [tok.decode(row.tolist()) for row in out]


@hydra.main(version_base=None, config_path="../conf", config_name="generate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    for i, text in enumerate(sample_text(cfg)):
        if cfg.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(text)


if __name__ == "__main__":
    main()
