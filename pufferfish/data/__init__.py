"""Data: corpus -> split -> tokenizer -> token files in a content-addressed cache -> training batches.

prepared = prepare_data(cfg.data)            # instant when the same corpus and settings were seen
batches = TrainBatches(prepared.train_path, prepared.dtype, seq_len, micro_batch, seed)
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import datasets

from ..errors import ConfigError, DataError, one_of
from .corpora import SAMPLE_BY, SOURCES, corpus_bytes
from .loader import TrainBatches, val_batches
from .tokenizer import TRAINER_SETTINGS, Tokenizer, auto_vocab_size, sample_lines, train_tokenizer
from .tokens import (
    FORMAT_VERSION,
    cache_root,
    content_hash,
    encode_split,
    entry_lock,
    token_dtype,
    write_json_atomic,
)

__all__ = ["PreparedData", "prepare_data", "load_prepared", "Tokenizer", "TrainBatches", "val_batches"]


@dataclass
class PreparedData:
    dir: Path
    train_path: Path
    val_path: Path
    tokenizer_path: Path
    vocab_size: int
    train_tokens: int
    val_tokens: int
    val_bytes_per_token: float  # UTF-8 bytes per validation token: loss / ln 2 / this = bits per byte
    dtype: str
    meta: dict

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.tokenizer_path)


def _check(cfg) -> None:
    if cfg.source not in SOURCES:
        raise one_of("data.source", cfg.source, SOURCES)
    if cfg.sample_by not in SAMPLE_BY:
        raise one_of("data.sample_by", cfg.sample_by, SAMPLE_BY)
    if not 0 < cfg.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.val_fraction} must be between 0 and 1 (e.g. 0.02)")
    if cfg.vocab_size is not None and cfg.vocab_size < 300:
        raise ConfigError(
            f"data.vocab_size={cfg.vocab_size} is too small: 256 byte pieces come first; use >= 300"
        )
    if cfg.tokenizer_train_mb <= 0:
        raise ConfigError(f"data.tokenizer_train_mb={cfg.tokenizer_train_mb} must be positive")
    if cfg.val_paths and cfg.source != "text":
        raise ConfigError(
            f"data.val_paths={list(cfg.val_paths)} is only for data.source=text, not {cfg.source!r}"
        )


@contextlib.contextmanager
def _datasets_progress(show: bool):
    was_disabled = datasets.are_progress_bars_disabled()
    if not show:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not show and not was_disabled:
            datasets.enable_progress_bars()


def cache_folder(cfg) -> tuple[Path, dict]:
    """The cache entry a data config's corpus is prepared into, and the key that names it: the corpus's
    cheap fingerprint, the split and the tokenizer settings (no text is read)."""
    tokenizer_settings = {"vocab_size": cfg.vocab_size or "auto", "train_mb": cfg.tokenizer_train_mb, **TRAINER_SETTINGS}
    key = {
        "format": FORMAT_VERSION,
        "source": cfg.source,
        "corpus": SOURCES[cfg.source].fingerprint(cfg),
        "split": {"val_fraction": cfg.val_fraction, "val_paths": bool(cfg.val_paths)},
        "tokenizer": tokenizer_settings,
    }
    return cache_root(cfg.cache_dir) / f"{cfg.name}-{content_hash(key)[:16]}", key


def prepare_data(cfg, progress: bool = True) -> PreparedData:
    _check(cfg)
    source = SOURCES[cfg.source]
    folder, key = cache_folder(cfg)
    digest, tokenizer_settings, root = content_hash(key), key["tokenizer"], folder.parent
    if (folder / "meta.json").exists():
        return load_prepared(folder)
    with entry_lock(folder):
        if (folder / "meta.json").exists():  # another process finished it while we waited
            return load_prepared(folder)
        for stale in folder.glob("*.tmp*"):  # left by an interrupted preparation; we hold the lock
            stale.unlink()
        started = time.perf_counter()
        with _datasets_progress(progress):
            corpus = source.load(cfg, root / "hf_datasets")
        lines = sample_lines(corpus.train, cfg.tokenizer_train_mb)
        vocab_size = cfg.vocab_size or auto_vocab_size(corpus_bytes(corpus.train))
        t = time.perf_counter()
        if progress:  # sentencepiece has no progress callback: say what is happening and how long it took
            print(f"training a {vocab_size}-piece BPE tokenizer on {len(lines):,} lines ...", file=sys.stderr)
        tokenizer = train_tokenizer(lines, folder / "tokenizer.model", vocab_size)
        if progress:
            print(f"tokenizer trained in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        dtype = token_dtype(tokenizer.vocab_size)
        train = encode_split(corpus.train, tokenizer, folder / "train.bin", dtype, progress, "encode train")
        val = encode_split(corpus.val, tokenizer, folder / "val.bin", dtype, progress, "encode val")
        meta = {
            "name": cfg.name,
            "source": cfg.source,
            "content_hash": digest,
            "key": key,
            "split": corpus.split,
            "train": train,
            "val": val,
            "val_bytes_per_token": val["bytes"] / max(val["tokens"], 1),
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "dtype": dtype,
            "tokenizer": tokenizer_settings,
            "prepare_seconds": round(time.perf_counter() - started, 2),
            "python": platform.python_version(),
        }
        write_json_atomic(folder / "meta.json", meta)  # last: its presence marks a complete entry
        if progress:
            print(
                f"data: {cfg.name}: {train['tokens']:,} train and {val['tokens']:,} validation tokens, "
                f"vocab {tokenizer.vocab_size}, prepared in {meta['prepare_seconds']:.1f}s in {folder}",
                file=sys.stderr,
            )
    return load_prepared(folder)


def load_prepared(dir) -> PreparedData:
    folder = Path(dir)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except FileNotFoundError:
        raise DataError(
            f"{folder} has no meta.json: it is not a prepared data folder (see prepare_data)"
        ) from None
    return PreparedData(
        dir=folder,
        train_path=folder / "train.bin",
        val_path=folder / "val.bin",
        tokenizer_path=folder / "tokenizer.model",
        vocab_size=meta["vocab_size"],
        train_tokens=meta["train"]["tokens"],
        val_tokens=meta["val"]["tokens"],
        val_bytes_per_token=meta["val_bytes_per_token"],
        dtype=meta["dtype"],
        meta=meta,
    )
