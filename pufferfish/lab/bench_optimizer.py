"""The optimizer's step alone: milliseconds and operators dispatched per step, AdamW against Muon, at a few shapes.

    python -m pufferfish.lab.bench_optimizer [--shapes 6x384,8x512,12x768] [--steps 20] [--device auto] [--out F]

A training step is the forward, the backward and then the optimizer's step; on a GPU the last is launch-bound
at small widths when it runs one small kernel after another per matrix. For each shape (layers x dims, the
default model otherwise: GQA with a quarter of the heads for keys and values, 8,192-piece vocabulary) it builds
the model, gives every parameter a random gradient and times `optimizer.step()` (the median of --steps after
two warm-up steps, synchronised on a GPU), and counts the operators one step dispatches (torch.profiler's
aten:: events at the top level of the step; on a GPU each is about one kernel launch). AdamW runs as the
resolver plans it (fused on a GPU, foreach on the CPU); Muon as optim.name=muon builds it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from pufferfish.model import ModelConfig, build_model
from pufferfish.optim import build_optimizer
from pufferfish.runlog import git_revision

SETTINGS = {"weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "muon_lr": None}


def model_for(shape: str, device: str) -> torch.nn.Module:
    layers, dims = (int(v) for v in shape.split("x"))
    heads = max(1, dims // 64)
    config = ModelConfig(num_layers=layers, num_dims=dims, num_heads=heads, num_kv_heads=max(1, heads // 4),
                         vocab_size=8192, seq_len=512)  # fmt: skip
    model = build_model(config).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def operators(optimizer, device: str) -> int:
    """aten operators one step dispatches at the top level (those a kernel launch or a CPU loop runs)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        optimizer.step()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    ids = {e.id for e in events}
    return sum(1 for e in events if e.cpu_parent is None or e.cpu_parent.id not in ids)


def time_step(optimizer, device: str, steps: int) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(2):
        optimizer.step()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        optimizer.step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(shapes: list[str], steps: int, device: str) -> list[dict]:
    rows = []
    for shape in shapes:
        for name in ("adamw", "muon"):
            model = model_for(shape, device)
            optimizer = build_optimizer(model, {**SETTINGS, "name": name}, 1e-3, fused=device.startswith("cuda"))
            ms = time_step(optimizer, device, steps) * 1e3
            matrices = sum(1 for g in optimizer.param_groups if g.get("muon") for _ in g["params"])
            rows.append({"shape": shape, "optimizer": name, "ms": round(ms, 3), "operators": operators(optimizer, device),
                         "params": sum(p.numel() for p in model.parameters()), "muon_matrices": matrices})  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| shape | params | optimizer | Muon matrices | ms a step | operators a step |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['params'] / 1e6:.1f}M | {r['optimizer']} | {r['muon_matrices'] or ''} | "
                     f"{r['ms']:.2f} | {r['operators']:,} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="6x384,8x512,12x768", help="LAYERSxDIMS, comma-separated")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    ap.add_argument("--out", type=Path, help="write the rows here (JSON)")
    args = ap.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    rows = measure(args.shapes.split(","), args.steps, device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"{name}, torch {torch.__version__}, revision {git_revision()}\n")
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps({"device": name, "torch": torch.__version__, "git": git_revision(),
                                        "rows": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
