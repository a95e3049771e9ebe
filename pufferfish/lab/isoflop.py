"""Tokens per parameter by optimizer: an isoFLOP sweep, the measurement behind the planner's trade of size for tokens.

    python -m pufferfish.lab.isoflop --out DIR --flops 6e12 [--dims 48,64,96,128] [--layers 4]
        [--optimizers adamw,muon] [--corpus default|shakespeare|FILE] [--gpu cpu] [--set KEY=VALUE ...]
    python -m pufferfish.lab.isoflop --out DIR --report      # the table again, from DIR/results.jsonl

Every run spends the same training compute C (FLOPs, 6N + 12 L d T a token, the speed model's convention) on
a model of `--layers` layers and one of `--dims` widths: the narrower the model, the more tokens it reads
(train.max_steps = C / (FLOPs a token x tokens a step)). Each optimizer trains every width with the recipe the
resolver plans for it (its learning rate, schedule and evaluations); the handed-over validation loss is compared.
Per optimizer, a parabola in ln N through the losses places the compute-optimal size N* and its tokens per
parameter D*/N*; beside it, the size Chinchilla's fit (resolver/scaling.py, all parameters counted) calls
optimal for the same C. If an optimizer's N* differs from AdamW's, the planner's tokens per parameter should
differ for it too. Each run appends a JSON line to DIR/results.jsonl; the table goes to DIR/isoflop.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np

from pufferfish.resolver import plan_flops_per_token
from pufferfish.resolver.scaling import predicted_loss

from . import quality_per_budget as qpb
from .time_to_loss import corpus_overrides

ROOT = qpb.ROOT


def base_args(args, dims: int) -> list[str]:
    return [f"gpu={args.gpu}", "mode=quick_dev", f"model.num_layers={args.layers}", f"model.num_dims={dims}",
            f"model.seq_len={args.seq_len}", f"train.batch_tokens={args.batch_tokens}", "train.progress=false",
            "train.sample_tokens=0", *corpus_overrides(args.corpus), *args.set]  # fmt: skip


def steps_for(flops: float, plan: dict) -> int:
    return max(1, round(flops / (plan_flops_per_token(plan) * plan["batch_tokens"])))


def dry_plan(args, dims: int) -> dict:
    """The plan of a width, without training (the data is prepared and cached by the first one)."""
    run = args.out / "runs" / f"plan_d{dims}"
    shutil.rmtree(run, ignore_errors=True)
    qpb.timed([sys.executable, "-m", "pufferfish.train", *base_args(args, dims), "train.max_steps=1", "dry_run=true",
               f"run_dir={run}"], ROOT, args.out / f"plan_d{dims}.log")  # fmt: skip
    return json.loads((run / "plan.json").read_text())


def run_one(args, optimizer: str, dims: int, steps: int) -> dict:
    run = args.out / "runs" / f"{optimizer}_d{dims}"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "pufferfish.train", *base_args(args, dims), f"optim.name={optimizer}",
           f"train.max_steps={steps}", f"run_dir={run}"]  # fmt: skip
    wall = qpb.timed(cmd, ROOT, args.out / f"{optimizer}_d{dims}.log")
    summary = json.loads((run / "summary.json").read_text())
    plan = json.loads((run / "plan.json").read_text())
    return {"optimizer": optimizer, "dims": dims, "layers": args.layers, "flops": args.flops, "params": plan["params"],
            "tokens": summary["tokens"], "steps": summary["step"], "val_loss": summary["val_loss"],
            "best_val_loss": summary.get("best_val_loss"), "lr": plan["lr"],
            "muon_lr": plan["optimizer"].get("muon_lr"), "wall_s": wall}  # fmt: skip


def optimum(rows: list[dict], around: int = 2) -> dict | None:
    """The parabola through (ln N, loss) of the lowest point and `around` neighbours on each side (a parabola
    describes a curve near its minimum, not far from it): its minimum's N*, loss and D*/N* (D* = C / 6N*).
    None where the points do not bracket a minimum (the sweep should reach further that way)."""
    lowest = min(range(len(rows)), key=lambda i: rows[i]["val_loss"])
    rows = rows[max(0, lowest - around) : lowest + around + 1]
    if len(rows) < 3:
        return None
    x = np.log([r["params"] for r in rows])
    y = np.array([r["val_loss"] for r in rows])
    a, b, c = np.polyfit(x, y, 2)
    if a <= 0:
        return None
    x_star = -b / (2 * a)
    if not x.min() <= x_star <= x.max():
        return None
    n = math.exp(x_star)
    tokens = rows[0]["flops"] / (6 * n)
    return {"params": n, "loss": c - b * b / (4 * a), "tokens_per_param": tokens / n}


def law_optimum(flops: float) -> dict:
    """The planner's law: the N minimising predicted_loss(N, C / 6N), over a fine grid in ln N."""
    grid = np.exp(np.linspace(math.log(1e4), math.log(1e10), 4000))
    n = min(grid, key=lambda n: predicted_loss(n, flops / (6 * n)))
    return {"params": float(n), "tokens_per_param": flops / (6 * n) / n}


