"""Time to loss: the seconds each recipe takes to first reach a target validation loss, on the same tokens.

    python -m pufferfish.lab.time_to_loss --out DIR --target 4.0 [--corpus default|shakespeare|FILE] [--budget 600]
        [--sizes 8x512,12x768|plan] [--systems default,qk_norm,muon,adamw,cosine,nanogpt] [--gpu auto]
        [--set KEY=VALUE ...] [--nanogpt-set=--ARG=VALUE ...] [--peer-seconds S]
    python -m pufferfish.lab.time_to_loss --out DIR --target 4.0 --report   # the table and the PNG from DIR's results

Every system trains each size (model.num_layers x model.num_dims, fixed; `plan`: the shape each recipe's plan
chooses for the budget, and nanoGPT's own GPT-2 124M) for the same time budget:
- default: Pufferfish's recipe as a user gets it at that size;
- qk_norm: a candidate change (model.qk_norm=true); muon, adamw: each optimizer alone, where the default
  (optim.name=auto) chooses one by the passes its plan makes over the data; cosine: the default's schedule before
  WSD (optim.schedule=cosine with optim.min_lr_ratio=0.1), which a later measurement can check against;
- nanogpt: nanoGPT's recipe (quality_per_budget.py's runner, $PUFFERFISH_NANOGPT) at the same size, on
  Pufferfish's token files, for as long as the default run at that size took (in this command or an earlier one
  with the same --out, corpus and budget: the two may run as separate commands), or --peer-seconds S (then it
  needs no default run: e.g. nanoGPT for 600 s, and the default recipe planned for 300 s in another command).
Seconds to target: the first evaluation at or below the target (evaluations are not interpolated). A
Pufferfish run's seconds are its eval records' elapsed_s (metrics.jsonl: the run's clock, counting from its
data being ready, so planning, building, compiling and the evaluations before it are in them); nanoGPT's count
from its first log line (after its imports, before it reads data and builds its model) to its eval line.
`--target default`: at each size, the lowest loss the default recipe's evaluations reached; `--target nanogpt`: at
each size, nanoGPT's final evaluation, `--target nanogpt-best` its lowest (the table's `x nanoGPT` column: seconds
over nanoGPT's own seconds to that loss). The handed-over loss
is what each run hands over at the end of the budget (Pufferfish: summary.json's val_loss; nanoGPT: its best
evaluation). A candidate is kept only if at both sizes it reaches the target sooner than the default and hands
over a loss no higher; otherwise rejected. Sooner compares the seconds after each run's start-up (the seconds
before its steps ran at their steady speed, compiling above all): a compile cache warmed by the runs before it
shortens a run's start-up whatever its recipe. Each run appends a JSON line to DIR/results.jsonl; the table goes to
DIR/time_to_loss.md and the curves (validation loss against seconds, one line per system) to DIR/time_to_loss.png.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
from pathlib import Path

from . import quality_per_budget as qpb  # the nanoGPT runner, the corpora, the timed subprocess
from .figures import panels, save

ROOT = qpb.ROOT
SYSTEMS = {  # name: the overrides it makes to Pufferfish's default recipe (Muon or AdamW by passes, WSD to zero)
    "default": [],
    "qk_norm": ["model.qk_norm=true"],
    "muon": ["optim.name=muon"],
    "adamw": ["optim.name=adamw"],  # also the default optimizer before Muon
    # the default schedule before WSD: resolver.plan's SCHEDULE_DEFAULTS (not imported: this module loads no torch)
    "cosine": ["optim.schedule=cosine", "optim.warmup_frac=0.05", "optim.min_lr_ratio=0.1", "optim.decay_frac=0.2"],
}
PEER = "nanogpt"
PLAN = "plan"  # the size each recipe's plan chooses
TARGETS = {  # the targets read from a system's run (else a loss), as the table says them
    "default": "the lowest evaluation of the default recipe at each size",
    PEER: "nanoGPT's final evaluation at each size",
    f"{PEER}-best": "nanoGPT's lowest evaluation at each size",
}


def corpus_overrides(corpus: str) -> list[str]:
    """default and shakespeare as quality_per_budget.py has them; a file or folder of text otherwise."""
    if corpus in ("default", "shakespeare"):
        return qpb.corpus_overrides(corpus)
    return ["data=text_files", f"data.paths=['{Path(corpus).resolve()}']"]


def base_args(args, size: str) -> list[str]:
    shape = [] if size == PLAN else [f"model.num_layers={size.split('x')[0]}", f"model.num_dims={size.split('x')[1]}"]
    return [f"gpu={args.gpu}", f"mode={args.mode}", f"mode.target_hours={args.budget / 3600:.6f}", *shape,
            "train.progress=false", *corpus_overrides(args.corpus), *args.set]  # fmt: skip


def size_order(size: str) -> tuple:
    """Fixed sizes by layers then dims, the plan's shape last."""
    return (math.inf,) if size == PLAN else tuple(map(int, size.split("x")))


