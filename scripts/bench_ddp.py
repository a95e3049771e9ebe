"""Data parallelism on N GPUs against one: tokens/s at the same per-GPU micro-batch, and the loss curve at
the same global batch (the same samples in the same steps).

    python scripts/bench_ddp.py --gpus 2 --out ddp.json     # on a machine with at least 2 GPUs
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pufferfish.runlog import read_metrics  # noqa: E402

SHAPE = ["gpu=auto", "mode=quick_dev", "model.num_layers=12", "model.num_dims=768", "train.micro_batch=16",
         "train.max_steps=80", "train.log_interval=10", "train.eval_interval=1000", "train.sample_tokens=0",
         "train.progress=false"]  # fmt: skip


def launch(run: Path, gpus: int, batch_tokens: int) -> list[dict]:
    args = [*SHAPE, f"train.batch_tokens={batch_tokens}", f"run_dir={run}", f"hydra.run.dir={run}"]
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"] if gpus > 1 \
        else [sys.executable]  # fmt: skip
    subprocess.run([*prefix, "-m", "pufferfish.train", *args], check=True, cwd=ROOT)
    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args()
    root, n = Path(tempfile.mkdtemp(prefix="bench_ddp_")), args.gpus
    per_gpu = 16 * 512  # micro-batch 16 x seq 512 (quick_dev)
    one = launch(root / "one", 1, per_gpu * n)  # one GPU, n micro-steps a step: the same global batch
    many = launch(root / "many", n, per_gpu * n)  # n GPUs, one micro-step each
    steady = lambda rows: statistics.median(r["tokens_per_s"] for r in rows[2:])  # noqa: E731 (past compile)
    rows = [{"gpus": 1, "tokens_per_s": steady(one), "losses": [r["train_loss"] for r in one]},
            {"gpus": n, "tokens_per_s": steady(many), "losses": [r["train_loss"] for r in many]}]  # fmt: skip
    worst = max(abs(a - b) / a for a, b in zip(rows[0]["losses"], rows[1]["losses"]))
    print("\n| GPUs | tokens/s (median after compile) | scaling | losses every 10 steps |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['gpus']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x | "
              f"{', '.join(f'{x:.3f}' for x in r['losses'])} |")  # fmt: skip
    print(f"\nlargest relative loss difference at the same global batch: {worst:.2e}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "worst_relative_loss_diff": worst}, indent=2))


if __name__ == "__main__":
    main()
