"""Where the text comes from: one registry entry per `data.source`, and the stable train/validation split.

Every source gives its documents as a Hugging Face `datasets.Dataset` with a "text" column, plus an "id"
column where a document has a natural name (its path), so the tokenizer and the encoder see one shape.
Each source also has a cheap fingerprint (file names, sizes and mtimes, or the hub address) that names
the cache entry without reading the text, so a prepared corpus is found again instantly.
"""

from __future__ import annotations

import hashlib
import os
import site
import sys
import sysconfig
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, are_progress_bars_disabled, load_dataset
from tqdm import tqdm

from ..errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")  # what a folder in data.paths is searched for
SAMPLE_BY = ("document", "paragraph", "line")  # the unit of a sample and of the validation split
MIN_HELD_OUT_SHARE = 0.01  # when hashing holds out nothing, at least this share of the text is taken
MIN_SPLITTABLE_CHARS = 2000  # a single document shorter than this cannot give a useful validation tail


@dataclass
class Corpus:
    train: Dataset  # column "text" (and "id" where documents have names)
    val: Dataset
    split: str  # how the validation documents were chosen, for meta.json


@dataclass
class Source:
    fingerprint: Callable  # (cfg) -> dict, cheap: it names the cache entry
    load: Callable  # (cfg, hf_cache: Path) -> Corpus, the expensive part, run only on a cache miss


def iter_texts(ds: Dataset, batch_size: int = 1024) -> Iterator[list[str]]:
    for batch in ds.iter(batch_size=batch_size):
        yield batch["text"]


def corpus_bytes(ds: Dataset) -> int:
    """UTF-8 bytes of a split's text."""
    return sum(len(t.encode("utf-8")) for texts in iter_texts(ds) for t in texts)


def _digest(items) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(repr(item).encode("utf-8"))
    return h.hexdigest()