def earlier_cap(args) -> float | None:
    """The default corpus's cap (MB) the runs already in --out's results read on this corpus, None if none."""
    caps = [r["data_max_mb"] for r in read_rows(args.out) if r["corpus"] == args.corpus and r.get("data_max_mb")]
    return caps[0] if caps else None


def corpus_data(args):
    """The data settings every run of this command reads. The default corpus is capped by what the budget can use
    at a size: the largest cap of all sizes, so that every size reads the same text; and where --out already holds
    runs on it, their cap, so that a later command (nanoGPT's run, then the default's for another budget) reads the
    same tokens and is scored on the same validation text."""
    from pufferfish.api import compose_config
    from pufferfish.rundir import data_config

    data = max((data_config(compose_config(base_args(args, size))) for size in args.sizes.split(",")),
               key=lambda d: d.max_mb or 0)  # fmt: skip
    earlier = earlier_cap(args) if data.source == "python" else None
    if earlier and earlier != data.max_mb:
        print(f"time_to_loss: the default corpus capped at {earlier} MB, as the runs already in {args.out} read it "
              f"(this budget alone would cap it at {data.max_mb} MB)")  # fmt: skip
        data.max_mb = earlier
    return data


def prepare(args) -> tuple[Path, float | None]:
    """The corpus, prepared outside any timing, and the default corpus's cap (MB) every run then reads it at."""
    from pufferfish.data import prepare_data

    data = corpus_data(args)
    return prepare_data(data, progress=True).dir, data.max_mb if data.source == "python" else None


def run_pufferfish(args, system: str, size: str, cap: float | None) -> dict:
    run = args.out / "runs" / f"{system}_{size}"
    shutil.rmtree(run, ignore_errors=True)
    pinned = [f"data.max_mb={cap}"] if cap else []  # exactly the prepared corpus
    cmd = [sys.executable, "-m", "pufferfish.train", *base_args(args, size), *pinned, *SYSTEMS[system],
           f"run_dir={run}"]  # fmt: skip
    wall = qpb.timed(cmd, ROOT, args.out / f"{system}_{size}.log")
    return {"system": system, "size": size, **pufferfish_result(run), "wall_s": wall}


def pufferfish_result(run: Path) -> dict:
    """A run's evaluations (seconds from its metrics.jsonl), its handed-over loss and what it trained."""
    from pufferfish.runlog import read_metrics

    summary = json.loads((run / "summary.json").read_text())
    plan = json.loads((run / "plan.json").read_text())
    evals = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval" and not r.get("final")]
    return {"curve": [(r["elapsed_s"], r["val_loss"], r["step"]) for r in evals], "val_loss": summary["val_loss"],
            "run_dir": str(run), "steps": summary["step"], "stopped_by": summary["stopped_by"],
            "tokens_per_s": summary["tokens_per_s"], "batch_tokens": plan["batch_tokens"],
            "params": plan["params"], "layers": plan["model"]["num_layers"], "dims": plan["model"]["num_dims"],
            "seq_len": plan["seq_len"],
            "lr": plan["lr"], "optimizer": plan["optimizer"],
            "schedule": plan["schedule"]["schedule"], "qk_norm": plan["model"].get("qk_norm", False)}  # fmt: skip


