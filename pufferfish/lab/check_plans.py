"""Does every gpu profile x mode plan run under its emulated memory cap, and fill it? (docs/benchmarks.md, plan check)

    python -m pufferfish.lab.check_plans --out outputs/check_plans          # 11 profiles x 4 modes on every GPU here
    python -m pufferfish.lab.check_plans --list                             # which pairs share a job; runs nothing
    python -m pufferfish.lab.check_plans --profiles gtx1060,rtx3060 --modes standard --gpus 1 --jobs-per-gpu 4
    python -m pufferfish.lab.check_plans --profiles h200 --also rtx4060:quick_dev  # h200's four, and one more
    python -m pufferfish.lab.check_plans --max-minutes 7 -- data=text_files data.paths=[corpus.txt]   # extra overrides
    python -m pufferfish.lab.check_plans --device cpu --profiles cpu --modes ultra_fast       # the machinery, on CPU

Each job is `python -m pufferfish.train gpu=P mode=M train.max_steps=20` (no evaluation until the end, no
sample) in its own run directory OUT/P-M; a profile smaller than the card caps the process's allocator at
the profile's memory (apply_memory_cap in pufferfish/resolver/hardware.py). First every pair's plan is made
here, in this process (which prepares the corpora the jobs will read, each capped as its job caps it, so no
job spends its time on one), by the code's own
hardware_on (detect_hardware's rules) and make_plan for the card the jobs will see (described by
nvidia-smi: this process never starts CUDA, which would take memory from the jobs). Pairs whose plans agree on everything that sets the
peak memory, the allocator's cap and how far 20 steps get (memory_key) run as one job; each pair keeps its
own row with that run's measurements ("same plan as P/M") and its own verdict. Should the run's own plan
differ from the one planned here, the other pairs run on their own after all. `--list` prints this grouping
and runs nothing; without a GPU it plans for an assumed card of --gpu-mem-gib (default an H200's).

Jobs then run several at once: a GPU takes up to --jobs-per-gpu of them while their memory fits on the card
(the profile's, which the cap bounds, or the plan's predicted peak with a quarter more where that is less,
+ the CUDA context); the biggest (and the longest modes) go first, smaller ones pass a job that does not fit
yet for a minute before a card is held for it, a plan that may fill (nearly) the whole card runs alone, and a
job that failed beside others is run again alone before it counts as a failure.

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
import shutil
import sys
import time
from pathlib import Path

from .plan_check.cards import ASSUMED_CARD_GIB, card_info, planning_card, visible_gpus
from .plan_check.grouping import MODES, PROFILES, Pair, group_pairs, job_time_limit, plan_pairs
from .plan_check.report import grouping_text, markdown
from .plan_check.rows import read_rows
from .plan_check.scheduler import Cards, Job, need_gib, planned_need_gib, run_jobs

FAILED = ("OOM", "crash", "timeout", "not run")


def parse_args(argv: list[str]):
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Hydra overrides after -- go to every job, e.g. -- data=text_files ...")  # fmt: skip
    p.add_argument("--profiles", nargs="+", default=PROFILES, help="gpu profiles (comma or space separated)")
    p.add_argument("--modes", nargs="+", default=MODES, help="modes (comma or space separated)")
    p.add_argument("--also", nargs="+", default=[], metavar="PROFILE:MODE",
                   help="single pairs to check besides --profiles x --modes, e.g. rtx4060:quick_dev")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: gpu=cpu only, no emulation")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to spread the jobs over (default: all visible)")
    p.add_argument("--jobs-per-gpu", type=int, default=6, help="jobs at once on one GPU, memory permitting")
    p.add_argument("--gpu-mem-gib", type=float, default=None, help="one card's memory (default: nvidia-smi's; "
                   f"--list without a GPU: {ASSUMED_CARD_GIB}, an H200's)")  # fmt: skip
    p.add_argument("--steps", type=int, default=20, help="training steps per job")
    p.add_argument("--timeout", type=float, default=600, help="seconds before one job is killed")
    p.add_argument("--max-minutes", type=float, default=None, help="start no job after this; kill those left")
    p.add_argument("--out", type=Path, default=Path("outputs") / "check_plans",
                   help="run directories go here")
    p.add_argument("--json", type=Path, default=None, help="rows as JSON (default OUT/check_plans.json; "
                   "with --list: the grouping, only when given)")  # fmt: skip
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the runs' checkpoints (deleted once read)")
    p.add_argument("--list", action="store_true", help="print which pairs share a job, for the card here (or an "
                   "assumed one without a GPU), and run nothing")  # fmt: skip
    args = p.parse_args(argv)
    args.profiles = [v for value in args.profiles for v in value.split(",") if v]
    args.modes = [v for value in args.modes for v in value.split(",") if v]
    args.pairs = [(pr, m) for pr in args.profiles for m in args.modes]
    for pair in (v for value in args.also for v in value.split(",") if v):
        profile, _, mode = pair.partition(":")
        if not profile or mode not in MODES:
            p.error(f"--also {pair!r}: give PROFILE:MODE with a mode of {', '.join(MODES)}")
        args.pairs += [(profile, mode)] if (profile, mode) not in args.pairs else []
    args.profiles = list(dict.fromkeys(pr for pr, _ in args.pairs))
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
    pairs = [Pair(pr, m) for pr, m in args.pairs]
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

    if len(pairs) > 1:  # planned here first; that prepares every corpus the jobs read, so none builds one
        print("planning every pair (and preparing the corpora its job will read) ...", file=sys.stderr)
        card, where = planning_card(args)
        pairs = plan_pairs(args, extra, card)
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
        for job in jobs:  # a plan that leaves its cap mostly unused shares the card by what it predicts
            job.need_gib = planned_need_gib(needs[job.profile], job.peak_bytes)
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