def _stat_digest(files: list[Path]) -> str:
    # names, sizes and mtimes: any edit, addition or removal changes the cache entry, without reading text
    return _digest((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


# ---------------------------------------------------------------- the split


def split_keys(ds: Dataset) -> np.ndarray:
    # md5 of the id (or the text), as a number in [0, 1): stable across runs, machines, document order
    # and PYTHONHASHSEED, and identical paragraphs always land on the same side (no leak into validation)
    column = "id" if "id" in ds.column_names else "text"
    keys = []
    for batch in ds.iter(batch_size=4096):
        keys += [int.from_bytes(hashlib.md5(v.encode("utf-8")).digest()[:8], "big") for v in batch[column]]
    return np.array(keys, dtype=np.float64) / 2.0**64  # (N,)


def split_documents(ds: Dataset, val_fraction: float) -> Corpus:
    if len(ds) == 0:
        raise DataError("the corpus has no documents with text in them")
    keys = split_keys(ds)
    in_val = keys < val_fraction
    if 0 < in_val.sum() < len(ds):
        return Corpus(ds.select(np.flatnonzero(~in_val)), ds.select(np.flatnonzero(in_val)), "hash")
    if len(ds) == 1:
        return _split_tail(ds, val_fraction)
    # Too few documents for the hashed share to catch one: hold out the documents with the highest keys
    # (an order that does not depend on the input's order) until enough of the text is held out.
    sizes = np.array([len(t.encode("utf-8")) for texts in iter_texts(ds) for t in texts])
    target = max(val_fraction, MIN_HELD_OUT_SHARE) * sizes.sum()
    order = np.argsort(-keys, kind="stable")
    taken = 1 + int(np.searchsorted(np.cumsum(sizes[order]), target))
    held = np.sort(order[: min(taken, len(ds) - 1)])  # at least one document stays for training
    mask = np.zeros(len(ds), dtype=bool)
    mask[held] = True
    return Corpus(ds.select(np.flatnonzero(~mask)), ds.select(held), "highest-hash documents")


def _split_tail(ds: Dataset, val_fraction: float) -> Corpus:
    # One document (a single text file, say): its last lines become the validation text.
    row = ds[0]
    text, name = row["text"], row.get("id", "document")
    if len(text) < MIN_SPLITTABLE_CHARS:
        raise DataError(
            f"the corpus is one document ({name!r}) of {len(text)} characters: too little to hold out "
            f"validation text (need at least {MIN_SPLITTABLE_CHARS}); add more text or give data.val_paths=[...]"
        )
    share = max(val_fraction, MIN_HELD_OUT_SHARE)
    cut = int(len(text) * (1 - share))
    cut = text.rfind("\n", 0, cut) + 1 or cut  # at a line end where there is one
    train = Dataset.from_dict({"id": [f"{name}#head"], "text": [text[:cut]]})
    val = Dataset.from_dict({"id": [f"{name}#tail"], "text": [text[cut:]]})
    return Corpus(train, val, "tail of the only document")


# ---------------------------------------------------------------- pystdlib


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages", "__pycache__")]
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return root, sorted(files)


def _stdlib_fingerprint(cfg) -> dict:
    root, files = _stdlib_files()
    return {"python": sys.version.split()[0], "files": len(files), "stats": _stat_digest(files)}


def _stdlib_load(cfg, hf_cache: Path) -> Corpus:
    root, files = _stdlib_files()
    ids, texts = [], []
    for f in files:
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError:  # a few test fixtures are deliberately Latin-1 or broken
            continue
        if text.strip():  # empty __init__.py files would be documents of nothing but end-of-text
            ids.append(f.relative_to(root).as_posix())
            texts.append(text)
    if not texts:
        raise DataError(f"data=pystdlib found no readable .py files under {root}")
    return split_documents(Dataset.from_dict({"id": ids, "text": texts}), cfg.val_fraction)


# ---------------------------------------------------------------- pysource: all Python source on the machine

PYSOURCE_VAL_BYTES = 2 * 2**20  # validation text: enough for any evaluation, the same whatever the cap


def _python_roots() -> list[tuple[str, Path]]:
    """(label, folder): the standard library, then every site-packages folder, each once."""
    paths = sysconfig.get_paths()
    found = [("stdlib", paths["stdlib"]), ("site", paths["purelib"]), ("site", paths["platlib"])]
    found += [("site", p) for p in site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        found.append(("user", site.getusersitepackages()))
    roots: dict[Path, str] = {}
    for label, folder in found:
        path = Path(folder)
        if path.is_dir():
            roots.setdefault(path.resolve(), label)
    return [(label, path) for path, label in roots.items()]


def _python_files() -> list[tuple[str, Path, int]]:
    """(id, file, size) of every .py file under the roots, keyed by a stable hash of the id."""
    out, seen = [], set()
    for label, root in _python_roots():
        for folder, subfolders, names in os.walk(root):
            subfolders[:] = sorted(d for d in subfolders if d not in ("site-packages", "dist-packages", "__pycache__")
                                   and not d.startswith("."))  # fmt: skip
            for n in names:
                f = Path(folder, n)
                if n.endswith(".py") and f not in seen:
                    seen.add(f)
                    try:
                        out.append((f"{label}/{f.relative_to(root).as_posix()}", f, f.stat().st_size))
                    except OSError:  # a broken link: not text we can read
                        continue
    return sorted(out, key=lambda r: _key(r[0]))


def _key(doc_id: str) -> float:
    return int.from_bytes(hashlib.md5(doc_id.encode("utf-8")).digest()[:8], "big") / 2.0**64


def _pysource_fingerprint(cfg) -> dict:
    files = _python_files()
    return {"python": sys.version.split()[0], "files": len(files), "max_mb": cfg.max_mb,
            "stats": _digest((i, s, f.stat().st_mtime_ns) for i, f, s in files)}  # fmt: skip


def _read_source(f: Path) -> tuple[str | None, str]:
    try:
        text = f.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):  # a few test fixtures are deliberately Latin-1 or broken
        return None, ""
    return hashlib.sha1(text.encode("utf-8")).hexdigest(), text


def _pysource_load(cfg, hf_cache: Path) -> Corpus:
    """The files in the order of their hashed ids: those under val_fraction are the validation set (up to
    PYSOURCE_VAL_BYTES), the rest train, up to data.max_mb. A larger cap adds files and keeps the others, and
    a file that appears twice (vendored copies) is kept once, so validation text never appears in training."""
    files = _python_files()
    cap = cfg.max_mb * 2**20 if cfg.max_mb else float("inf")
    val, train, val_bytes, train_bytes = [], [], 0, 0
    for doc_id, f, size in files:
        if _key(doc_id) < cfg.val_fraction:
            if val_bytes < PYSOURCE_VAL_BYTES:
                val.append((doc_id, f))
                val_bytes += size
        elif train_bytes < cap:
            train.append((doc_id, f))
            train_bytes += size
    chosen = val + train
    workers = os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool:  # reading and hashing: file I/O and hashlib release the GIL
        read = list(tqdm(pool.map(_read_source, [f for _, f in chosen], chunksize=64), total=len(chosen),
                         desc="read python source", unit="file", disable=are_progress_bars_disabled()))  # fmt: skip
    seen: set[str] = set()
    parts: dict[str, dict[str, list]] = {"val": {"id": [], "text": []}, "train": {"id": [], "text": []}}
    for i, ((doc_id, _), (digest, text)) in enumerate(zip(chosen, read)):
        if digest is None or digest in seen or not text.strip():
            continue
        seen.add(digest)
        part = parts["val" if i < len(val) else "train"]
        part["id"].append(doc_id)
        part["text"].append(text)
    if not parts["train"]["text"] or not parts["val"]["text"]:
        raise DataError("data=pysource found too few readable .py files on this machine; use data=text_files")
    return Corpus(Dataset.from_dict(parts["train"]), Dataset.from_dict(parts["val"]), "hash")


# ---------------------------------------------------------------- text files


def _expand(paths, what: str) -> list[tuple[Path, str]]:
    # (file, id): a folder's files are named relative to the folder, so moving the folder keeps the split
    found: dict[Path, str] = {}
    for given in paths:
        path = Path(str(given)).expanduser()
        if not path.exists():
            raise DataError(f"{what}: {str(given)!r} does not exist (looked at {path.absolute()})")
        if path.is_file():
            found.setdefault(path.resolve(), path.name)
            continue
        files = sorted(
            f
            for f in path.rglob("*")
            if f.suffix.lower() in TEXT_SUFFIXES
            and f.is_file()
            and not any(p.startswith(".") for p in f.relative_to(path).parts)
        )
        if not files:
            raise DataError(
                f"{what}: folder {str(given)!r} has no text files ({', '.join('*' + s for s in TEXT_SUFFIXES)})"
            )
        for f in files:
            found.setdefault(f.resolve(), f.relative_to(path).as_posix())
    return sorted(found.items())


def _text_files(cfg) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    if not cfg.paths:
        raise DataError("data=text_files needs data.paths=[file_or_folder,...]; got data.paths=[]")
    val = _expand(cfg.val_paths, "data.val_paths")
    held = {f for f, _ in val}
    train = [(f, i) for f, i in _expand(cfg.paths, "data.paths") if f not in held]
    if not train:
        raise DataError(f"data.paths={list(cfg.paths)} holds only files that are also in data.val_paths")
    return train, val


def _text_fingerprint(cfg) -> dict:
    train, val = _text_files(cfg)
    return {
        "train": _stat_digest([f for f, _ in train]),
        "val": _stat_digest([f for f, _ in val]),
        "sample_by": cfg.sample_by,
    }


def _unusable(path: Path) -> str | None:
    data = path.read_bytes()
    if not data.strip():
        return "it is empty"
    if b"\x00" in data:
        return "it looks binary (it has NUL bytes)"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"it is not valid UTF-8 (byte {e.start} is 0x{data[e.start]:02x})"
    return None


def _usable(files: list[tuple[Path, str]], what: str) -> list[tuple[Path, str]]:
    keep, skipped = [], []
    for f, doc_id in files:
        why = _unusable(f)
        if why is None:
            keep.append((f, doc_id))
        else:
            skipped.append(f"{f}: {why}")
    if files and not keep:
        raise DataError(f"{what} has no usable text: " + "; ".join(skipped))
    for line in skipped:
        warnings.warn(f"{what}: skipping {line}", stacklevel=3)
    return keep


def _text_load(cfg, hf_cache: Path) -> Corpus:
    train, val = _text_files(cfg)
    train, val = _usable(train, "data.paths"), _usable(val, "data.val_paths")
    data_files = {"train": [str(f) for f, _ in train]}
    if val:
        data_files["validation"] = [str(f) for f, _ in val]
    loaded = load_dataset("text", data_files=data_files, sample_by=cfg.sample_by, cache_dir=str(hf_cache))
    parts = {}
    for split, files in (("train", train), ("validation", val)):
        if split not in loaded:
            continue
        ds = loaded[split]
        if cfg.sample_by == "document":  # one row per file, in data_files order: name the rows
            ds = ds.add_column("id", [doc_id for _, doc_id in files])
        else:  # blank lines and paragraphs of spaces would be samples of nothing but end-of-text
            ds = ds.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True)
        parts[split] = ds
    if "validation" in parts:
        return Corpus(parts["train"], parts["validation"], "data.val_paths")
    return split_documents(parts["train"], cfg.val_fraction)


# ---------------------------------------------------------------- hub (or a local dataset folder)


def _hub_fingerprint(cfg) -> dict:
    fp = {
        "hub_name": cfg.hub_name,
        "hub_config": cfg.hub_config,
        "hub_split": cfg.hub_split,
        "text_field": cfg.text_field,
        "max_hub_documents": cfg.max_hub_documents,
    }
    local = Path(cfg.hub_name).expanduser()
    if local.exists():  # a local dataset folder or file: its contents name the entry, as text files do
        files = sorted(f for f in local.rglob("*") if f.is_file()) if local.is_dir() else [local]
        fp["files"] = _stat_digest(files)
    return fp


def _hub_load(cfg, hf_cache: Path) -> Corpus:
    if not cfg.hub_name:
        raise DataError("data.source=hub needs data.hub_name (a hub dataset such as roneneldan/TinyStories)")
    where = f"data.hub_name={cfg.hub_name!r} (config {cfg.hub_config!r}, split {cfg.hub_split!r})"
    try:  # the machine's own HF cache, not ours: a dataset downloaded before is found there offline
        ds = load_dataset(cfg.hub_name, cfg.hub_config, split=cfg.hub_split, streaming=False)
    except Exception as e:  # offline, unknown name, bad config or split: all end the same way for the user
        raise DataError(
            f"could not load the dataset {where}: {type(e).__name__}: {e}. A hub dataset needs internet the "
            "first time (then the datasets cache serves it offline); without internet use data=pystdlib "
            "or data=text_files data.paths=[...]"
        ) from e
    if cfg.text_field not in ds.column_names:
        raise DataError(
            f"data.text_field={cfg.text_field!r} is not a column of {where}; columns: {ds.column_names}"
        )
    if cfg.max_hub_documents > 0:
        ds = ds.select(range(min(cfg.max_hub_documents, len(ds))))
    ds = ds.select_columns([cfg.text_field])
    if cfg.text_field != "text":
        ds = ds.rename_column(cfg.text_field, "text")
    ds = ds.filter(lambda b: [bool(t and t.strip()) for t in b["text"]], batched=True)
    if len(ds) == 0:
        raise DataError(f"{where} has no non-empty {cfg.text_field!r} values")
    return split_documents(ds, cfg.val_fraction)


SOURCES = {
    "pystdlib": Source(_stdlib_fingerprint, _stdlib_load),
    "python": Source(_pysource_fingerprint, _pysource_load),
    "text": Source(_text_fingerprint, _text_load),
    "hub": Source(_hub_fingerprint, _hub_load),
}
