"""MoE against the dense model with the same active parameters, trained for the same wall-clock time.

    python -m pufferfish.lab.bench_moe --seconds 60 --out moe.json     # on a GPU; any extra args are overrides

Both runs go through the real training function on the default corpus with the same shape, data,
schedule logic and budget; only the `moe` group differs (8 experts, top-2, each expert half the dense
FFN width, so a token's active parameters match the dense model's).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from pufferfish.api import compose_config
from pufferfish.resolver import plan_flops_per_token
from pufferfish.train import train

DATASHEET = {"h200": 989e12, "h100": 989e12, "a100_80gb": 312e12, "a100_40gb": 312e12}


def run(name: str, overrides: list[str], seconds: float, root: Path) -> dict:
    cfg = compose_config([f"mode.target_hours={seconds / 3600}", f"run_dir={root / name}", "train.progress=false",
                          "train.sample_tokens=0", *overrides])  # fmt: skip
    result = train(cfg)
    plan = json.loads((root / name / "plan.json").read_text())
    flops_per_token = plan_flops_per_token(plan)
    peak = DATASHEET.get(plan["hardware"]["profile"], float("nan"))
    return {"name": name, "params": plan["params"], "active_params": plan["active_params"],
            "tokens_per_s": result["tokens_per_s"], "mfu_active": flops_per_token * result["tokens_per_s"] / peak,
            "peak_gib": result.get("peak_mem_bytes", float("nan")) / 2**30, "val_loss": result.get("val_loss"),
            "val_bpb": result.get("val_bpb"), "tokens": result["tokens"], "elapsed_s": result["elapsed_s"],
            "micro_batch": plan["micro_batch"], "batch_tokens": plan["batch_tokens"]}  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--out")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for both runs")
    args = p.parse_args()
    shape = ["mode=quick_dev", "model.num_layers=8", "model.num_dims=512", "train.batch_tokens=131072", *args.overrides]
    root = Path(tempfile.mkdtemp(prefix="bench_moe_"))
    rows = [run("dense", [*shape, "moe=none"], args.seconds, root),
            run("moe 8x top-2", [*shape, "moe=topk"], args.seconds, root)]  # fmt: skip
    print(f"\n| model | params | active | tokens/s | MFU (active, datasheet) | peak GiB | tokens in {args.seconds:.0f} s "
          "| val loss | val bpb |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['active_params'] / 1e6:.1f}M | {r['tokens_per_s']:,.0f} | "
              f"{r['mfu_active']:.3f} | {r['peak_gib']:.2f} | {r['tokens'] / 1e6:.1f}M | {r['val_loss']:.3f} | "
              f"{r['val_bpb']:.3f} |")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
