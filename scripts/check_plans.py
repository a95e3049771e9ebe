"""Does every gpu profile x mode plan run under its emulated memory cap, and fill it? (issue 3)

    python scripts/check_plans.py --out outputs/check_plans          # 11 profiles x 4 modes on every GPU here
    python scripts/check_plans.py --list                             # which pairs share a job; runs nothing
    python scripts/check_plans.py --profiles gtx1060,rtx3060 --modes standard --gpus 1 --jobs-per-gpu 4
    python scripts/check_plans.py --max-minutes 7 -- data=text_files data.paths=[corpus.txt]   # extra overrides
    python scripts/check_plans.py --device cpu --profiles cpu --modes ultra_fast       # the machinery, on CPU

Each job is `python -m pufferfish.train gpu=P mode=M train.max_steps=20` (no evaluation until the end, no
sample) in its own run directory OUT/P-M; a profile smaller than the card caps the process's allocator at
the profile's memory (apply_memory_cap in pufferfish/resolver/hardware.py). A dry run first builds the
tokenizer/token cache alone. Then every pair's plan is made here, in this process, by the code's own
hardware_on (detect_hardware's rules) and make_plan for the card the jobs will see (described by
nvidia-smi: this process never starts CUDA, which would take memory from the jobs). Pairs whose plans agree on everything that sets the
peak memory, the allocator's cap and how far 20 steps get (memory_key) run as one job; each pair keeps its
own row with that run's measurements ("same plan as P/M") and its own verdict. Should the run's own plan
differ from the one planned here, the other pairs run on their own after all. `--list` prints this grouping
and runs nothing; without a GPU it plans for an assumed card of --gpu-mem-gib (default an H200's).

Jobs then run several at once: a GPU takes up to --jobs-per-gpu of them while their memory (the profile's,
which the cap bounds, + the CUDA context) fits on the card; the biggest (and the longest modes) go first, a
profile of (nearly) the card's size runs alone, and a job that failed beside others is run again alone
before it counts as a failure.

Per pair: use = peak allocated (CPU: peak RSS) / the allocator's cap (sweep_tools.allocator_cap: the limit
apply_memory_cap sets, or the memory the plan was given when not emulated). Verdicts: ok (>= 70 %), OOM (an
oom_backoff record or an out-of-memory exit), crash, timeout, below 70 %, or not memory-bound: the micro-batch
holds the whole target batch, or twice it would still fit, so memory did not limit the plan. The binding
constraint is that of the pair's plan without train.max_steps (which makes it "user" and changes neither the
model nor the micro-batch; a row says so if they differ). OUT/check_plans.md and .json are rewritten as each
job ends. Exit status 1 when any pair OOMs, crashes, times out or does not run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from omegaconf import OmegaConf  # noqa: E402

from pufferfish.api import compose_config  # noqa: E402
from pufferfish.data import prepare_data  # noqa: E402
from pufferfish.resolver import Hardware, detect_hardware, make_plan, predict_peak_bytes  # noqa: E402
from pufferfish.resolver.hardware import (  # noqa: E402
    CUDA_CONTEXT_BYTES,
    GIB,
    hardware_on,
)
from pufferfish.resolver.plan import _shape, memory_budget  # noqa: E402
from pufferfish.sweep_tools import allocator_cap  # noqa: E402
from pufferfish.validate import validate  # noqa: E402

PROFILES = "gtx1650 gtx1060 rtx2060 rtx3060 rtx4060 rtx3090 rtx4090 a100_40gb a100_80gb h100 h200".split()
MODES = "ultra_fast quick_dev standard extended".split()
TARGET_USE = 0.70
CONTEXT_GIB = 1.0  # per process, outside the allocator's cap: CUDA context, cuBLAS workspaces, kernels
WHOLE_CARD = 0.9  # a profile with this share of the card's memory or more (h200 on an H200) runs alone
FAILED = ("OOM", "crash", "timeout", "not run")
ASSUMED_CARD_GIB = 140.4  # an H200's memory as torch reports it: --list's card when no GPU is here


@dataclass
class Pair:
    """One gpu profile x mode, and the plan it gets here for the card its job will run on."""

    profile: str
    mode: str
    plan: dict | None = None  # Plan.to_dict(), made with the job's own overrides
    key: str | None = None  # memory_key: pairs with the same one run as one job; None: a job of its own
    error: str = ""  # why no plan could be made here (its job runs alone, and shows it)

    @property
    def name(self) -> str:
        return f"{self.profile}-{self.mode}"


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
    label: str = ""  # the name of its logs, when not profile-mode
    pairs: list[Pair] = field(default_factory=list)  # the pairs its run stands for; the first is its own
    peak_bytes: int = 0  # the predicted peak of its plan: the order among jobs of the same memory

    @property
    def name(self) -> str:
        return self.label or f"{self.profile}-{self.mode}"


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


def config_overrides(extra: list[str]) -> list[str]:
    """The extra overrides that shape the plan (Hydra's own settings and the run directory do not)."""
    skip = ("hydra.", "hydra/", "run_dir=", "train.max_steps=", "dry_run=")
    return [o for o in extra if not o.lstrip("+~").startswith(skip)]


def need_gib(profile: str, extra: list[str], card_gib: float) -> float:
    """Memory a job can hold on its card: its cap bounds the allocator, and the CUDA context comes on top."""
    gpu = compose_config([f"gpu={profile}", *config_overrides(extra)]).gpu
    if float(gpu.vram_gb) >= WHOLE_CARD * card_gib or not gpu.get("emulate", True):
        return card_gib  # (nearly) the card's own memory: it may use all of it
    return float(gpu.vram_gb) + CONTEXT_GIB


def job_overrides(profile: str, mode: str, args, extra: list[str]) -> list[str]:
    """A job's Hydra overrides, but its run directory."""
    device = "cpu" if args.device == "cpu" else "cuda:0"  # each job sees its one GPU (CUDA_VISIBLE_DEVICES)
    return [f"gpu={profile}", f"mode={mode}", f"train.max_steps={args.steps}", "train.eval_interval=1000000000",
            "train.sample_tokens=0", "train.progress=false", "train.keep_checkpoints=1", f"train.device={device}",
            *extra]  # fmt: skip


def job_command(job: Job, args, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "pufferfish.train", *job_overrides(job.profile, job.mode, args, extra),
            f"run_dir='{job.run_dir}'", f"hydra.run.dir='{job.run_dir}'"]  # fmt: skip


def job_time_limit(args) -> float:
    """The longest a job can run: --timeout, or --max-minutes when shorter."""
    return min(args.timeout, 60 * args.max_minutes if args.max_minutes else float("inf"))


# -- which pairs share a job ------------------------------------------------------------------------------


def run_config(cfg) -> dict:
    """A job's config but for its gpu profile and mode: what those two do to a run, its plan carries (the model,
    micro-batch, precision, checkpointing, the hardware's cap; the mode's time budget in memory_key)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    for key in ("gpu", "mode", "run_dir"):
        config.pop(key, None)
    return config


def memory_key(plan: dict, config: dict, time_limit_s: float) -> str:
    """What sets a job's peak memory and its allocator's cap, and how far its steps get: pairs with the same
    key run the very same job, so one run measures them all.

    The accumulation counts only as one micro-batch or several (pufferfish/train.py's step): from the second
    micro-batch on, the gradients of the first are held (they accumulate in place) beside a whole forward and
    backward; with one, the last step's gradients were freed (zero_grad to None) and a step's gradients grow
    while its activations are released. The mode's time budget (and then the exact accumulation, which sets
    how many steps fit in it) counts where it can end the job before the job's own time limit."""
    hw = hardware_of(plan)
    budget_binds = plan["time_budget_s"] < time_limit_s
    return json.dumps({
        "model": plan["model"], "micro_batch": plan["micro_batch"], "seq_len": plan["seq_len"],
        "precision": plan["precision"], "grad_ckpt": plan["grad_ckpt"], "steps": plan["steps"],
        "world_size": plan.get("world_size", 1), "accumulates": plan["grad_accum"] > 1,
        "grad_accum": plan["grad_accum"] if budget_binds else None,
        "time_budget_s": plan["time_budget_s"] if budget_binds else None,
        "cap_bytes": allocator_cap(hw), "emulated": hw.emulated, "device": hw.device,
        "data_fraction": plan["data_fraction"] if hw.device == "cpu" else None,  # peak RSS holds the pages read
        "config": config,
    }, sort_keys=True)  # fmt: skip


def hardware_of(plan: dict) -> Hardware:
    return Hardware(**{k: v for k, v in plan["hardware"].items() if k in {f.name for f in fields(Hardware)}})


def pair_for(profile: str, mode: str, cfg, plan: dict, time_limit_s: float) -> Pair:
    return Pair(profile, mode, plan, memory_key(plan, run_config(cfg), time_limit_s))


def group_pairs(pairs: list[Pair]) -> list[list[Pair]]:
    """Pairs with the same key, in the order given; each group's first runs for all: the one with the fewest
    accumulation steps (the same peak, the shortest job), then the first given."""
    groups: dict[str, list[Pair]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(pair.key or f"alone {i}", []).append(pair)
    return [sorted(g, key=lambda p: p.plan["grad_accum"] if p.plan else 0) for g in groups.values()]


def ran_as_planned(pair: Pair, run_plan: dict, backed_off: bool, time_limit_s: float) -> bool:
    """Whether the run's own plan (plan.json) is the one planned here for its pair: only then does the run
    stand for the other pairs of its group (an out-of-memory back-off keeps the micro-batch x accumulation)."""
    planned, ran = pair.plan, dict(run_plan)
    if planned is None or pair.key is None:
        return False
    if backed_off and ran["micro_batch"] * ran["grad_accum"] == planned["micro_batch"] * planned["grad_accum"]:
        ran.update(micro_batch=planned["micro_batch"], grad_accum=planned["grad_accum"])
    return memory_key(ran, json.loads(pair.key)["config"], time_limit_s) == pair.key


def as_run(planned: dict, ran: dict) -> dict:
    """Another pair's plan as the shared run ran it: after an out-of-memory back-off, the run's micro-batch
    and the pair's accumulation scaled alike."""
    scale = max(1, planned["micro_batch"] // max(1, ran["micro_batch"]))
    return {**planned, "micro_batch": ran["micro_batch"], "grad_accum": planned["grad_accum"] * scale}


def plan_pairs(args, extra: list[str], card: tuple[str, int] | None) -> list[Pair]:
    """Every pair's plan, as its job would make it (pufferfish/run.py's plan_for: detect_hardware, then
    make_plan on the prepared data), for the card (name, bytes) its job will see; card None: the CPU."""
    prepared, pairs, limit = {}, [], job_time_limit(args)
    skip = ("hydra.", "hydra/", "run_dir=", "dry_run=")
    for profile in args.profiles:
        for mode in args.modes:
            try:
                cfg = compose_config([o for o in job_overrides(profile, mode, args, extra)
                                      if not o.lstrip("+~").startswith(skip)])  # fmt: skip
                validate(cfg)
                data_key = OmegaConf.to_yaml(cfg.data)
                if data_key not in prepared:
                    prepared[data_key] = prepare_data(cfg.data, progress=False)
                data = prepared[data_key]
                if card:  # the card as its job will see it: all free but the CUDA context
                    name, total = card
                    hw = hardware_on(cfg.gpu, cfg.optimizations, cfg.train.device, name, total,
                                     total - CUDA_CONTEXT_BYTES)  # fmt: skip
                else:
                    hw = detect_hardware(cfg.gpu, cfg.optimizations, cfg.train.device)
                plan = make_plan(cfg, hw, data.vocab_size, data.train_tokens)
            except Exception as e:  # noqa: BLE001 - its job runs alone and shows the error in full
                pairs.append(Pair(profile, mode, error=(str(e).splitlines() or [type(e).__name__])[0]))
                continue
            pairs.append(pair_for(profile, mode, cfg, plan.to_dict(), limit))
    return pairs


def grouping_text(groups: list[list[Pair]], where: str) -> str:
    pairs = [p for g in groups for p in g]
    data = sorted({(p.plan["corpus_tokens"], p.plan["model"]["vocab_size"]) for p in pairs if p.plan})
    lines = [f"{len(pairs)} profile x mode pairs need {len(groups)} distinct jobs, for {where}.",
             "The grouping holds for that device and this data only: plans follow the card's memory and the "
             "corpus size (" + "; ".join(f"{c:,} corpus tokens, vocabulary {v:,}" for c, v in data) + ").", "",
             "| job | runs | and stands for | layers x dims | micro x accum x seq | precision | ckpt | cap GiB |",
             "|" + "---|" * 8]  # fmt: skip
    for i, (first, *rest) in enumerate(groups, 1):
        others = ", ".join(p.name for p in rest)
        if first.plan is None:
            lines.append(f"| {i} | {first.name} | | | | | | not planned here: {first.error} |")
            continue
        plan, hw = first.plan, hardware_of(first.plan)
        accum = "/".join(sorted({str(p.plan["grad_accum"]) for p in (first, *rest)}, key=int))
        lines.append(f"| {i} | {first.name} | {others} | {plan['model']['num_layers']} x {plan['model']['num_dims']} "
                     f"| {plan['micro_batch']} x {accum} x {plan['seq_len']} | {plan['precision']} | "
                     f"{'yes' if plan['grad_ckpt'] else 'no'} | {gib(allocator_cap(hw))}"
                     f"{' (emulated)' if hw.emulated else ''} |")  # fmt: skip
    return "\n".join(lines)


def planning_card(args) -> tuple[tuple[str, int] | None, str]:
    """The card the jobs will see, as nvidia-smi describes it (no CUDA here), or --list's assumed card when
    no GPU is visible; None on --device cpu. Returns (card, what it is, in words)."""
    if args.device == "cpu":
        return None, "the CPU (gpu=cpu, no emulation)"
    ids = gpu_ids(args.gpus)
    if ids:
        name, total_gib = card_info(ids[0])
        total_gib = args.gpu_mem_gib or total_gib
        return (name, int(total_gib * GIB)), f"GPU {ids[0]} here: {name}, {total_gib:.1f} GiB"
    total_gib = args.gpu_mem_gib or ASSUMED_CARD_GIB
    return (f"assumed card of {total_gib:.1f} GiB", int(total_gib * GIB)), (
        f"an assumed card of {total_gib:.1f} GiB: no GPU is visible here, so the profiles' Hardware is built for a "
        f"card of that size (--gpu-mem-gib; default {ASSUMED_CARD_GIB}, an H200's)")


# -- running ----------------------------------------------------------------------------------------------


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
        job.proc = subprocess.Popen(job_command(job, args, extra), cwd=ROOT, env=env, stdout=out, stderr=err,
                                    start_new_session=True)  # fmt: skip  # its own group, ended as one
    job.gpu, job.started = card, time.perf_counter()
    for other in cards.running[card]:
        job.shared = other.shared = True
    cards.running[card].append(job)
    where = "cpu" if args.device == "cpu" else f"GPU {card}"
    print(f"[{time.strftime('%H:%M:%S')}] start {job.name} on {where} (~{job.need_gib:.1f} GiB)", file=sys.stderr)


def stop_group(job: Job) -> None:
    try:
        os.killpg(job.proc.pid, signal.SIGKILL)  # the job's own process group (start_new_session)
    except ProcessLookupError:
        pass
    job.proc.wait()


def run_jobs(jobs: list[Job], cards: Cards, args, extra: list[str], logs: Path, deadline: float, on_done=None):
    """Biggest first (by memory, then the longest mode, then the predicted peak), on the fullest card that
    takes it; the emptiest card is held for the biggest job that cannot start yet. Returns the jobs never
    started (--max-minutes)."""
    pending = sorted(jobs, key=lambda j: (-j.need_gib, -MODES.index(j.mode) if j.mode in MODES else 0,
                                          -j.peak_bytes))  # fmt: skip
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
            held: set[str] = set()
            for job in list(pending) if now < deadline else []:
                open_cards = [c for c in cards.ids if c not in held and cards.fits(c, job)]
                if open_cards:
                    start(job, min(open_cards, key=cards.free_gib), cards, args, extra, logs)
                    pending.remove(job)
                elif not held:
                    held.add(max(cards.ids, key=cards.free_gib))
            time.sleep(0.5)
    finally:  # Ctrl-C or an error here: no job outlives the check
        for running in cards.running.values():
            for job in running:
                stop_group(job)
    return pending


def read_json(path: Path, default=None):
    return json.loads(path.read_text()) if path.exists() else default


def read_rows(job: Job, extra: list[str], logs: Path, steps: int, time_limit_s: float) -> tuple[dict, list[Pair]]:
    """The rows of every pair the job's run stands for, by pair name, and the pairs that must run on their own
    after all: those of a run whose own plan is not the one planned here for it."""
    first, others = job.pairs[0], job.pairs[1:]
    row = read_row(job, first, extra, logs, steps)
    rows = {first.name: row}
    run_plan = read_json(job.run_dir / "plan.json")
    if first.error:
        row["notes"].append(f"not planned before the run ({first.error})")
    if not others:
        return rows, []
    if run_plan and not ran_as_planned(first, run_plan, bool(row["oom_backoffs"]), time_limit_s):
        row["notes"].append("its run's plan is not the one planned for it before the run: "
                            f"{', '.join(p.name for p in others)} run on their own")  # fmt: skip
        return rows, others
    row["notes"].append(f"its run stands for {', '.join(p.name for p in others)} too (the same plan and cap)")
    for pair in others:
        rows[pair.name] = read_row(job, pair, extra, logs, steps)
        rows[pair.name]["notes"].insert(0, f"same plan as {first.profile}/{first.mode}: its run's measurements")
        rows[pair.name]["same_run_as"] = f"{first.profile}/{first.mode}"
    return rows, []


def read_row(job: Job, pair: Pair, extra: list[str], logs: Path, steps: int) -> dict:
    """One pair's row from its job's run: the run's measurements, the pair's own plan (the run's plan.json
    for the job's own pair) and verdict."""
    d, err_log = job.run_dir, logs / f"{job.name}.err"
    row = {"profile": pair.profile, "mode": pair.mode, "run_dir": str(d), "exit": job.rc, "wall_s": round(job.wall_s, 1),
           "gpu": job.gpu, "shared_card": job.shared, "notes": list(job.notes)}  # fmt: skip
    err = err_log.read_text(errors="replace") if err_log.exists() else ""
    plan, summary = read_json(d / "plan.json"), read_json(d / "summary.json", {})
    if plan and pair is not job.pairs[0]:
        plan = as_run(pair.plan, plan)
    lines = (d / "metrics.jsonl").read_text().splitlines() if (d / "metrics.jsonl").exists() else []
    metrics = []
    for line in lines:
        try:
            metrics.append(json.loads(line))
        except ValueError:  # a line torn by a killed job
            pass
    row["oom_backoffs"] = [m for m in metrics if m.get("kind") == "oom_backoff"]
    row["oom"] = bool(row["oom_backoffs"]) or (job.rc != 0 and "out of memory" in err.lower())
    row["steps"] = summary.get("step", max((m["step"] for m in metrics if m.get("kind") == "train"), default=0))
    row["stopped_by"] = summary.get("stopped_by")
    if job.rc != 0 or not summary:
        row["stderr_tail"] = "\n".join(err.splitlines()[-25:])
    if plan:
        hw = hardware_of(plan)
        row.update(num_layers=plan["model"]["num_layers"], num_dims=plan["model"]["num_dims"],
                   micro_batch=plan["micro_batch"], grad_accum=plan["grad_accum"], seq_len=plan["seq_len"],
                   precision=plan["precision"], grad_ckpt=plan["grad_ckpt"], emulated=hw.emulated,
                   predicted_peak_bytes=plan["predicted_peak_bytes"], vram_bytes=plan["vram_bytes"],
                   cap_bytes=allocator_cap(hw), binding_in_run=plan["binding_constraint"])  # fmt: skip
        row.update(plan_without_max_steps(pair.profile, pair.mode, extra, plan, hw, row))
    peak = summary.get("peak_mem_bytes", summary.get("peak_rss_bytes"))  # allocated on a GPU, RSS on the CPU
    row.update(peak_allocated_bytes=summary.get("peak_mem_bytes"), peak_reserved_bytes=summary.get("peak_reserved_bytes"),
               peak_rss_bytes=summary.get("peak_rss_bytes"), measured_peak_bytes=peak)  # fmt: skip
    if peak and plan:
        row["use"] = peak / row["cap_bytes"]
        row["predicted_over_measured"] = plan["predicted_peak_bytes"] / peak
    row["verdict"] = verdict(row, steps)
    return row


def plan_without_max_steps(profile: str, mode: str, extra: list[str], plan: dict, hw: Hardware, row: dict) -> dict:
    """The run's plan made again without train.max_steps: its binding constraint, the micro-batch as planned
    (before any out-of-memory back-off), and whether twice that micro-batch would fit the plan's budget."""
    try:
        cfg = compose_config([f"gpu={profile}", f"mode={mode}", *config_overrides(extra)])
        free = make_plan(cfg, hw, plan["model"]["vocab_size"], plan["corpus_tokens"])
    except Exception as e:  # noqa: BLE001 - the row still stands on the run's own plan
        row["notes"].append(f"binding is the run's: planning without max_steps failed ({str(e).splitlines()[0]})")
        return {"binding_constraint": plan["binding_constraint"]}
    out = {"binding_constraint": free.binding_constraint, "micro_batch": free.micro_batch, "grad_accum": free.grad_accum,
           "micro_batch_set_by_user": bool(cfg.train.micro_batch)}  # fmt: skip
    same = free.model == plan["model"] and free.grad_ckpt == plan["grad_ckpt"] and \
        free.micro_batch * free.grad_accum == plan["micro_batch"] * plan["grad_accum"]  # fmt: skip
    if not same or (not row["oom_backoffs"] and free.micro_batch != plan["micro_batch"]):
        row["notes"].append("train.max_steps changed the plan: the run's shape is shown")
        out.update(micro_batch=plan["micro_batch"], grad_accum=plan["grad_accum"])
    budget = memory_budget(hw)
    doubled = _shape(plan["model"], cfg, hw, 2 * out["micro_batch"], plan["grad_ckpt"])
    out["double_micro_batch_fits"] = predict_peak_bytes(doubled).total <= budget
    return out


def verdict(row: dict, steps: int) -> str:
    if row["oom"]:
        return "OOM"
    if any(n.startswith("killed") for n in row.get("notes", [])):
        return "timeout"
    if row["exit"] != 0 or row.get("measured_peak_bytes") is None or "use" not in row:
        return "crash"
    if row["steps"] < min(2, steps):  # step 2 is the first with AdamW's state and the activations at once
        return f"incomplete ({row['steps']} step, {row['stopped_by']})"
    if row["use"] >= TARGET_USE:
        return "ok"
    if row["binding_constraint"] != "memory":
        if row.get("micro_batch_set_by_user"):
            return "not memory-bound (micro-batch set by you)"
        if row["grad_accum"] == 1:
            return "not memory-bound (batch at target)"
        if row.get("double_micro_batch_fits"):
            return "not memory-bound (micro-batch cap)"
    return f"below {TARGET_USE * 100:.0f} %"


def gib(x) -> str:
    return "" if x is None else f"{x / GIB:.2f}"


def markdown(rows: list[dict], device: str) -> str:
    peak = "measured peak GiB" if device != "cpu" else "measured peak RSS GiB"
    lines = [f"| profile | mode | layers x dims | micro x accum x seq | precision | ckpt | steps | predicted GiB | {peak} "
             "| reserved GiB | cap GiB | use % | predicted/measured | OOM? | binding (without max_steps) | verdict |",
             "|" + "---|" * 16]  # fmt: skip
    for r in rows:
        shape = f"{r['num_layers']} x {r['num_dims']}" if "num_layers" in r else ""
        batch = f"{r['micro_batch']} x {r['grad_accum']} x {r['seq_len']}" if "micro_batch" in r else ""
        steps = str(r.get("steps", "")) + ("" if r.get("stopped_by") in ("schedule", None) else f" ({r['stopped_by']})")
        use = f"{100 * r['use']:.0f}" if "use" in r else ""
        ratio = f"{r['predicted_over_measured']:.2f}" if "predicted_over_measured" in r else ""
        cap = gib(r.get("cap_bytes")) + (" (emulated)" if r.get("emulated") else "")
        ckpt = {True: "yes", False: "no"}.get(r.get("grad_ckpt"), "")
        same = f" (same plan as {r['same_run_as']}: its run)" if r.get("same_run_as") else ""
        lines.append(f"| {r['profile']} | {r['mode']} | {shape} | {batch} | {r.get('precision', '')} | {ckpt} | "
                     f"{steps} | {gib(r.get('predicted_peak_bytes'))} | {gib(r.get('measured_peak_bytes'))} | "
                     f"{gib(r.get('peak_reserved_bytes'))} | {cap} | {use} | {ratio} | {'yes' if r.get('oom') else 'no'} "
                     f"| {r.get('binding_constraint', '')} | {r['verdict']}{same} |")  # fmt: skip
    return "\n".join(lines)


def gpu_ids(count: int | None) -> list[str]:
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        ids = [i.strip() for i in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if i.strip()]
    else:
        try:
            listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
            ids = [str(i) for i, line in enumerate(listed.splitlines()) if line.startswith("GPU ")]
        except (OSError, subprocess.SubprocessError):
            ids = []
    return ids[:count] if count else ids


def visible_gpus(count: int | None) -> list[str]:
    ids = gpu_ids(count)
    if not ids:
        sys.exit("no GPU is visible; use --device cpu --profiles cpu to check the machinery on the CPU "
                 "(or --list to see the grouping for an assumed card)")  # fmt: skip
    return ids


def card_info(card: str) -> tuple[str, float]:
    """The card's name and memory (GiB), asked of nvidia-smi: a CUDA context here would take memory from the jobs."""
    query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits", "-i", card]
    try:
        name, mib = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout.strip() \
            .splitlines()[0].rsplit(",", 1)  # fmt: skip
        return name.strip(), float(mib) / 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        sys.exit("nvidia-smi could not tell the GPU's name and memory; pass --gpu-mem-gib")


def parse_args(argv: list[str]):
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Hydra overrides after -- go to every job, e.g. -- data=text_files ...")  # fmt: skip
    p.add_argument("--profiles", nargs="+", default=PROFILES, help="gpu profiles (comma or space separated)")
    p.add_argument("--modes", nargs="+", default=MODES, help="modes (comma or space separated)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: gpu=cpu only, no emulation")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to spread the jobs over (default: all visible)")
    p.add_argument("--jobs-per-gpu", type=int, default=6, help="jobs at once on one GPU, memory permitting")
    p.add_argument("--gpu-mem-gib", type=float, default=None, help="one card's memory (default: nvidia-smi's; "
                   f"--list without a GPU: {ASSUMED_CARD_GIB}, an H200's)")  # fmt: skip
    p.add_argument("--steps", type=int, default=20, help="training steps per job")
    p.add_argument("--timeout", type=float, default=600, help="seconds before one job is killed")
    p.add_argument("--max-minutes", type=float, default=None, help="start no job after this; kill those left")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "check_plans", help="run directories go here")
    p.add_argument("--json", type=Path, default=None, help="rows as JSON (default OUT/check_plans.json; "
                   "with --list: the grouping, only when given)")  # fmt: skip
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the runs' checkpoints (deleted once read)")
    p.add_argument("--list", action="store_true", help="print which pairs share a job, for the card here (or an "
                   "assumed one without a GPU), and run nothing")  # fmt: skip
    args = p.parse_args(argv)
    args.profiles = [v for value in args.profiles for v in value.split(",") if v]
    args.modes = [v for value in args.modes for v in value.split(",") if v]
    if args.device == "cpu" and args.profiles != ["cpu"]:
        p.error("--device cpu runs gpu=cpu only: pass --profiles cpu")
    return args, extra


def list_groups(args, extra: list[str]) -> int:
    card, where = planning_card(args)
    groups = group_pairs(plan_pairs(args, extra, card))
    print(grouping_text(groups, where))
    if args.json:
        args.json.write_text(json.dumps({"device": where, "pairs": sum(map(len, groups)), "jobs": len(groups),
                                         "groups": [[p.name for p in g] for g in groups],
                                         "errors": {p.name: p.error for g in groups for p in g if p.error}},
                                        indent=2) + "\n")  # fmt: skip
    return 0


def main(argv: list[str]) -> int:
    args, extra = parse_args(argv)
    if args.list:
        return list_groups(args, extra)
    t0 = time.perf_counter()
    deadline = t0 + args.max_minutes * 60 if args.max_minutes else float("inf")
    limit = job_time_limit(args)
    out = args.out.resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    json_path = args.json or out / "check_plans.json"
    if args.device == "cpu":
        cards = Cards(["cpu"], float("inf"), args.jobs_per_gpu)
    else:
        ids = visible_gpus(args.gpus)
        cards = Cards(ids, args.gpu_mem_gib or card_info(ids[0])[1], args.jobs_per_gpu)
    pairs = [Pair(pr, m) for pr in args.profiles for m in args.modes]
    rows: dict[str, dict] = {}
    groups_done: list[list[str]] = []

    def write_tables(final: bool = False) -> str:
        ordered = [rows[p.name] for p in pairs if p.name in rows]
        table = markdown(ordered, args.device)
        (out / "check_plans.md").write_text(table + "\n")
        json_path.write_text(json.dumps({"steps": args.steps, "device": args.device, "extra_overrides": extra,
                                         "pairs": len(pairs), "jobs": len(groups_done), "groups": groups_done,
                                         **({"wall_s": round(time.perf_counter() - t0)} if final else {}),
                                         "rows": ordered}, indent=2) + "\n")  # fmt: skip
        return table

    on_their_own: list[Pair] = []

    def record(job: Job) -> None:  # as each job ends: a check cut short still leaves its table
        fresh, alone = read_rows(job, extra, logs, args.steps, limit)
        for name, row in fresh.items():
            if name in rows and rows[name].get("exit") is not None:
                row["notes"].append(f"{rows[name]['verdict']} beside other jobs; this is the run alone")
            rows[name] = row
        for pair in alone:
            if pair.name in {p.name for p in on_their_own}:  # its group's run again (alone): already queued
                continue
            rows[pair.name] = {"profile": pair.profile, "mode": pair.mode, "oom": False, "verdict": "not run",
                               "notes": [f"planned as {job.name}'s, whose run planned otherwise: to run alone"]}  # fmt: skip
            on_their_own.append(pair)
        if not args.keep_checkpoints:
            shutil.rmtree(job.run_dir / "checkpoints", ignore_errors=True)
        write_tables()

    if len(pairs) > 1:  # one process builds the tokenizer and token cache; the rest would queue on its lock
        warm = Job(pairs[0].profile, pairs[0].mode, out / "_warmup", label="_warmup")
        print("warm-up: a dry run prepares the data cache ...", file=sys.stderr)
        run_jobs([warm], cards, args, [*extra, "dry_run=true"], logs, deadline)
        if warm.rc != 0:
            print((logs / f"{warm.name}.err").read_text(errors="replace")[-3000:], file=sys.stderr)
            sys.exit(f"the warm-up dry run failed (exit {warm.rc}); see {logs / (warm.name + '.err')}")
        card, where = planning_card(args)
        pairs = plan_pairs(args, extra, card)  # in this process, on the cache the warm-up built
        groups = group_pairs(pairs)
        print(grouping_text(groups, where), file=sys.stderr)
    else:
        groups = [pairs]
    print(f"{len(pairs)} profile x mode pair(s) need {len(groups)} distinct job(s)", file=sys.stderr)
    groups_done[:] = [[p.name for p in g] for g in groups]
    jobs = [Job(g[0].profile, g[0].mode, out / g[0].name, pairs=g,
                peak_bytes=g[0].plan["predicted_peak_bytes"] if g[0].plan else 0) for g in groups]  # fmt: skip
    if args.device != "cpu":
        needs = {profile: need_gib(profile, extra, cards.capacity) for profile in args.profiles}
        for job in jobs:
            job.need_gib = needs[job.profile]
    not_run = run_jobs(jobs, cards, args, extra, logs, deadline, record)
    again = [Job(j.profile, j.mode, j.run_dir, need_gib=cards.capacity, pairs=j.pairs, peak_bytes=j.peak_bytes)
             for j in jobs if j.pairs[0].name in rows and rows[j.pairs[0].name]["verdict"] in ("OOM", "crash")
             and j.shared]  # fmt: skip
    alone = [Job(p.profile, p.mode, out / p.name, need_gib=needs[p.profile] if args.device != "cpu" else 0.0,
                 pairs=[Pair(p.profile, p.mode, p.plan)]) for p in on_their_own]  # fmt: skip
    if (again or alone) and time.perf_counter() < deadline:  # a neighbour may have taken the memory: run it alone
        print(f"running {len(again)} failed job(s) again, each alone on a card, and {len(alone)} pair(s) whose "
              "group's run planned otherwise ...", file=sys.stderr)  # fmt: skip
        for job in again:  # the first attempt's logs stay beside the second's
            for suffix in (".out", ".err"):
                if (logs / f"{job.name}{suffix}").exists():
                    (logs / f"{job.name}{suffix}").rename(logs / f"{job.name}.beside-others{suffix}")
        groups_done.extend([p.name] for p in on_their_own)
        not_run += [j for j in run_jobs(again + alone, cards, args, extra, logs, deadline, record) if j in alone]
    elif alone:
        not_run += alone
    for job in not_run:
        for pair in job.pairs:
            rows[pair.name] = {"profile": pair.profile, "mode": pair.mode, "oom": False, "verdict": "not run",
                               "notes": ["--max-minutes passed before it could start"]}  # fmt: skip
    table = write_tables(final=True)
    print(table)
    ordered = [rows[p.name] for p in pairs if p.name in rows]
    failed = [r for r in ordered if r["verdict"] in FAILED]
    for r in failed:
        print(f"\n{r['profile']}-{r['mode']}: {r['verdict']}\n{r.get('stderr_tail', '')}", file=sys.stderr)
    print(f"\n{len(ordered)} plans in {len(groups_done)} jobs, {len(failed)} failed (OOM, crash, timeout, not run); "
          f"rows in {json_path}", file=sys.stderr)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
