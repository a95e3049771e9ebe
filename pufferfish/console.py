"""What a run leaves on disk besides its results: train.log holds what the console showed, errors
included, and a run that fails before writing anything of its own leaves no folder behind."""

from __future__ import annotations

import functools
import shutil
import sys
from pathlib import Path

HYDRA_ONLY = {".hydra", "train.log"}  # what Hydra writes into a run folder before Pufferfish runs


class Tee:
    """A console stream that also writes each finished line to a log file. A progress bar redraws its
    line with carriage returns; the log keeps only the last drawing of each line."""

    def __init__(self, stream, log):
        self.stream, self.log, self.pending = stream, log, ""

    def write(self, text: str) -> int:
        written = self.stream.write(text)
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            drawn = [part for part in line.split("\r") if part.strip()]
            self.log.write((drawn[-1] if drawn else "") + "\n")
        if lines:
            self.log.flush()
        return written

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def finish(self) -> None:
        if self.pending.strip():
            self.log.write(self.pending.rsplit("\r", 1)[-1] + "\n")
        self.pending = ""
        self.log.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding: the console's
        return getattr(self.stream, name)


def hydra_output_dir() -> Path | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):  # not under @hydra.main
        return None


def hydra_job_log() -> Path | None:
    """The log file Hydra keeps for the job in its output folder: <job name>.log (train.log for
    pufferfish.train), or None when the folder is not there."""
    folder = hydra_output_dir()
    if folder is None or not folder.is_dir():
        return None
    from hydra.core.hydra_config import HydraConfig

    return folder / f"{HydraConfig.get().job.name}.log"


def log_console(fn):
    """Wrap a Hydra task function: stdout and stderr also go to the job's log in Hydra's output folder
    (train.log for pufferfish.train), beside what Hydra's own logging writes there."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        path = hydra_job_log()
        if path is None:
            return fn(*args, **kwargs)
        with open(path, "a", encoding="utf-8", errors="replace") as log:
            out, err = Tee(sys.stdout, log), Tee(sys.stderr, log)
            sys.stdout, sys.stderr = out, err
            try:
                return fn(*args, **kwargs)
            finally:
                out.finish()
                err.finish()
                sys.stdout, sys.stderr = out.stream, err.stream

    return wrapper


def remove_if_unused(folder: Path) -> None:
    """Delete a run folder holding nothing Pufferfish wrote, then its parents under the working folder
    that this leaves empty (outputs/DATE/)."""
    cwd = Path.cwd().resolve()
    if folder.resolve() == cwd or not folder.is_dir() or not {p.name for p in folder.iterdir()} <= HYDRA_ONLY:
        return
    shutil.rmtree(folder, ignore_errors=True)
    parent = folder.resolve().parent
    while parent != cwd and parent.is_relative_to(cwd) and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def leaves_no_empty_run_dir(train_fn):
    """Wrap train(cfg): when it fails before writing into the run folder, the folder goes (the error was
    shown, and is not a run to resume). A folder that existed before, or holds a checkpoint, stays."""

    @functools.wraps(train_fn)
    def wrapper(cfg, *args, **kwargs):
        mine = [Path(cfg.run_dir)] if cfg.get("run_dir") and not Path(cfg.run_dir).exists() else []
        hydra_dir = hydra_output_dir()
        try:
            return train_fn(cfg, *args, **kwargs)
        except BaseException:
            for folder in [*mine, *([hydra_dir] if hydra_dir else [])]:
                remove_if_unused(folder)
            raise

    return wrapper
