"""Predicted against measured peak memory and tokens/s over a grid of shapes (the resolver's models).

    python scripts/calibrate.py --grid fit --out fit.json      # measure; print the constants that fit
    python scripts/calibrate.py --grid check --out check.json  # a different grid: the errors we report

Memory is `torch.cuda.max_memory_allocated` over two steps from a clean start; speed is the median of
timed steps after warm-up. Every shape compiles afresh (static shapes, as a run compiles once): reusing
dynamo's cache would recompile later shapes with dynamic sizes. Needs a CUDA device (the CPU profile is
calibrated at run time instead). `scripts/fit_speed_model.py` re-predicts and refits from the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pufferfish.bench import Technique, make_train_step, peak_bytes_of_two_steps, time_steps  # noqa: E402
from pufferfish.model import ModelConfig  # noqa: E402
from pufferfish.resolver import Shape, predict_peak_bytes, predict_tokens_per_s  # noqa: E402
from pufferfish.resolver.hardware import GIB, Hardware, load_profile, profile_peak_flops  # noqa: E402
from pufferfish.resolver.plan import _shape  # noqa: E402
from pufferfish.runlog import git_revision  # noqa: E402


def grid(name: str) -> list[tuple[dict, int, Technique]]:
    """(model fields, micro-batch, technique): depth, width, batch, length, precision, ckpt, GQA, MoE, compile."""
    fp32, bf16 = Technique("fp32", fused=True), Technique("bf16", fused=True)
    ck, comp = replace(bf16, ckpt=True), replace(bf16, compile="step", chunked=True)
    if name == "fit":
        rows = [(L, d, B, T, t) for (L, d, B, T) in [(4, 256, 16, 512), (12, 768, 8, 512), (8, 512, 8, 1024),
                                                     (24, 768, 4, 1024), (6, 1024, 8, 512), (12, 512, 32, 256)]
                for t in (fp32, bf16, ck)]  # fmt: skip
        rows += [(12, 768, 16, 1024, comp), (8, 512, 16, 512, comp)]
        kvs = {0: 1}
    else:
        rows = [(L, d, B, T, t) for (L, d, B, T) in [(6, 384, 16, 512), (16, 640, 8, 1024), (10, 896, 4, 2048),
                                                     (20, 512, 16, 512), (2, 1536, 8, 512), (30, 384, 8, 1024),
                                                     (12, 768, 2, 2048), (8, 1024, 16, 256)]
                for t in (fp32, bf16, ck)]  # fmt: skip
        rows += [(12, 768, 8, 1024, comp), (24, 1024, 4, 1024, comp), (6, 384, 32, 512, comp)]
        kvs = {}
    out = []
    for i, (L, d, B, T, t) in enumerate(rows):
        heads = d // 64
        kv = heads if i % 2 == kvs.get(0, 0) else max(k for k in range(1, heads // 4 + 1) if heads % k == 0)
        out.append((dict(num_layers=L, num_dims=d, num_heads=heads, num_kv_heads=kv, vocab_size=32000, seq_len=T), B, t))
    moe = dict(use_moe=True, moe_num_experts=8, moe_active_experts=2)
    out += [(dict(num_layers=8, num_dims=512, num_heads=8, num_kv_heads=2, vocab_size=32000, seq_len=512, **moe), 8, bf16),
            (dict(num_layers=6, num_dims=768, num_heads=12, num_kv_heads=3, vocab_size=32000, seq_len=1024, **moe), 4, ck)]  # fmt: skip
    return out


def shape_of(mc: ModelConfig, batch: int, t: Technique, profile: str = "h200") -> Shape:
    """The Shape the resolver builds for this model, micro-batch and technique on the profile's GPU."""
    prof = load_profile(profile)
    hw = Hardware(profile, "cuda:0", profile, int(float(prof.vram_gb) * GIB), t.precision,
                  profile_peak_flops(prof, t.precision), float(prof.mfu), False, [], float(prof.compute_capability))  # fmt: skip
    cfg = SimpleNamespace(attention=SimpleNamespace(sdpa_backend="auto"),
                          optimizations=SimpleNamespace(chunked_loss=t.chunked, loss_chunk_tokens=4096,
                                                        compile=bool(t.compile)))  # fmt: skip
    return _shape(mc.to_dict(), cfg, hw, batch, t.ckpt)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=["fit", "check"], default="check")
    p.add_argument("--profile", default="h200")
    p.add_argument("--out")
    args = p.parse_args()
    device = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    prof = load_profile(args.profile)
    rows = []
    for fields, batch, t in grid(args.grid):
        mc = ModelConfig(**fields)
        s = shape_of(mc, batch, t, args.profile)
        pred = predict_peak_bytes(s)
        peak_flops = profile_peak_flops(prof, t.precision)  # as the resolver sees it (TF32 for fp32)
        torch._dynamo.reset()  # compile this shape afresh and static, as a run does
        try:
            step, n = make_train_step(mc, batch, device, t)
            measured = peak_bytes_of_two_steps(step, device)
            timing = time_steps(step, device, warmup=3, steps=6)
        except torch.cuda.OutOfMemoryError:
            print(f"skip (OOM): {fields} B{batch} {t}", flush=True)
            continue
        except Exception as e:  # one shape failing to compile must not lose the whole grid
            print(f"skip ({type(e).__name__}: {str(e)[:300]}): {fields} B{batch} {t}", flush=True)
            continue
        finally:
            step = None
            torch.cuda.empty_cache()
        tps = batch * mc.seq_len / timing["step_s"]
        row = {**fields, "batch": batch, "technique": asdict(t), "params": n, "measured_peak": measured,
               "predicted_peak": pred.total, "breakdown": pred.to_dict(), "measured_tps": tps,
               "predicted_tps": predict_tokens_per_s(s, peak_flops, prof.mfu, True),
               "static": pred.weights + pred.gradients + pred.optimizer + pred.autocast_copies}  # fmt: skip
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("num_layers", "num_dims", "batch", "seq_len", "measured_peak",
                                               "predicted_peak", "measured_tps", "predicted_tps")}), flush=True)  # fmt: skip
    mem_err = [r["predicted_peak"] / r["measured_peak"] - 1 for r in rows]
    tps_err = [r["predicted_tps"] / r["measured_tps"] - 1 for r in rows]
    print("\n| layers | dims | kv | batch x seq | technique | MoE | measured GiB | predicted GiB | err | "
          "measured tok/s | predicted tok/s | err |")
    print("|" + "---|" * 12)
    for r, me, te in zip(rows, mem_err, tps_err):
        t = r["technique"]
        tech = t["precision"] + ("+ckpt" if t["ckpt"] else "") + ("+compile" if t["compile"] else "")
        print(f"| {r['num_layers']} | {r['num_dims']} | {r['num_kv_heads']} | {r['batch']} x {r['seq_len']} | {tech} | "
              f"{'8e top-2' if r.get('use_moe') else ''} | {r['measured_peak'] / 2**30:.2f} | "
              f"{r['predicted_peak'] / 2**30:.2f} | {me:+.1%} | {r['measured_tps']:,.0f} | {r['predicted_tps']:,.0f} | "
              f"{te:+.1%} |")  # fmt: skip
    summary = {"configs": len(rows),
               "memory_median_abs_err": statistics.median(abs(e) for e in mem_err),
               "memory_worst_abs_err": max(abs(e) for e in mem_err),
               "speed_median_abs_err": statistics.median(abs(e) for e in tps_err),
               "speed_worst_abs_err": max(abs(e) for e in tps_err)}  # fmt: skip
    # what would fit: activation factor per precision/technique, utilisation by width
    fits = {}
    for key in ("fp32", "bf16", "bf16+ckpt", "bf16+compile"):
        sel = [r for r in rows if _key(r["technique"]) == key]
        if sel:
            act = [(r["measured_peak"] - r["static"]) / max(1, r["predicted_peak"] - r["static"]) for r in sel]
            fits[f"dynamic_factor[{key}]"] = statistics.median(act)
    ratio = [r["measured_tps"] / r["predicted_tps"] for r in rows if r["technique"]["precision"] == "bf16"]
    if ratio:
        fits["bf16_mfu_scale"] = statistics.median(ratio)
    print("\n" + json.dumps({"summary": summary, "suggested": fits}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary, "suggested": fits,
                                              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "git": git_revision(), "grid": args.grid}, indent=2))  # fmt: skip
    return 0 if math.isfinite(summary["memory_median_abs_err"]) else 1


def _key(t: dict) -> str:
    return t["precision"] + ("+ckpt" if t["ckpt"] else "") + ("+compile" if t["compile"] else "")


if __name__ == "__main__":
    sys.exit(main())
