"""Did a run end on its time budget with its learning-rate schedule complete? (docs/benchmarks.md, time budget)

    python -m pufferfish.train gpu=h200 mode=quick_dev mode.target_hours=0.1 run_dir=RUN
    python -m pufferfish.lab.budget_check RUN

Reads the run directory: the budget (plan.json), the training loop's time and steps (summary.json) and
the learning rate of the last logged step (metrics.jsonl) against the schedule's last value.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from pufferfish.runlog import read_metrics
from pufferfish.schedule import lr_at


def check(run: Path, tolerance: float) -> dict:
    missing = [f for f in ("plan.json", "summary.json", "config.yaml", "metrics.jsonl") if not (run / f).is_file()]
    if missing:
        raise SystemExit(f"budget_check: {run} has no {', '.join(missing)}; give the run_dir of a finished run "
                         f"(python -m pufferfish.train ... run_dir=RUN writes all four)")  # fmt: skip
    plan = json.loads((run / "plan.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    o = OmegaConf.load(run / "config.yaml").optim
    train = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    last_lr = train[-1]["lr"] if train else float("nan")
    end_lr = lr_at(plan["steps"] - 1, plan["steps"], plan["lr"], o.schedule, o.warmup_frac, o.min_lr_ratio,
                   o.decay_frac)  # fmt: skip
    budget = plan["time_budget_s"]
    elapsed = summary.get("wall_s", summary["elapsed_s"])  # the loop, the final checkpoint, evaluation and sample
    row = {"budget_s": budget, "elapsed_s": elapsed, "ratio": elapsed / budget, "steps": summary["step"],
           "planned_steps": plan["steps"], "stopped_by": summary["stopped_by"], "last_lr": last_lr,
           "schedule_end_lr": end_lr, "peak_lr": plan["lr"], "tokens": summary["tokens"],
           "tokens_per_s": summary["tokens_per_s"], "predicted_tokens_per_s": plan["predicted_tokens_per_s"],
           "measured_tokens_per_s": plan.get("measured_tokens_per_s"), "val_loss": summary.get("val_loss"),
           "model": f"{plan['model']['num_layers']} x {plan['model']['num_dims']}", "params": plan["params"]}  # fmt: skip
    row["on_time"] = abs(row["ratio"] - 1) <= tolerance
    row["schedule_complete"] = row["steps"] >= row["planned_steps"] and abs(last_lr - end_lr) <= 1e-3 * plan["lr"]
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--tolerance", type=float, default=0.05, help="allowed |elapsed / budget - 1|")
    args = p.parse_args()
    r = check(args.run, args.tolerance)
    print(json.dumps(r, indent=2))
    print("\n| budget s | run s (loop + final eval) | ratio | steps / planned | stopped by | last lr | schedule's end lr |"
          " tokens/s predicted -> measured | verdict |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    verdict = "on time, schedule complete" if r["on_time"] and r["schedule_complete"] else "NOT MET"
    print(f"| {r['budget_s']:.0f} | {r['elapsed_s']:.1f} | {r['ratio']:.3f} | {r['steps']} / {r['planned_steps']} | "
          f"{r['stopped_by']} | {r['last_lr']:.3e} | {r['schedule_end_lr']:.3e} | "
          f"{r['predicted_tokens_per_s']:,.0f} -> {r['tokens_per_s']:,.0f} | {verdict} |")  # fmt: skip
    return 0 if r["on_time"] and r["schedule_complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
