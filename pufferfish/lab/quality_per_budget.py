"""Quality per budget: the validation loss each system hands over in the same wall-clock time, on the same tokens.

    python -m pufferfish.lab.quality_per_budget --out DIR [--corpora default,shakespeare] [--budgets 30,108]
        [--systems plan,oracle,nanogpt] [--gpu h200]
    python -m pufferfish.lab.quality_per_budget --out DIR --report       # the table and the PNG from DIR's results

For every corpus and budget (seconds of training):
- plan: `python -m pufferfish.train gpu=G mode=quick_dev mode.target_hours=B/3600`, the plan as a user gets it;
  its handed-over validation loss (and bits per byte), the best and the last seen in the run;
- oracle: one Hydra multirun at the same budget and data over 5 widths (the resolver picks each one's depth)
  x 2 learning rates x 2 batch sizes around the plan's; the plan should land within 3 % of its best;
- nanogpt: the peer's train.py (../shared/peers/nanogpt, run from a scratch folder, never copied into
  Pufferfish) with its GPT-2 124M model, batch 16 x 1024 x 4, on Pufferfish's own token files and vocabulary,
  its iteration count set so that its process takes the plan's wall-clock time; with
  --always_save_checkpoint=False it keeps its best validation loss, which is what is compared.
Corpora: `default` (data=pysource, all Python source on the machine) and `shakespeare`
(../shared/data/shakespeare_complete: hamlet, tempest and sonnets held out for validation, as its README says).
Each run appends a JSON line to DIR/results.jsonl, so the parts can run in separate calls; --report prints a
Markdown table and writes DIR/quality_per_budget.png (validation loss against wall-clock seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .figures import panels, save

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("PUFFERFISH_SHARED_DATA", ROOT.parent / "shared" / "data"))
PEER = Path(os.environ.get("PUFFERFISH_NANOGPT", ROOT.parent / "shared" / "peers" / "nanogpt"))
HELD_OUT = ("hamlet_gut.txt", "tempest_gut.txt", "sonnets_gut.txt")
WIDTH_FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0)  # the oracle's widths, as multiples of the plan's
NANO_ARGS = ["--batch_size=16", "--block_size=1024", "--gradient_accumulation_steps=4", "--eval_iters=10",
             "--log_interval=10", "--always_save_checkpoint=False", "--compile=True", "--wandb_log=False"]  # fmt: skip


def corpus_overrides(corpus: str) -> list[str]:
    if corpus == "default":
        return []
    folder = SHARED / "shakespeare_complete"
    if not folder.is_dir():
        sys.exit(f"quality_per_budget: the Shakespeare corpus is not at {folder} (set PUFFERFISH_SHARED_DATA)")
    train = sorted(str(f) for f in folder.glob("*_gut.txt") if f.name not in HELD_OUT)
    val = [str(folder / n) for n in HELD_OUT]
    return ["data=text_files", "data.paths=[" + ",".join(train) + "]", "data.val_paths=[" + ",".join(val) + "]"]


def pufferfish_args(corpus: str, budget_s: float, gpu: str) -> list[str]:
    return [f"gpu={gpu}", "mode=quick_dev", f"mode.target_hours={budget_s / 3600:.6f}", "train.progress=false",
            *corpus_overrides(corpus)]  # fmt: skip


def timed(cmd: list[str], cwd: Path, log: Path, on_line=None) -> float:
    """Run cmd, its output into log (and each line to on_line with the seconds since start); the wall seconds."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            out.write(line)
            if on_line:
                on_line(time.perf_counter() - t0, line)
        rc = proc.wait()
    if rc != 0:
        sys.exit(f"quality_per_budget: {' '.join(cmd[:4])} ... failed ({rc}); see {log}")
    return time.perf_counter() - t0


