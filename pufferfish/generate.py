"""python -m pufferfish.generate checkpoint=PATH prompt="..." max_new_tokens=N temperature=T top_k=K top_p=P"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from .checkpoint import resolve_checkpoint_path
from .data.tokenizer import Tokenizer
from .errors import CheckpointError, ConfigError, exit_on_user_error
from .model import ModelConfig, build_model
from .model.sampling import generate
from .paths import CONF_DIR

# past seq_len every new token recomputes the whole context: beyond this many contexts a request is a mistake
MAX_CONTEXTS = 8
MAX_SAMPLES = 1024

def load_model(checkpoint: str | Path, device: str = "cpu"):
    """The model of a run directory or checkpoint file, in eval mode, and the file it came from."""
    path = resolve_checkpoint_path(checkpoint)
    try:
        state = torch.load(path, map_location=device, weights_only=False)
        cfg = ModelConfig.from_dict(state["model_config"])
    except Exception as e:  # truncated, overwritten or another kind of file: unpickling fails many ways
        raise CheckpointError(f"{path} is not a readable Pufferfish checkpoint ({str(e).splitlines()[0]}); "
                              f"name another with checkpoint=PATH") from None  # fmt: skip
    model = build_model(cfg, device)
    model.load_state_dict(state["model"])
    return model.eval(), path


def find_tokenizer(checkpoint_file: Path, explicit: str | None) -> Tokenizer:
    candidates = [Path(explicit)] if explicit else [p / "tokenizer.model" for p in checkpoint_file.parents[:3]]
    for c in candidates:
        if c.is_file():
            return Tokenizer.load(c)
    raise ConfigError(f"no tokenizer.model next to {checkpoint_file}; pass tokenizer=PATH")


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_sampling(cfg: DictConfig) -> None:
    """The sampling settings, before a model is loaded: each names the value and what is allowed."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # noqa: E731 (not NaN)
    if not _whole(cfg.max_new_tokens) or cfg.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={cfg.max_new_tokens!r} is not allowed; give a whole number >= 1")
    if not _whole(cfg.top_k) or cfg.top_k < 0:
        raise ConfigError(f"top_k={cfg.top_k!r} is not allowed; give a whole number >= 0 (0 = no top-k filter)")
    if not number(cfg.top_p) or not 0 < cfg.top_p <= 1:
        raise ConfigError(f"top_p={cfg.top_p!r} is not allowed; give a number in (0, 1]")
    if not number(cfg.temperature) or not 0 <= cfg.temperature <= 100:
        raise ConfigError(f"temperature={cfg.temperature!r} is not allowed; give a number from 0 (greedy) to 100")
    if not _whole(cfg.num_samples) or not 1 <= cfg.num_samples <= MAX_SAMPLES:
        raise ConfigError(f"num_samples={cfg.num_samples!r} is not allowed; give a whole number from 1 to {MAX_SAMPLES}")
    if not _whole(cfg.seed) or not 0 <= cfg.seed < 2**63:
        raise ConfigError(f"seed={cfg.seed!r} is not allowed; give a whole number >= 0")
    if not isinstance(cfg.prompt, str):
        raise ConfigError(f"prompt={cfg.prompt!r} is not text; quote it: 'prompt=\"...\"'")


def sample_text(cfg: DictConfig) -> list[str]:
    check_sampling(cfg)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, path = load_model(cfg.checkpoint, device)
    tok = find_tokenizer(path, cfg.tokenizer)
    seq_len = model.config.seq_len
    if cfg.max_new_tokens > MAX_CONTEXTS * seq_len:
        raise ConfigError(f"max_new_tokens={cfg.max_new_tokens} is far beyond this model's context of {seq_len} "
                          f"tokens; allowed: 1 to {MAX_CONTEXTS * seq_len} ({MAX_CONTEXTS} contexts: past "
                          f"{seq_len} tokens each new one recomputes the whole context)")  # fmt: skip
    ids = tok.encode(cfg.prompt) or [tok.eos_id]
    if len(ids) > seq_len:
        raise ConfigError(f"the prompt is {len(ids)} tokens but this model reads at most {seq_len} "
                          f"(its seq_len); shorten the prompt")  # fmt: skip
    prompt = torch.tensor([ids] * cfg.num_samples, device=device)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    out = generate(model, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, generator=g)
    return [tok.decode(row.tolist()) for row in out]


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="generate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    for i, text in enumerate(sample_text(cfg)):
        if cfg.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(text)


if __name__ == "__main__":
    from .overrides import check_command_line

    exit_on_user_error(check_command_line)(sys.argv[1:], "generate")  # Hydra's own errors as one line
    main()