def report(out: Path) -> str:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    flops = rows[0]["flops"]
    lines = [f"Training compute per run: {flops:.3g} FLOPs (6N + 12 L d T a token). Loss: the handed-over "
             "validation loss.", "",
             "| optimizer | dims | params | tokens | tokens / param | val loss |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["optimizer"], r["params"])):
        lines.append(f"| {r['optimizer']} | {r['dims']} | {r['params'] / 1e6:.3f}M | {r['tokens'] / 1e6:.2f}M | "
                     f"{r['tokens'] / r['params']:.1f} | {r['val_loss']:.3f} |")  # fmt: skip
    law = law_optimum(flops)
    lines += ["", "| optimizer | compute-optimal N* | tokens / param at N* | fitted loss at N* |", "|---|---|---|---|"]
    for name in sorted({r["optimizer"] for r in rows}):
        best = optimum(sorted((r for r in rows if r["optimizer"] == name), key=lambda r: r["params"]))
        lines.append(f"| {name} | {best['params'] / 1e6:.3f}M | {best['tokens_per_param']:.1f} | {best['loss']:.3f} |"
                     if best else f"| {name} | not bracketed by the widths | | |")  # fmt: skip
    lines.append(f"| Chinchilla's fit (resolver/scaling.py), all parameters counted | {law['params'] / 1e6:.3f}M | "
                 f"{law['tokens_per_param']:.1f} | |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    (out / "isoflop.md").write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--flops", type=float, default=6e12, help="training FLOPs of every run")
    ap.add_argument("--dims", default="48,64,96,128", help="widths, comma-separated (3 or more for a fit)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--optimizers", default="adamw,muon")
    ap.add_argument("--corpus", default="default", help="default | shakespeare | a text file or folder")
    ap.add_argument("--gpu", default="cpu")
    ap.add_argument("--set", nargs="*", default=[], help="more overrides for every run (e.g. data.vocab_size=1024)")
    ap.add_argument("--report", action="store_true", help="only print the table from DIR/results.jsonl")
    args = ap.parse_args(argv)
    if not args.report:
        args.out.mkdir(parents=True, exist_ok=True)
        dims = [int(d) for d in args.dims.split(",")]
        steps = {d: steps_for(args.flops, dry_plan(args, d)) for d in dims}
        for optimizer in args.optimizers.split(","):
            for d in dims:
                row = run_one(args, optimizer, d, steps[d])
                print(f"{optimizer} d{d}: {row['params'] / 1e6:.3f}M parameters, {row['tokens'] / 1e6:.2f}M tokens, "
                      f"val loss {row['val_loss']:.3f}", flush=True)  # fmt: skip
                with open(args.out / "results.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
    print(report(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