def run_summary(run: Path, wall_s: float) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    plan = json.loads((run / "plan.json").read_text())
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    startup = wall_s - summary["wall_s"]  # before the loop: imports, data cache, plan
    curve = [(startup + e["elapsed_s"], e["val_loss"]) for e in evals if "elapsed_s" in e and not e.get("final")]
    m = plan["model"]
    return {"val_loss": summary["val_loss"], "val_bpb": summary["val_bpb"], "best_val_loss": summary.get("best_val_loss"),
            "last_val_loss": summary.get("last_val_loss"), "handed_over": summary.get("handed_over"),
            "stopped_by": summary["stopped_by"], "wall_s": wall_s, "shape": f"{m['num_layers']} x {m['num_dims']}",
            "params": plan["params"], "lr": plan["lr"], "optimizer": plan.get("optimizer", {}),
            "batch_tokens": plan["batch_tokens"], "epochs": plan["epochs"],
            "tokens": summary["tokens"], "curve": curve, "data_dir": None}  # fmt: skip


def run_plan(corpus: str, budget: float, gpu: str, out: Path) -> dict:
    run = out / "runs" / f"plan_{corpus}_{budget:g}"
    shutil.rmtree(run, ignore_errors=True)
    wall = timed([sys.executable, "-m", "pufferfish.train", *pufferfish_args(corpus, budget, gpu), f"run_dir={run}"],
                 ROOT, out / f"plan_{corpus}_{budget:g}.log")  # fmt: skip
    return {"system": "plan", **run_summary(run, wall)}


