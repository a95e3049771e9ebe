"""Tests compose the real Hydra config and shrink it, rather than building a parallel fake one."""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parents[1]


def compose(*overrides: str):
    from pufferfish.api import compose_config

    return compose_config(list(overrides))


@functools.cache
def english_corpus() -> str:
    """About 1.1 MB of English every CPython install has, in paragraphs: the language reference's text
    (pydoc_data.topics, 465 KB), then the longer docstrings of the standard library's top-level modules."""
    from pydoc_data.topics import topics

    control = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # a docstring with NUL etc. is not prose
    docs = []
    for module in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(module.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200 and not control.search(doc):
                    docs.append(doc)
    return "\n\n".join([*(topics[k] for k in sorted(topics)), *docs])


@functools.cache
def english_file() -> Path:
    """english_corpus() as one file, written once under a name made from its content, so every test and
    every CLI run it starts reads the same text, and a second run of the suite reuses it."""
    text = english_corpus()
    folder = Path(tempfile.gettempdir()) / "pufferfish-tests"
    path = folder / f"english-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}.txt"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(text.encode("utf-8"))
        os.replace(tmp, path)  # whole or absent, also for suites running side by side
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer/token cache for the whole session: preparing a corpus once is enough."""
    return tmp_path_factory.mktemp("pufferfish-cache")


def tiny_overrides(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    """A seconds-long CPU run on real English text: the smallest real configuration."""
    return [
        "gpu=cpu", "mode=ultra_fast", "data=text_files", f"data.paths=['{english_file()}']",
        "data.vocab_size=512", "data.tokenizer_train_mb=1", f"data.cache_dir='{cache}'", f"run_dir='{run_dir}'",
        "train.progress=false", "train.sample_tokens=16", "train.eval_tokens=4096", *extra,
    ]  # fmt: skip


def run_cli(module: str, *args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})  # fmt: skip


def english_text(path: Path, kb: int, skip_kb: int = 0) -> Path:
    """`kb` KB of english_corpus() from `skip_kb` KB in (its first 465 KB are the language reference's
    text), written to `path`."""
    text = english_corpus()
    start = text.find("\n\n", skip_kb * 1024) + 2 if skip_kb else 0
    path.write_text(text[start : start + kb * 1024])
    return path
