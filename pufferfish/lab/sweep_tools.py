"""Helpers of the measuring job and the sweep tables (memory_table.py, speed_table.py): a job's
identity, what the memory model says about it, reading the jobs' own measure.json files, and the
max-layers search (bisection over the memory model, or over real measuring runs on a GPU).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from pufferfish.resolver import grad_ckpt_for, memory_shape, model_dict, predict_peak_bytes
from pufferfish.resolver.hardware import CUDA_CONTEXT_BYTES, GIB, choose_precision

SCHEMA = "pufferfish.measure/1"  # in every measure.json (measure.py); the tables read no other


def job_identity() -> dict:
    """The job's technique (its experiment/<table>@<table> choice), group choices and overrides under Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # called directly (tests, the Python API)
        return {"table": None, "technique": None, "choices": {}, "overrides": [], "multirun": False}
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/")}
    rows = [(k.split("/")[1].split("@")[0], v) for k, v in choices.items() if k.startswith("experiment/")]
    table, technique = rows[0] if rows else (None, None)
    return {"table": table, "technique": technique, "choices": choices, "overrides": list(hc.overrides.task),
            "multirun": hc.mode == RunMode.MULTIRUN}  # fmt: skip


def allocator_cap(hw) -> int:
    """Bytes PyTorch's allocator may hold: apply_memory_cap's limit for a profile smaller than the device
    (or one predicted for on a CPU), else what the hardware offers."""
    if hw.emulated or (hw.device == "cpu" and hw.profile != "cpu"):
        return max(hw.vram_bytes - CUDA_CONTEXT_BYTES, GIB // 4)  # as apply_memory_cap: the context is outside
    return hw.vram_bytes


def target_hardware(cfg, hw):
    """The hardware a prediction is for: on CPU with a gpu profile, that GPU (its precision), not the CPU."""
    if hw.device != "cpu" or hw.profile == "cpu":
        return hw
    precision, _ = choose_precision(cfg.optimizations.precision, bool(cfg.gpu.bf16), bool(cfg.gpu.fast_fp16), False)
    return replace(hw, precision=precision, device="cuda")  # a GPU that is not here: nothing runs on it


def job_prediction(cfg, hw, num_layers: int, num_dims: int, micro_batch: int, vocab: int) -> tuple:
    """(model dict, grad_ckpt, memory-model Shape) of one job on the card it is for: the Shape the planner
    builds (memory_shape: the card's precision, attention kernel and compilation) and checkpointing as the
    planner decides it (grad_ckpt_for, under optimizations.grad_ckpt=auto: only when the step does not fit)."""
    seq_len = cfg.model.seq_len or cfg.mode.seq_len
    mc = model_dict(cfg, num_layers, num_dims, vocab, seq_len)
    target = target_hardware(cfg, hw)
    ckpt = grad_ckpt_for(mc, cfg, target, micro_batch)
    # a measuring job's step is one micro-batch: its gradients are made in the backward
    return mc, ckpt, replace(memory_shape(mc, cfg, target, micro_batch, ckpt), grads_in_forward=False)


def predicted_max_layers(cfg, hw, num_dims: int, micro_batch: int, vocab: int, limit: int = 1024) -> int:
    """Largest num_layers whose predicted peak fits the allocator cap (bisection: the peak grows with depth)."""
    cap = allocator_cap(hw)
    lo, hi = 0, limit + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        fits = predict_peak_bytes(job_prediction(cfg, hw, mid, num_dims, micro_batch, vocab)[2]).total <= cap
        lo, hi = (mid, hi) if fits else (lo, mid)
    return lo


def technique_of(record: dict) -> str:
    return record.get("technique") or f"{record['choices'].get('optimizations')}+{record['choices'].get('attention')}"


def read_jobs(sweep_dir: Path) -> tuple[list[dict], list[str]]:
    """The jobs' own measure.json files under sweep_dir, and the job folders that have none (failed jobs).

    A file counts only where its job wrote it: it carries our schema and names the folder it lies in as
    its run directory, so copies, stray files and other tools' JSON are ignored.
    """
    records = []
    for path in sorted(Path(sweep_dir).rglob("measure.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("schema") == SCHEMA and \
                Path(str(record.get("run_dir", ""))).name == path.parent.name:  # fmt: skip
            record["job_dir"] = str(path.parent.relative_to(sweep_dir))
            records.append(record)
    done = {str(Path(sweep_dir) / r["job_dir"]) for r in records}
    failed = sorted(str(p.parent.relative_to(sweep_dir)) for p in Path(sweep_dir).rglob(".hydra")
                    if str(p.parent) not in done)  # fmt: skip
    return records, failed


def max_layers_of(records: list[dict]) -> tuple[int | None, str]:
    """(largest depth that fitted, how sure) from a technique's measured jobs and probes."""
    runs = {r["num_layers"]: r["fits"] for r in records if r.get("measured") and r.get("fits") is not None}
    fit = max((L for L, ok in runs.items() if ok), default=None)
    fail = min((L for L, ok in runs.items() if not ok), default=None)
    if fit is None:
        return None, f"none of {sorted(runs)} fits" if runs else "not measured"
    if fail is None or fail > fit + 1:
        return fit, "at least (not bisected: python -m pufferfish.lab.memory_table --search-max-layers)"
    return fit, "bisected" if fail == fit + 1 else f"non-monotone: {fail} layers failed"


def bisect_max_layers(fits: Callable[[int], bool], known: dict[int, bool], guess: int, limit: int = 256) -> int:
    """Largest L in [0, limit] with fits(L), fits being True up to it and False above (more layers, more
    memory). `known` holds results so far and gains every probe; the guess and its neighbour go first, since
    the memory model is usually within a layer or two; without a failure yet, the step doubles upward."""

    def bounds():
        lo = max((L for L, ok in known.items() if ok), default=0)
        return lo, min((L for L, ok in known.items() if not ok and L > lo), default=limit + 1)

    for _ in range(2):  # the guess, then its neighbour on the side the guess points to
        lo, hi = bounds()
        L = guess if guess not in known else guess + 1 if known[guess] else guess - 1
        if lo < L < hi:
            known[L] = fits(L)
    step = 1
    while (b := bounds())[1] - b[0] > 1:
        lo, hi = b
        L = min(lo + step, limit) if hi > limit else (lo + hi) // 2
        step *= 2
        known[L] = fits(L)
    return bounds()[0]


def probe(overrides: list[str], num_layers: int, job_dir: Path, timeout: int = 1200) -> dict:
    """One measuring job in a fresh process (a CUDA out-of-memory can leave the allocator fragmented), or its
    earlier result when job_dir already holds one (a search resumes where it stopped)."""
    out = job_dir / "measure.json"
    if not out.exists():
        keep = [o for o in overrides if not o.startswith(("model.num_layers=", "run_dir=", "hydra."))]
        cmd = [sys.executable, "-m", "pufferfish.lab.measure", *keep, f"model.num_layers={num_layers}",
               f"hydra.run.dir={job_dir}"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode or not out.exists():
            raise RuntimeError(f"probe {' '.join(cmd)} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(out.read_text())


class OutOfTime(Exception):
    pass


def search_max_layers(sweep_dir: Path, records: list[dict], workers: int = 6, minutes: float | None = None) -> dict:
    """For each technique of a measured sweep, bisect num_layers with probes under sweep_dir/max_layers/.
    The techniques run side by side: each probe is its own process with its own capped allocator. After
    `minutes` no probe starts: the technique's result is None and the table reports what was probed."""
    stop_at = time.monotonic() + 60 * minutes if minutes else float("inf")
    by_technique: dict[str, list[dict]] = {}
    for r in records:
        if r.get("measured") and r.get("fits") is not None:
            by_technique.setdefault(technique_of(r), []).append(r)

    def one(technique: str) -> int:
        runs = by_technique[technique]
        base = runs[0]["overrides"]  # the job's own overrides; the probe replaces its model.num_layers
        known = {r["num_layers"]: r["fits"] for r in runs}
        guess = runs[0]["predicted_max_layers"]
        points = sorted({(r["num_layers"], r["peak_bytes"]) for r in runs if r.get("peak_bytes")
                         and r["grad_ckpt"] == runs[0]["grad_ckpt"]})  # fmt: skip
        if len(points) >= 2:  # the measured peak grows linearly with depth: extrapolate to the cap
            (l0, p0), (l1, p1) = points[0], points[-1]
            slope = (p1 - p0) / max(1, l1 - l0)
            guess = int((runs[0]["cap_bytes"] - p0) / slope + l0) if slope > 0 else guess

        def fits(layers: int) -> bool:
            if time.monotonic() > stop_at:
                raise OutOfTime
            return probe(base, layers, Path(sweep_dir) / "max_layers" / f"probe_{technique}_L{layers}")["fits"]

        try:
            return bisect_max_layers(fits, known, max(1, guess))
        except OutOfTime:
            return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return dict(zip(by_technique, pool.map(one, by_technique)))


def markdown(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def gib(n: float | None) -> str:
    return "—" if n is None else f"{n / GIB:.2f}"