def oracle_grid(plan: dict, factors: tuple[float, ...] = WIDTH_FACTORS) -> list[str]:
    """The multirun's sweep overrides: widths around the plan's (`factors` of it, to 64), the plan's learning rate
    and twice it (under Muon, the rate of the blocks' matrices, most of the model), the plan's batch and a quarter
    of it; every job with the plan's optimizer (optim.name=auto could choose another at another width or batch)."""
    d = int(plan["shape"].split(" x ")[1])
    widths = sorted({max(64, int(round(d * f / 64)) * 64) for f in factors})
    optimizer = plan.get("optimizer") or {}
    key, rate = ("optim.muon_lr", optimizer["muon_lr"]) if optimizer.get("name") == "muon" else ("optim.lr", plan["lr"])
    batches = [plan["batch_tokens"], max(1024, plan["batch_tokens"] // 4)]
    return ["model.num_dims=" + ",".join(map(str, widths)), f"{key}={rate:.3e},{rate * 2:.3e}",
            "train.batch_tokens=" + ",".join(map(str, batches)), f"optim.name={optimizer.get('name', 'adamw')}"]  # fmt: skip


def run_oracle(corpus: str, budget: float, gpu: str, out: Path, plan: dict,
               factors: tuple[float, ...] = WIDTH_FACTORS) -> list[dict]:  # fmt: skip
    """One multirun over oracle_grid (the resolver picks each width's depth). `factors` picks some of the widths,
    so that the grid can run in parts, each in a folder of its own, each appending its rows."""
    tag = "" if tuple(factors) == WIDTH_FACTORS else "_w" + "_".join(f"{f:g}" for f in factors)
    sweep = out / "runs" / f"oracle_{corpus}_{budget:g}{tag}"
    shutil.rmtree(sweep, ignore_errors=True)
    args = [*pufferfish_args(corpus, budget, gpu), *oracle_grid(plan, factors), "train.sample_tokens=0",
            f"hydra.sweep.dir={sweep}"]  # fmt: skip
    timed([sys.executable, "-m", "pufferfish.train", "-m", *args], ROOT, out / f"oracle_{corpus}_{budget:g}{tag}.log")
    rows = []
    for job in sorted(p for p in sweep.iterdir() if (p / "summary.json").exists()):
        summary = json.loads((job / "summary.json").read_text())
        rows.append({"system": "oracle", "job": f"{sweep.name}/{job.name}", **run_summary(job, summary["wall_s"])})
    return rows


def nanogpt_folder(corpus: str, out: Path, data_dir: Path) -> Path:
    """A scratch copy of the peer's script with Pufferfish's token files as its dataset `pf`."""
    work = out / "nanogpt" / corpus
    (work / "data" / "pf").mkdir(parents=True, exist_ok=True)
    for name in ("train.py", "model.py", "configurator.py"):
        shutil.copy(PEER / name, work / name)
    meta = json.loads((data_dir / "meta.json").read_text())
    if meta["dtype"] != "uint16":
        sys.exit(f"quality_per_budget: nanoGPT reads uint16 tokens; {data_dir} holds {meta['dtype']}")
    for split in ("train", "val"):
        target = work / "data" / "pf" / f"{split}.bin"
        target.unlink(missing_ok=True)
        target.symlink_to(data_dir / f"{split}.bin")
    with open(work / "data" / "pf" / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": meta["vocab_size"]}, f)
    return work


def run_nanogpt(corpus: str, wall_s: float, out: Path, data_dir: Path, extra: tuple[str, ...] = (),
                evals: int = 10) -> dict:  # fmt: skip
    """nanoGPT's recipe for about wall_s seconds; `extra` replaces arguments of NANO_ARGS (e.g. --n_layer=4),
    `evals` evaluations spread over the run. Its curve's seconds count from the start of its process, and
    start_s is when its first line came (after its imports, before it reads the data and builds the model)."""
    work = nanogpt_folder(corpus, out, data_dir)
    times: list[tuple[float, int]] = []

    def iter_time(t: float, line: str) -> None:
        if m := re.match(r"iter (\d+): loss", line):
            times.append((t, int(m.group(1))))

    # a short run first: its start-up (compilation) and seconds per iteration set the real run's length
    timed([sys.executable, "train.py", "--dataset=pf", "--out_dir=probe", "--max_iters=60", "--lr_decay_iters=60",
           "--warmup_iters=5", "--eval_interval=100000", *NANO_ARGS, *extra], work,
          out / f"nanogpt_probe_{corpus}.log", iter_time)  # fmt: skip
    (t_a, i_a), (t_b, i_b) = times[len(times) // 2], times[-1]
    per_iter = (t_b - t_a) / max(1, i_b - i_a)
    iters = max(20, int((wall_s - t_a + i_a * per_iter) / per_iter))
    curve: list[tuple[float, float]] = []
    first: list[float] = []

    def val_line(t: float, line: str) -> None:
        if not first:
            first.append(t)
        if m := re.match(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", line):
            curve.append((t, float(m.group(2))))

    wall = timed([sys.executable, "train.py", "--dataset=pf", "--out_dir=out", f"--max_iters={iters}",
                  f"--lr_decay_iters={iters}", f"--warmup_iters={max(1, iters // 20)}",
                  f"--eval_interval={max(1, iters // evals)}", *NANO_ARGS, *extra], work,
                 out / f"nanogpt_{corpus}.log", val_line)  # fmt: skip
    best = min(v for _, v in curve)
    return {"system": "nanogpt", "val_loss": best, "best_val_loss": best, "last_val_loss": curve[-1][1],
            "handed_over": "best", "wall_s": wall, "shape": "12 x 768 (GPT-2 124M)", "iters": iters,
            "seconds_per_iter": per_iter, "batch_tokens": 16 * 1024 * 4, "curve": curve,
            "start_s": first[0]}  # fmt: skip


def prepared_dir(corpus: str, budget: float, gpu: str) -> Path:
    """Prepare the corpus (outside any timing) and return its cache folder."""
    from pufferfish.api import compose_config
    from pufferfish.data import prepare_data
    from pufferfish.rundir import data_config

    cfg = compose_config(pufferfish_args(corpus, budget, gpu))
    return prepare_data(data_config(cfg), progress=True).dir


def report(out: Path) -> str:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    lines = ["| corpus | budget s | system | handed-over val loss | bits/byte | best seen | last | stopped by | shape "
             "| wall s | plan vs oracle best | plan vs nanoGPT |", "|" + "---|" * 12]  # fmt: skip
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["corpus"], r["budget_s"]), []).append(r)
    for (corpus, budget), group in sorted(groups.items()):
        plan = next((r for r in group if r["system"] == "plan"), None)
        oracle = [r for r in group if r["system"] == "oracle"]
        nano = next((r for r in group if r["system"] == "nanogpt"), None)
        best_oracle = min(oracle, key=lambda r: r["val_loss"]) if oracle else None
        for r in ([plan] if plan else []) + ([best_oracle] if best_oracle else []) + ([nano] if nano else []):
            vs_oracle = f"{plan['val_loss'] / best_oracle['val_loss'] - 1:+.1%}" if plan and best_oracle and r is plan else ""
            vs_nano = f"{plan['val_loss'] - nano['val_loss']:+.3f}" if plan and nano and r is plan else ""
            name = r["system"] + (f" best of {len(oracle)} ({r.get('job', '')})" if r is best_oracle else "")
            bpb = f"{r['val_bpb']:.3f}" if r.get("val_bpb") else ""
            lines.append(f"| {corpus} | {budget:g} | {name} | {r['val_loss']:.3f} | {bpb} | {r['best_val_loss']:.3f} | "
                         f"{r['last_val_loss']:.3f} | {r.get('stopped_by', '')} | {r['shape']} | {r['wall_s']:.0f} | "
                         f"{vs_oracle} | {vs_nano} |")  # fmt: skip
    _plot(groups, out / "quality_per_budget.png")
    return "\n".join(lines)


def _plot(groups: dict, path: Path) -> None:
    fig, axes = panels(len(groups))
    for ax, ((corpus, budget), group) in zip(axes, sorted(groups.items())):
        for r in group:
            if r["system"] == "oracle" or not r.get("curve"):
                continue
            t, v = zip(*r["curve"])
            ax.plot(t, v, marker=".", label=f"{r['system']} ({r['shape']})")
        oracle = [r for r in group if r["system"] == "oracle"]
        if oracle:
            ax.axhline(min(r["val_loss"] for r in oracle), ls="--", c="grey", label=f"oracle best of {len(oracle)}")
        ax.set(title=f"{corpus}, {budget:g} s", xlabel="wall-clock seconds", ylabel="validation loss")
    save(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--corpora", default="default,shakespeare")
    ap.add_argument("--budgets", default="108", help="seconds of training, comma-separated")
    ap.add_argument("--systems", default="plan,nanogpt,oracle")
    ap.add_argument("--gpu", default="auto")
    ap.add_argument("--oracle-widths", default=",".join(f"{f:g}" for f in WIDTH_FACTORS),
                    help="the oracle's widths as multiples of the plan's (a subset runs part of its grid)")
    ap.add_argument("--report", action="store_true", help="only print the table and draw the PNG")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        systems = args.systems.split(",")
        for corpus in args.corpora.split(","):
            for budget in map(float, args.budgets.split(",")):
                data_dir = prepared_dir(corpus, budget, args.gpu)
                if "plan" in systems:
                    plan = run_plan(corpus, budget, args.gpu, args.out)
                else:  # measured in an earlier call: its row sets nanoGPT's time and the oracle's grid
                    plan = next(r for r in map(json.loads, (args.out / "results.jsonl").read_text().splitlines())
                                if (r["corpus"], r["budget_s"], r["system"]) == (corpus, budget, "plan"))  # fmt: skip
                found = [plan] if "plan" in systems else []
                if "nanogpt" in systems:
                    found.append(run_nanogpt(corpus, plan["wall_s"], args.out, data_dir))
                if "oracle" in systems:
                    factors = tuple(float(f) for f in args.oracle_widths.split(","))
                    found += run_oracle(corpus, budget, args.gpu, args.out, plan, factors)
                with open(args.out / "results.jsonl", "a") as f:
                    for row in found:
                        f.write(json.dumps({"corpus": corpus, "budget_s": budget, **row}) + "\n")
                print(report(args.out), flush=True)
    print(report(args.out))


if __name__ == "__main__":
    main()
