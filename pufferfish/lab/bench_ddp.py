"""Data parallelism on N GPUs against one, and what the link between the GPUs can carry.

    python -m pufferfish.lab.bench_ddp --gpus 2 --out ddp.json     # on a machine with at least 2 GPUs

Four runs of the same 124M-class model (12 x 768, seq 512, micro-batch 16 or --micro, `optimizations=all`):
  one      1 GPU,  accumulation A: the per-GPU batch            (tokens/s baseline)
  many     N GPUs, accumulation A each: the same per-GPU batch  (tokens/s: scaling = many / one)
  same     1 GPU,  accumulation N x A: many's global batch      (loss curve: the same samples in the same steps)
  control  1 GPU,  twice the micro-batch, accumulation N x A / 2: the same samples and steps as `same`,
           split differently, so it differs from `same` by rounding alone: how far rounding moves the curve
  apart    (--apart) N runs like `one` at the same time, one on each GPU, not communicating: the ceiling
           for `many` on this host (shared CPU, power, memory bandwidth), which `one` alone does not show
and an all-reduce probe (the gradient's size in fp32) that says what the GPUs' link carries, since
DDP all-reduces every parameter's gradient once per step. Extra arguments are Hydra overrides for every
run, e.g. `optimizations.precision=fp32 optimizations.compile=false` to compare curves without bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pufferfish.runlog import read_metrics

MICRO, SEQ = 16, 512
SHAPE = ["gpu=auto", "mode=quick_dev", "model.num_layers=12", "model.num_dims=768", f"model.seq_len={SEQ}", "train.log_interval=10", "train.eval_interval=1000",
         "train.sample_tokens=0", "train.progress=false"]  # fmt: skip


def command(run: Path, gpus: int, batch_tokens: int, extra: list[str], micro: int) -> list[str]:
    args = [*SHAPE, f"train.micro_batch={micro}", f"train.batch_tokens={batch_tokens}", f"run_dir={run}",
            f"hydra.run.dir={run}", *extra]  # fmt: skip
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"] if gpus > 1 \
        else [sys.executable]  # fmt: skip
    return [*prefix, "-m", "pufferfish.train", *args]


def train_rows(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def launch(run: Path, gpus: int, batch_tokens: int, extra: list[str], micro: int) -> list[dict]:
    subprocess.run(command(run, gpus, batch_tokens, extra, micro), check=True)
    return train_rows(run)


def launch_apart(root: Path, gpus: int, batch_tokens: int, extra: list[str], micro: int) -> list[list[dict]]:
    """One single-GPU run on each GPU, all at once: every run's train rows."""
    runs = [root / f"gpu{i}" for i in range(gpus)]
    procs = [subprocess.Popen(command(run, 1, batch_tokens, extra, micro),
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": str(i)}) for i, run in enumerate(runs)]  # fmt: skip
    if any(proc.wait() for proc in procs):
        sys.exit(f"a run of --apart failed: {[proc.returncode for proc in procs]}")
    return [train_rows(run) for run in runs]


def probe_all_reduce(gpus: int) -> dict:
    """Bus bandwidth of an fp32 all-reduce of 124M values (NCCL's convention: 2 (n-1)/n x bytes / time)."""
    out = Path(tempfile.mkdtemp(prefix="allreduce_")) / "probe.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "-m", "pufferfish.lab.bench_ddp", "--probe-worker", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def probe_worker(out: str) -> None:
    import torch
    import torch.distributed as dist

    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    x = torch.ones(124_000_000, device="cuda")
    for _ in range(3):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    reps = 10
    for _ in range(reps):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t) / reps
    if rank == 0:
        nbytes = x.numel() * 4
        Path(out).write_text(json.dumps({"bytes": nbytes, "seconds": seconds,
                                         "bus_gb_per_s": 2 * (n - 1) / n * nbytes / seconds / 1e9}))  # fmt: skip
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--accum", type=int, nargs="+", default=[1, 4], help="accumulation steps per GPU to compare")
    p.add_argument("--steps", type=int, default=80, help="training steps of every run")
    p.add_argument("--micro", type=int, default=MICRO, help="sequences per forward on every GPU")
    p.add_argument("--no-probe", action="store_true", help="skip the all-reduce probe")
    p.add_argument("--scaling-only", action="store_true", help="only the runs `one` and `many` (no loss curves)")
    p.add_argument("--apart", action="store_true", help="also N one-GPU runs at once, one per GPU (the ceiling)")
    p.add_argument("--probe-worker", help=argparse.SUPPRESS)
    p.add_argument("--out")
    args, extra = p.parse_known_args()
    if args.probe_worker:
        return probe_worker(args.probe_worker)
    root, n = Path(tempfile.mkdtemp(prefix="bench_ddp_")), args.gpus
    extra = [f"train.max_steps={args.steps}", *extra]
    link = None if args.no_probe else probe_all_reduce(n)
    if link:
        print(f"all-reduce of {link['bytes'] / 1e6:.0f} MB fp32 on {n} GPUs: {link['seconds'] * 1e3:.1f} ms, "
              f"bus bandwidth {link['bus_gb_per_s']:.0f} GB/s", flush=True)  # fmt: skip
    differ = lambda a, b: max(abs(x["train_loss"] - y["train_loss"]) / x["train_loss"] for x, y in zip(a, b))  # noqa: E731
    steady = lambda rows: statistics.median(r["tokens_per_s"] for r in rows[2:] or rows[-1:])  # noqa: E731 (past compile)
    results = []
    for accum in args.accum:
        m = args.micro
        per_gpu = m * SEQ * accum
        one = launch(root / f"one_a{accum}", 1, per_gpu, extra, m)
        many = launch(root / f"many_a{accum}", n, per_gpu * n, extra, m)
        apart = launch_apart(root / f"apart_a{accum}", n, per_gpu, extra, m) if args.apart else []
        same = [] if args.scaling_only else launch(root / f"same_a{accum}", 1, per_gpu * n, extra, m)
        curves = not args.scaling_only and n * accum % 2 == 0
        control = launch(root / f"control_a{accum}", 1, per_gpu * n, extra, 2 * m) if curves else []
        results.append({"accum": accum, "micro_batch": m, "per_gpu_tokens": per_gpu, "one_tps": steady(one), "many_tps": steady(many),
                        "scaling": steady(many) / steady(one),
                        "apart_tps": [steady(rows) for rows in apart],  # each GPU's run, at the same time
                        "apart_scaling": sum(map(steady, apart)) / steady(one) if apart else None,
                        "worst_relative_loss_diff": differ(same, many) if same else None,
                        "control_worst_relative_loss_diff": differ(same, control) if control else None,
                        "losses_one_gpu_same_batch": [r["train_loss"] for r in same],
                        "losses_control": [r["train_loss"] for r in control],
                        "losses_many": [r["train_loss"] for r in many]})  # fmt: skip
    print(f"\n| per-GPU batch (tokens) | accumulation | 1 GPU tokens/s | {n} GPUs tokens/s | scaling | {n} runs apart, "
          f"tokens/s each (ceiling) | largest loss difference, {n} GPUs vs 1 GPU at the same global batch | same, 1 GPU at "
          f"micro-batch {2 * args.micro} (rounding alone) |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for r in results:
        rounding = f"{r['control_worst_relative_loss_diff']:.2%}" if r["losses_control"] else "-"
        same = f"{r['worst_relative_loss_diff']:.2%}" if r["losses_one_gpu_same_batch"] else "-"
        apart = " / ".join(f"{t:,.0f}" for t in r["apart_tps"]) + f" ({r['apart_scaling']:.2f}x)" if r["apart_tps"] else "-"
        print(f"| {r['per_gpu_tokens']:,} | {r['accum']} | {r['one_tps']:,.0f} | {r['many_tps']:,.0f} | "
              f"{r['scaling']:.2f}x | {apart} | {same} | {rounding} |")  # fmt: skip
    if not args.scaling_only:  # the loss curves
        for r in results:
            curves = {"1 GPU": r["losses_one_gpu_same_batch"], f"1 GPU, micro {2 * args.micro}": r["losses_control"],
                      f"{n} GPUs": r["losses_many"]}  # fmt: skip
            print(f"\naccumulation {r['accum']}, train loss every 10 steps:")
            for name, losses in curves.items():
                print(f"  {name:>14}: " + ", ".join(f"{x:.4f}" for x in losses))
    if link:  # again, last: the runs' output comes between
        print(f"\nall-reduce of {link['bytes'] / 1e6:.0f} MB fp32 on {n} GPUs: {link['seconds'] * 1e3:.1f} ms, "
              f"bus bandwidth {link['bus_gb_per_s']:.0f} GB/s")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"all_reduce": link, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