def run_peer(args, size: str, data_dir: Path, wall_s: float) -> dict:
    shape = ()  # at the plan's size, nanoGPT's own recipe: GPT-2 124M
    if size != PLAN:
        layers, dims = map(int, size.split("x"))
        shape = (f"--n_layer={layers}", f"--n_embd={dims}", f"--n_head={max(1, dims // 64)}")
    extra = (*shape, *args.nanogpt_set)
    out = args.out / "nanogpt" / size
    out.mkdir(parents=True, exist_ok=True)
    row = qpb.run_nanogpt(args.corpus if args.corpus in ("default", "shakespeare") else "file", wall_s, out,
                          data_dir, extra, evals=20)  # fmt: skip  (about as many evaluations as a plan's)
    interval = max(1, row["iters"] // 20)  # it evaluates at step 0 and every `interval` steps
    curve = [(t - row["start_s"], v, i * interval) for i, (t, v) in enumerate(row["curve"])]
    return {"system": PEER, "size": size, "curve": curve, "val_loss": row["val_loss"], "wall_s": row["wall_s"],
            "steps": row["iters"], "stopped_by": "its max_iters", "params": None}  # fmt: skip


def first_at_or_below(curve: list, target: float) -> tuple[float, int] | None:
    """(seconds, step) of the first evaluation at or below the target; None if none reached it."""
    return next(((t, step) for t, v, step in curve if v <= target), None)


def startup(curve: list) -> float:
    """Seconds a run spent before its steps ran at their steady speed (compiling above all, which takes longer
    when the compile cache is cold, so it depends on what ran before): its first evaluation's seconds less its
    steps at the steady seconds a step between its first and last evaluations. 0 with fewer than two steps."""
    (t0, _, s0), (t1, _, s1) = curve[0], curve[-1]
    return max(0.0, t0 - s0 * (t1 - t0) / (s1 - s0)) if len(curve) > 1 and s1 > s0 else 0.0


def targets(rows: list[dict], target: str) -> dict[str, float]:
    """The target loss per size: one number for all; `default`: the default recipe's lowest evaluation;
    `nanogpt`: nanoGPT's final evaluation; `nanogpt-best`: nanoGPT's lowest (where it overfits a small corpus,
    its final loss is far above its best)."""
    sizes = {r["size"] for r in rows}
    if target not in TARGETS:
        return dict.fromkeys(sizes, float(target))
    system, last = target.removesuffix("-best"), target == PEER
    found = {r["size"]: r["curve"][-1][1] if last else min(v for _, v, _ in r["curve"])
             for r in rows if r["system"] == system and r["curve"]}  # fmt: skip
    missing = sorted(sizes - found.keys())
    if missing:
        sys.exit(f"time_to_loss: --target {target} needs {system}'s run at size(s) {', '.join(missing)}")
    return found


def times_peer(rows: list[dict], goal: dict[str, float], whole_run: bool = False) -> dict[tuple[str, str], float]:
    """(system, size): its seconds to the target over nanoGPT's own at that size, where both reached it; with
    `whole_run`, over the seconds of nanoGPT's whole run (to its final evaluation) wherever the system reached it."""

    def seconds(peer: dict) -> float | None:
        if whole_run:
            return peer["curve"][-1][0]
        hit = first_at_or_below(peer["curve"], goal[peer["size"]])
        return hit[0] if hit else None

    base = {r["size"]: seconds(r) for r in rows if r["system"] == PEER and r["curve"]}
    out = {}
    for r in rows:
        hit, own = first_at_or_below(r["curve"], goal[r["size"]]), base.get(r["size"])
        if hit and own:
            out[r["system"], r["size"]] = hit[0] / own
    return out


def verdicts(rows: list[dict], goal: dict[str, float]) -> dict[str, str]:
    """kept: at every size, the target sooner than the default and a handed-over loss no higher; else rejected.
    Sooner counts the seconds after each run's start-up, which the compile cache decides more than the recipe."""
    by = {(r["system"], r["size"]): r for r in rows}
    sizes = sorted({r["size"] for r in rows})
    out = {}
    for system in {r["system"] for r in rows} - {"default", PEER}:
        why = []
        for size in sizes:
            mine, base = by.get((system, size)), by.get(("default", size))
            if mine is None or base is None:
                why.append(f"{size}: no {'run' if mine is None else 'default run'} to compare")
                continue
            t, t0 = (first_at_or_below(r["curve"], goal[size]) for r in (mine, base))
            if t is None or (t0 is not None and t[0] - startup(mine["curve"]) >= t0[0] - startup(base["curve"])):
                why.append(f"{size}: not sooner")
            if mine["val_loss"] > base["val_loss"]:
                why.append(f"{size}: handed-over loss {mine['val_loss']:.3f} > {base['val_loss']:.3f}")
        out[system] = "rejected (" + "; ".join(why) + ")" if why else "kept"
    return out


def read_rows(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def default_wall(args, size: str) -> float | None:
    """The wall-clock seconds of the latest default run at this size, corpus and budget in --out's results, which
    nanoGPT then runs for (so the two can also run as separate commands)."""
    walls = [r["wall_s"] for r in read_rows(args.out) if r["system"] == "default" and r["size"] == size
             and r["corpus"] == args.corpus and r["budget_s"] == args.budget]  # fmt: skip
    return walls[-1] if walls else None


def peer_sizes(args) -> set[str]:
    """The sizes --out's results hold a nanoGPT run of on this corpus (a --target nanogpt for later runs)."""
    return {r["size"] for r in read_rows(args.out) if r["system"] == PEER and r["corpus"] == args.corpus}


def peer_wall(args, size: str) -> float | None:
    """nanoGPT's wall-clock seconds at this size: --peer-seconds, else as long as the default run took."""
    return args.peer_seconds or default_wall(args, size)


def report(out: Path, target: str) -> str:
    rows = read_rows(out)
    latest = {(r["system"], r["size"]): r for r in rows}  # a run repeated later replaces the earlier
    rows = sorted(latest.values(), key=lambda r: (size_order(r["size"]), _order(r["system"])))
    goal = targets(rows, target)
    decided, ratio, of_run = verdicts(rows, goal), times_peer(rows, goal), times_peer(rows, goal, whole_run=True)
    lines = [f"Target: {TARGETS.get(target, target)} (validation loss). Seconds to target: the first evaluation at or below it, not "
             f"interpolated; Pufferfish's seconds are its eval records' elapsed_s (from its data being ready: planning, "
             f"building, compiling and earlier evaluations included), nanoGPT's from its first log line to the eval "
             f"line. x nanoGPT: those seconds over nanoGPT's own to the same target; x its run: over the seconds of "
             f"nanoGPT's whole run (to its final evaluation). Start-up: the seconds before the run's steps ran at their "
             f"steady speed (compiling, quicker from a warm cache); a candidate's verdict compares seconds to target "
             f"less start-up. Size `plan`: each recipe's planned shape, nanoGPT's GPT-2 124M.",
             "", "| system | size | target | seconds to target | start-up | at step | x nanoGPT | x its run "
             "| handed-over loss | steps | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        hit = first_at_or_below(r["curve"], goal[r["size"]])
        verdict = {"default": "reference", PEER: "peer"}.get(r["system"], decided.get(r["system"], ""))
        times, run = (f"{x:.2f}" if x is not None else "" for x in (ratio.get((r["system"], r["size"])),
                                                                     of_run.get((r["system"], r["size"]))))
        lines.append(f"| {r['system']} | {r['size']} | {goal[r['size']]:.3f} | "
                     f"{f'{hit[0]:.2f}' if hit else 'not reached'} | {startup(r['curve']):.1f} | "
                     f"{hit[1] if hit else ''} | {times} | {run} | "
                     f"{r['val_loss']:.3f} | {r['steps']} | {verdict} |")  # fmt: skip
    text = "\n".join(lines)
    (out / "time_to_loss.md").write_text(text + "\n")
    _plot(rows, goal, out / "time_to_loss.png")
    return text


def _order(system: str) -> int:
    return [*SYSTEMS, PEER].index(system) if system in [*SYSTEMS, PEER] else len(SYSTEMS) + 1


def _plot(rows: list[dict], goal: dict[str, float], path: Path) -> None:
    sizes = sorted(goal, key=size_order)
    fig, axes = panels(len(sizes))
    for ax, size in zip(axes, sizes):
        for r in (r for r in rows if r["size"] == size and r["curve"]):
            t, v, _ = zip(*r["curve"])
            ax.plot(t, v, marker=".", label=r["system"])
        ax.axhline(goal[size], ls="--", c="grey", label=f"target {goal[size]:.3f}")
        ax.set(title="the planned shapes" if size == PLAN else f"{size} (layers x dims)", xlabel="seconds",
               ylabel="validation loss")  # fmt: skip
    save(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--target", required=True, help="a validation loss, `default`, `nanogpt` or `nanogpt-best` (see above)")
    ap.add_argument("--corpus", default="default", help="default | shakespeare | a text file or folder")
    ap.add_argument("--budget", type=float, default=600, help="seconds of training per run")
    ap.add_argument("--sizes", default="8x512,12x768",
                    help="LAYERSxDIMS or `plan`, comma-separated (two for a verdict)")
    ap.add_argument("--systems", default=",".join([*SYSTEMS, PEER]))
    ap.add_argument("--gpu", default="auto")
    ap.add_argument("--mode", default="quick_dev", help="the mode group (sets seq_len; the shape is fixed)")
    ap.add_argument("--set", nargs="*", default=[], help="more overrides for every Pufferfish run")
    ap.add_argument("--nanogpt-set", action="append", default=[],
                    help="a nanoGPT argument replacing its recipe's, e.g. --nanogpt-set=--compile=False (repeatable)")
    ap.add_argument("--peer-seconds", type=float, default=None,
                    help="nanoGPT's wall-clock seconds (default: as long as the default run at that size took)")
    ap.add_argument("--report", action="store_true", help="only write the table and the PNG from DIR's results")
    args = ap.parse_args()
    if args.target not in TARGETS:
        try:
            float(args.target)
        except ValueError:
            sys.exit(f"time_to_loss: --target={args.target!r}; allowed: a validation loss (e.g. 4.0), "
                     f"{', '.join(TARGETS)}")
    if args.peer_seconds is not None and not args.peer_seconds > 0:
        sys.exit(f"time_to_loss: --peer-seconds={args.peer_seconds}; allowed: seconds above 0")
    bad = [s for s in args.sizes.split(",") if s != PLAN and not re.fullmatch(r"[1-9]\d*x[1-9]\d*", s)]
    if bad:
        sys.exit(f"time_to_loss: --sizes has {', '.join(bad)}; allowed: LAYERSxDIMS (e.g. 8x512) or {PLAN}")
    args.out.mkdir(parents=True, exist_ok=True)
    systems = args.systems.split(",")
    unknown = sorted(set(systems) - {*SYSTEMS, PEER})
    if unknown:
        sys.exit(f"time_to_loss: unknown system(s) {', '.join(unknown)}; known: {', '.join([*SYSTEMS, PEER])}")
    missing = [size for size in args.sizes.split(",") if PEER in systems and "default" not in systems
               and peer_wall(args, size) is None]  # fmt: skip
    if missing and not args.report:
        sys.exit(f"time_to_loss: nanogpt runs as long as the default recipe took, and {args.out} has no default run "
                 f"at size(s) {', '.join(missing)} on this corpus and budget; add default to --systems, or give "
                 f"nanoGPT its own length with --peer-seconds")
    unmet = sorted(set(args.sizes.split(",")) - peer_sizes(args), key=size_order)
    if args.target.startswith(PEER) and PEER not in systems and unmet and not args.report:
        sys.exit(f"time_to_loss: --target {args.target} is read from nanoGPT's run, and {args.out} has no nanoGPT run at "
                 f"size(s) {', '.join(unmet)} on this corpus; add nanogpt to --systems (or run it first on its own: "
                 f"--systems nanogpt --peer-seconds S)")
    if not args.report:
        data_dir, cap = prepare(args)
        for size in args.sizes.split(","):
            for system in (s for s in [*SYSTEMS, PEER] if s in systems):
                if system == PEER:
                    row = run_peer(args, size, data_dir, peer_wall(args, size))
                else:
                    row = run_pufferfish(args, system, size, cap)
                with open(args.out / "results.jsonl", "a") as f:
                    f.write(json.dumps({"corpus": args.corpus, "budget_s": args.budget, "data_max_mb": cap, **row})
                            + "\n")  # fmt: skip
    print(report(args.out, args.target))


if __name__ == "__main__":
    main()
