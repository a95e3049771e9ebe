"""Jobs packed onto GPUs under memory: started, timed out, killed as a group, and reported as each ends."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pufferfish.api import compose_config

from .grouping import MODES, Pair, config_overrides, job_overrides

CONTEXT_GIB = 1.0  # per process, outside the allocator's cap: CUDA context, cuBLAS workspaces, kernels
WHOLE_CARD = 0.9  # a profile with this share of the card's memory or more (h200 on an H200) runs alone
# what a job may hold beyond its plan's predicted peak: the plan check measured peaks up to 4 % over it (a
# checkpointed fp16 plan) and the allocator's reserve up to 0.8 of a micro-batch's 16-bit logits beyond them,
# more for a plan that leaves memory free (docs/benchmarks.md, plan check)
PEAK_MARGIN = 1.25
HOLD_AFTER_S = 60.0  # a job that cannot start lets smaller ones past it this long, then a card is held for it


@dataclass
class Job:
    profile: str
    mode: str
    run_dir: Path
    need_gib: float = 0.0  # memory it is expected to hold on its card
    gpu: str = ""
    shared: bool = False  # another job ran on the same card at the same time
    proc: subprocess.Popen | None = None
    started: float = 0.0
    rc: int | None = None
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)  # the pairs its run stands for; the first is its own
    peak_bytes: int = 0  # the predicted peak of its plan: the order among jobs of the same memory

    @property
    def name(self) -> str:
        return f"{self.profile}-{self.mode}"


class Cards:
    """Which jobs run where: a card takes a job while it has a slot and the memory for it."""

    def __init__(self, ids: list[str], capacity_gib: float, per_card: int):
        self.ids, self.capacity, self.per_card = ids, capacity_gib, per_card
        self.running: dict[str, list[Job]] = {i: [] for i in ids}

    def free_gib(self, card: str) -> float:
        return self.capacity - sum(j.need_gib for j in self.running[card])

    def fits(self, card: str, job: Job) -> bool:
        jobs = self.running[card]
        return not jobs or (len(jobs) < self.per_card and job.need_gib <= self.free_gib(card))


def need_gib(profile: str, extra: list[str], card_gib: float) -> float:
    """Memory a job can hold on its card: its cap bounds the allocator, and the CUDA context comes on top."""
    gpu = compose_config([f"gpu={profile}", *config_overrides(extra)]).gpu
    if float(gpu.vram_gb) >= WHOLE_CARD * card_gib or not gpu.get("emulate", True):
        return card_gib  # (nearly) the card's own memory: it may use all of it
    return float(gpu.vram_gb) + CONTEXT_GIB


def planned_need_gib(cap_gib: float, peak_bytes: int) -> float:
    """A job's need given its plan's predicted peak (0: unknown): a plan that leaves its cap (need_gib) mostly
    unused needs only that peak with PEAK_MARGIN more, and shares the card where its cap alone would not."""
    return min(cap_gib, peak_bytes * PEAK_MARGIN / 2**30 + CONTEXT_GIB) if peak_bytes else cap_gib


def job_command(job: Job, args, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "pufferfish.train", *job_overrides(job.profile, job.mode, args, extra),
            f"run_dir='{job.run_dir}'", f"hydra.run.dir='{job.run_dir}'"]  # fmt: skip


def fresh_run_dir(path: Path) -> None:
    """A job must not resume an old run: clear the run directory an earlier check left."""
    if path.exists():
        if not any((path / marker).exists() for marker in ("plan.json", "config.yaml", ".hydra", "checkpoints")):
            sys.exit(f"{path} exists and is not a run directory; choose another --out")
        shutil.rmtree(path)


def start(job: Job, card: str, cards: Cards, args, extra: list[str], logs: Path) -> None:
    fresh_run_dir(job.run_dir)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "" if args.device == "cpu" else card}
    share = max(1, (os.cpu_count() or 1) // (len(cards.ids) * cards.per_card))
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(share))  # the jobs' compiles share the cores
    env.setdefault("OMP_NUM_THREADS", str(share))
    with open(logs / f"{job.name}.out", "w") as out, open(logs / f"{job.name}.err", "w") as err:
        job.proc = subprocess.Popen(job_command(job, args, extra), env=env, stdout=out, stderr=err,
                                    start_new_session=True)  # fmt: skip  # its own group, ended as one
    job.gpu, job.started = card, time.perf_counter()
    for other in cards.running[card]:  # `place` has put it there, beside any others
        if other is not job:
            job.shared = other.shared = True
    where = "cpu" if args.device == "cpu" else f"GPU {card}"
    print(f"[{time.strftime('%H:%M:%S')}] start {job.name} on {where} (~{job.need_gib:.1f} GiB)", file=sys.stderr)


def stop_group(job: Job) -> None:
    try:
        os.killpg(job.proc.pid, signal.SIGKILL)  # the job's own process group (start_new_session)
    except ProcessLookupError:
        pass
    job.proc.wait()


def place(pending: list[Job], cards: Cards, now: float, waiting: dict[str, float],
          hold_after_s: float = HOLD_AFTER_S) -> list[tuple[Job, str]]:  # fmt: skip
    """The jobs to start now and their cards, in `pending`'s order (biggest first), each on the fullest card that
    takes it. A job no card can take lets smaller ones past it (on one card, two 80 GiB jobs must not idle the
    rest) until it has waited `hold_after_s` (`waiting`: since when, by job name); then the emptiest card is
    held for it and takes no other job. Marks the chosen jobs as running on their cards."""
    held: set[str] = set()
    chosen = []
    for job in pending:
        open_cards = [c for c in cards.ids if c not in held and cards.fits(c, job)]
        if open_cards:
            card = min(open_cards, key=cards.free_gib)
            cards.running[card].append(job)
            waiting.pop(job.name, None)
            chosen.append((job, card))
        elif not held and now - waiting.setdefault(job.name, now) >= hold_after_s:
            held.add(max(cards.ids, key=cards.free_gib))
    return chosen


def run_jobs(jobs: list[Job], cards: Cards, args, extra: list[str], logs: Path, deadline: float, on_done=None):
    """Biggest first (by memory, then the longest mode, then the predicted peak), placed as `place` says.
    Returns the jobs never started (--max-minutes)."""
    pending = sorted(jobs, key=lambda j: (-j.need_gib, -MODES.index(j.mode) if j.mode in MODES else 0,
                                          -j.peak_bytes))  # fmt: skip
    waiting: dict[str, float] = {}
    try:
        while any(cards.running.values()) or (pending and time.perf_counter() < deadline):
            now = time.perf_counter()
            for running in cards.running.values():
                for job in list(running):
                    if job.proc.poll() is None:
                        if now - job.started < args.timeout and now < deadline:
                            continue
                        stop_group(job)
                        job.notes.append("killed at --max-minutes" if now >= deadline else f"killed after "
                                         f"--timeout {args.timeout:.0f} s")  # fmt: skip
                    job.rc, job.wall_s = job.proc.returncode, now - job.started
                    running.remove(job)
                    print(f"[{time.strftime('%H:%M:%S')}] done  {job.name}: exit {job.rc}, {job.wall_s:.0f} s",
                          file=sys.stderr)  # fmt: skip
                    if on_done:
                        on_done(job)
            for job, card in place(pending, cards, now, waiting) if now < deadline else []:
                start(job, card, cards, args, extra, logs)
                pending.remove(job)
            time.sleep(0.5)
    finally:  # Ctrl-C or an error here: no job outlives the check
        for running in cards.running.values():
            for job in running:
                if job.proc is not None:
                    stop_group(job)
    return pending
