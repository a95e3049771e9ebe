"""Pre-tokenisation: every document encoded once into flat token files that training memory-maps.

A cache entry is a folder named by a hash of everything that decides its contents: the corpus
fingerprint, the split settings and the tokenizer settings. meta.json is written last and atomically,
so its presence is the mark of a complete entry; an interrupted preparation leaves no meta.json and is
simply redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from datasets import Dataset
from tqdm import tqdm

from .corpora import iter_texts
from .tokenizer import Tokenizer

FORMAT_VERSION = 1  # bump when the files' layout or the encoding changes: old entries are then ignored
CHUNK_CHARS = 1 << 18  # long documents are encoded in pieces of about this size so all threads share them
BATCH_CHARS = 1 << 23  # text per encode call: enough to keep every thread busy, little enough to hold


def cache_root(cache_dir: str) -> Path:
    root = cache_dir or os.environ.get("PUFFERFISH_CACHE") or "~/.cache/pufferfish"
    return Path(root).expanduser()


def content_hash(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "uint32"  # half the disk and page cache for small vocabs


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def entry_lock(folder: Path):
    # Several processes (one per GPU, or two terminals) preparing the same entry: one works, the rest wait.
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no lock; atomic renames still keep every entry whole
        yield
        return
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _chunks(text: str) -> list[str]:
    # Cut at line ends: no piece contains a newline (the tokenizer trains on lines), so the tokens of the
    # pieces are exactly the tokens of the whole.
    if len(text) <= CHUNK_CHARS:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + CHUNK_CHARS) + 1 or len(text)
        pieces.append(text[start:end])
        start = end
    return pieces


def _pieces(ds: Dataset) -> Iterator[tuple[str, bool]]:
    for texts in iter_texts(ds, batch_size=256):
        for text in texts:
            chunks = _chunks(text)
            for k, chunk in enumerate(chunks):
                yield chunk, k == len(chunks) - 1  # (text, ends a document)


def encode_split(
    ds: Dataset, tokenizer: Tokenizer, path: Path, dtype: str, progress: bool, desc: str
) -> dict:
    stats = {"documents": 0, "bytes": 0, "tokens": 0}
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    bar = tqdm(total=len(ds), desc=desc, unit="doc", file=sys.stderr, disable=not progress, leave=False)

    def write(batch: list[tuple[str, bool]]) -> None:
        flat: list[int] = []
        for ids, (_, ends) in zip(
            tokenizer.encode_batch([p for p, _ in batch]), batch
        ):  # one thread per core
            flat += ids
            if ends:
                flat.append(tokenizer.eos_id)  # every document ends with end-of-text
        out.write(np.asarray(flat, dtype=dtype).tobytes())
        ended = sum(ends for _, ends in batch)
        stats["documents"] += ended
        stats["bytes"] += sum(len(p.encode("utf-8")) for p, _ in batch)
        stats["tokens"] += len(flat)
        bar.update(ended)

    with open(tmp, "wb") as out, bar:
        batch, chars = [], 0
        for piece, ends in _pieces(ds):
            batch.append((piece, ends))
            chars += len(piece)
            if chars >= BATCH_CHARS:  # bounded memory however long the documents are
                write(batch)
                batch, chars = [], 0
        if batch:
            write(batch)
    os.replace(tmp, path)
    return stats
