"""Checkpoints that survive a crash at any moment.

Each is written to a temporary file in the same folder, fsynced and renamed into place, with a SHA-256
sidecar; the `latest` pointer is replaced last. Loading verifies the checksum and falls back to the
previous good checkpoint when the newest is truncated or corrupt.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError, PufferfishWarning

POINTER = "latest"
BEST = "best.pt"  # the weights of the lowest validation loss seen: what a run hands over


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(Path(path), text.encode())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_training_state(state: dict, path: Path, model, optimizer, scaler) -> None:
    """Model, optimizer, grad scaler and every RNG from a checkpoint (the loop restores its counters).
    A sharded model (FSDP2) takes its shards of the full state dict: every rank calls this."""
    from .sharding import load_full_state

    try:
        load_full_state(model, optimizer, state["model"], state["optimizer"])
    except (RuntimeError, ValueError) as e:  # ValueError: the optimizer's parameter groups differ in size
        raise CheckpointError(f"{path} does not fit this model ({str(e).splitlines()[0]}); it may come from "
                              f"another version of Pufferfish. Start a new run directory") from None  # fmt: skip
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])


def checkpoint_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("step_*.pt"))


def _write_verified(path: Path, state: dict) -> None:
    """torch.save to a temporary file, fsync, rename into place, then the SHA-256 sidecar."""
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        kind = path.name.split("_")[0].removesuffix(".pt")  # step or best
        for stale in path.parent.glob(f".{kind}*.pt.tmp*"):  # left by a process that died while writing
            stale.unlink(missing_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        digest = _sha256(tmp)
        os.replace(tmp, path)
        atomic_write_text(path.parent / f"{path.name}.sha256", digest + "\n")
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(folder: Path, state: dict, step: int, keep: int = 3) -> Path:
    """Write step_N.pt, its checksum, then the `latest` pointer; keep the newest `keep` (0 = all)."""
    folder = Path(folder)
    path = folder / f"step_{step:08d}.pt"
    try:
        _write_verified(path, state)
        atomic_write_text(folder / POINTER, path.name + "\n")  # last: a crash before this keeps the old pointer
    except OSError as e:  # a full disk, a vanished mount: the previous checkpoint and pointer are intact
        kept = [f.name for f in checkpoint_files(folder) if f != path] if folder.is_dir() else []
        raise CheckpointError(
            f"could not write checkpoint {path} ({e.strerror or e}); "
            + (f"the previous one, {kept[-1]}, is intact: " if kept else "")
            + "free some disk space (or fix the folder) and run the same command again to resume"
        ) from None
    for old in checkpoint_files(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
        Path(f"{old}.sha256").unlink(missing_ok=True)
    return path


def save_best(folder: Path, weights: dict, model_config: dict, record: dict) -> Path:
    """best.pt: the weights (no optimizer state) of the best evaluation, with the model config to build
    them and the evaluation's record (step, val_loss, ...)."""
    path = Path(folder) / BEST
    try:
        _write_verified(path, {"model": weights, "model_config": model_config, **record})
    except OSError as e:
        raise CheckpointError(f"could not write {path} ({e.strerror or e}); free some disk space (or fix the "
                              f"folder) and run the same command again to resume") from None  # fmt: skip
    return path


def verify(path: Path) -> None:
    """CheckpointError unless the file matches its SHA-256 sidecar."""
    sidecar = Path(f"{path}.sha256")
    if not sidecar.exists():
        raise CheckpointError(f"{path} has no checksum file {sidecar.name} (its write did not finish)")
    if _sha256(path) != sidecar.read_text().strip():
        raise CheckpointError(f"{path} does not match its checksum (truncated or corrupt)")


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """One checkpoint, verified against its SHA-256 sidecar; CheckpointError says what is wrong."""
    verify(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a file that passes its checksum but still fails to unpickle
        raise CheckpointError(f"{path} could not be read: {e}") from e


def _newest_first(folder: Path) -> list[Path]:
    """The one `latest` names (the newest whose write finished), then the others, newest first."""
    files = checkpoint_files(folder)
    pointer = folder / POINTER
    named = folder / pointer.read_text().strip() if pointer.exists() else None
    return ([named] if named in files else []) + [f for f in reversed(files) if f != named]


def _first_good(folder: Path, check) -> tuple:
    """(check(path), path) for the first checkpoint that passes; warns about the ones skipped."""
    problems = []
    for path in _newest_first(folder):
        try:
            result = check(path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:  # a damaged one is skipped with a warning, never deleted
            warnings.warn(f"skipping damaged checkpoint(s): {'; '.join(problems)}. Using {path.name} instead",
                          PufferfishWarning, stacklevel=3)  # fmt: skip
        return result, path
    raise CheckpointError(
        f"no usable checkpoint in {folder}: " + "; ".join(problems)
        + ". Start a new run directory, or delete the damaged files to start this one afresh."
    )


def load_latest(folder: Path, map_location="cpu") -> tuple[dict, Path] | None:
    """The newest checkpoint that verifies, or None when the folder holds none at all."""
    folder = Path(folder)
    if not checkpoint_files(folder):
        return None
    return _first_good(folder, lambda path: load_checkpoint(path, map_location))


def step_of(path: Path) -> int:
    match = re.fullmatch(r"step_(\d+)\.pt", path.name)
    return int(match.group(1)) if match else -1


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A run directory, its checkpoints folder, its `latest` pointer, or one checkpoint file -> the file to load.

    In a folder: best.pt, the weights a run hands over, when it verifies; else the latest checkpoint. When
    that is damaged, the newest intact one takes its place (with a warning naming it) only if it is a trained
    one: falling back to the initial step-0 checkpoint would generate from, or export, an untrained model
    without anyone noticing, so that one must be named. `RUN_DIR/checkpoints/latest` names the last weights.
    """
    p = Path(path)
    if p.name == POINTER and p.parent.is_dir() and not p.is_dir():  # the last weights, not the best
        folder = p.parent
    elif p.is_dir():
        folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        best = folder / BEST
        if best.exists():
            try:
                verify(best)
                return best
            except CheckpointError as e:
                warnings.warn(f"{e}; using the newest step checkpoint instead of the best weights",
                              PufferfishWarning, stacklevel=2)  # fmt: skip
    elif p.is_file():
        return p
    else:
        raise CheckpointError(f"checkpoint={path} does not exist; give a run directory or a .pt file")
    if not checkpoint_files(folder):
        raise CheckpointError(f"checkpoint={path}: no checkpoints in {folder}")
    problems = []
    for candidate in _newest_first(folder):
        try:
            verify(candidate)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if not problems:
            return candidate
        if step_of(candidate) == 0:
            raise CheckpointError(
                f"checkpoint={path}: {'; '.join(problems)}; the only intact one is {candidate.name}, the "
                f"untrained initial model. To use it anyway, name it: checkpoint={candidate}")
        warnings.warn(f"skipping damaged checkpoint(s): {'; '.join(problems)}. Using {candidate.name} instead",
                      PufferfishWarning, stacklevel=2)  # fmt: skip
        return candidate
    raise CheckpointError(f"checkpoint={path}: no intact checkpoint in {folder}: {'; '.join(problems)}")
