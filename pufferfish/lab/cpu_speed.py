"""The cpu profile's share of its probed matmul rate: the training step's tokens/s at small shapes on this CPU.

    python -m pufferfish.lab.cpu_speed [--out cpu_speed.json] [--steps 6]

The cpu profile predicts a step as FLOPs per token x tokens / (probe x mfu x d / (d + D)), the probe being the
fp32 rate of 512 x 512 matmuls with torch's threads (resolver.hardware.cpu_matmul_flops), mfu conf/gpu/cpu.yaml's
and D the speed model's cpu_half_share_dims. For
each shape of a grid of what CPU plans run (1-12 layers of 64-768 dims, micro-batches of 1-16 sequences of 256
or 512 tokens, an 8,192-piece vocabulary, GQA as attention=gqa picks it) it times the training step runs take
on the CPU (step.py through lab.bench: eager fp32, fused AdamW) and prints the tokens/s measured, the share of
the probe that is (tokens/s x FLOPs per token / probe) and the tokens/s the profile predicts. The share grows
with width (the norms, activations, attention and loss scale with d, the matmuls with d^2): the fit of
mfu x d / (d + D) to the shares (least squares of their logs) is printed, the values for the profile's mfu and
cpu_half_share_dims. The probe runs before and after the grid, and their mean is used.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
from pathlib import Path

import torch

from pufferfish.model import ModelConfig
from pufferfish.resolver.hardware import cpu_matmul_flops, load_profile
from pufferfish.resolver.speed import CONSTANTS, cpu_share, model_flops_per_token
from pufferfish.runlog import git_revision

from .bench import Technique, make_train_step, time_steps
from .calibrate import gqa_rows

GRID = [  # layers, dims, micro-batch, sequence length
    (1, 64, 8, 256), (2, 128, 4, 512), (4, 128, 2, 512), (4, 128, 8, 512), (3, 192, 4, 256),
    (4, 256, 2, 512), (4, 256, 8, 512), (6, 256, 16, 256), (6, 384, 2, 512), (8, 384, 4, 512),
    (8, 512, 2, 512), (12, 768, 1, 512),
]  # fmt: skip
VOCAB = 8192


def measure(steps: int, grid=GRID, probe_seconds: float = 1.0) -> dict:
    step_kind = Technique("fp32", fused=True)  # what a plan on the CPU runs: eager, fp32, fused AdamW
    probe_before = cpu_matmul_flops(seconds=probe_seconds)
    rows = []
    for fields, batch, _ in gqa_rows([(L, d, B, T, step_kind, VOCAB) for L, d, B, T in grid]):
        mc = ModelConfig(**fields)
        step, params = make_train_step(mc, batch, "cpu", step_kind)
        timing = time_steps(step, "cpu", warmup=2, steps=steps)
        flops = model_flops_per_token(params, mc.num_layers, mc.num_dims, mc.seq_len)
        rows.append({"num_layers": mc.num_layers, "num_dims": mc.num_dims, "num_kv_heads": mc.num_kv_heads,
                     "batch": batch, "seq_len": mc.seq_len, "params": params, "flops_per_token": flops,
                     "tokens_per_s": batch * mc.seq_len / timing["step_s"]})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    probe = (probe_before + cpu_matmul_flops(seconds=probe_seconds)) / 2
    for r in rows:
        r["share"] = r["tokens_per_s"] * r["flops_per_token"] / probe
    mfu, half = fit(rows)
    return {"rows": rows, "probe_flops": probe, "probe_before": probe_before, "fit": {"mfu": mfu, "half_share_dims": half},
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "git": git_revision()}  # fmt: skip


def fit(rows: list[dict]) -> tuple[float, float]:
    """(mfu, D) of share = mfu x d / (d + D), least squares of log share: D on a grid of whole dims, mfu the
    geometric mean of share x (d + D) / d, at most 1 (a profile's mfu is a share; the fit then takes the D
    best for mfu 1)."""
    best = None
    for half in range(1, 2049):
        logs = [math.log(r["share"] * (r["num_dims"] + half) / r["num_dims"]) for r in rows]
        mean = min(0.0, statistics.fmean(logs))
        err = sum((x - mean) ** 2 for x in logs)
        if best is None or err < best[0]:
            best = (err, math.exp(mean), float(half))
    return best[1], best[2]


def table(result: dict, mfu: float, half: float) -> str:
    """The rows against the speed model with the profile's mfu and D (`mfu`, `half`), and the fit."""
    probe, found = result["probe_flops"], result["fit"]
    lines = [f"probe: {probe / 1e9:.1f} GFLOP/s fp32 ({result['threads']} threads); the model: mfu {mfu:g}, "
             f"D {half:g}", "", "| layers x dims | kv heads | batch x seq | params | tokens/s | share of the probe "
             "| predicted tokens/s | error |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        predicted = probe * cpu_share(mfu, r["num_dims"], half) / r["flops_per_token"]
        lines.append(f"| {r['num_layers']} x {r['num_dims']} | {r['num_kv_heads']} | {r['batch']} x {r['seq_len']} | "
                     f"{r['params'] / 1e6:.2f}M | {r['tokens_per_s']:,.0f} | {r['share']:.3f} | {predicted:,.0f} | "
                     f"{predicted / r['tokens_per_s'] - 1:+.0%} |")  # fmt: skip
    errors = [abs(cpu_share(found["mfu"], r["num_dims"], found["half_share_dims"]) / r["share"] - 1)
              for r in result["rows"]]  # fmt: skip
    lines.append(f"\nfit: mfu {found['mfu']:.2f}, D {found['half_share_dims']:g} (every row within {max(errors):.0%})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the rows and the probe here (JSON)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per shape (the median is kept)")
    args = ap.parse_args()
    result = measure(args.steps)
    print(table(result, float(load_profile("cpu").mfu), CONSTANTS.cpu_half_share_dims))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
