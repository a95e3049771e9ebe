"""Tests compose the real Hydra config and shrink it, rather than building a parallel fake one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parents[1]
# the shared corpora beside the repo; PUFFERFISH_SHARED_DATA points elsewhere (the GPU machine's copy)
SHARED_DATA = Path(os.environ.get("PUFFERFISH_SHARED_DATA", ROOT.parent / "shared" / "data"))


def compose(*overrides: str):
    from pufferfish.api import compose_config

    return compose_config(list(overrides))


def shakespeare_file() -> Path:
    path = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if not path.exists():
        pytest.skip(f"real-text corpus not found at {path} (the shared data folder beside the repo)")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer/token cache for the whole session: preparing a corpus once is enough."""
    return tmp_path_factory.mktemp("pufferfish-cache")


def tiny_overrides(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    """A seconds-long CPU run on Shakespeare: the smallest real configuration."""
    return [
        "gpu=cpu", "mode=ultra_fast", "data=text_files", f"data.paths=['{shakespeare_file()}']",
        "data.vocab_size=512", "data.tokenizer_train_mb=1", f"data.cache_dir='{cache}'", f"run_dir='{run_dir}'",
        "train.progress=false", "train.sample_tokens=16", "train.eval_tokens=4096", *extra,
    ]  # fmt: skip


def run_cli(module: str, *args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})  # fmt: skip


def english_text(path: Path, kb: int, skip_kb: int = 0) -> Path:
    """`kb` KB of English prose every CPython install has: the documentation pages of pydoc_data.topics
    (the language reference's text), from `skip_kb` KB in, written to `path`."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    start = text.find("\n\n", skip_kb * 1024) + 2 if skip_kb else 0
    path.write_text(text[start : start + kb * 1024])
    return path
