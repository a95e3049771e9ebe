"""Predicted against measured peak memory and tokens/s over a grid of shapes (the resolver's models).

    python -m pufferfish.lab.calibrate --grid fit --out fit.json      # measure; print the constants that fit
    python -m pufferfish.lab.calibrate --grid check --out check.json  # a different grid: the errors we report
    python -m pufferfish.lab.calibrate --grid check2 --out check2.json  # a third, weighted to what plans use
    python -m pufferfish.lab.calibrate --grid check2 --list            # the grid and its predictions, no GPU
    python -m pufferfish.lab.calibrate --grid check3 --out check3.json  # a fourth, held out from the refits

Memory is `torch.cuda.max_memory_allocated` over two steps from a clean start; speed is the median of
timed steps after warm-up. Every shape compiles afresh (static shapes, as a run compiles once): reusing
dynamo's cache would recompile later shapes with dynamic sizes. Needs a CUDA device (the CPU profile is
calibrated at run time instead). `python -m pufferfish.lab.fit_speed_model` re-predicts and refits from the JSON.
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

from pufferfish.model import ModelConfig
from pufferfish.resolver import Shape, kv_heads_for, memory_shape, predict_peak_bytes, predict_tokens_per_s
from pufferfish.resolver.hardware import GIB, Hardware, load_profile, profile_peak_flops
from pufferfish.runlog import git_revision
from pufferfish.step import use_tf32

from .bench import Technique, make_train_step, peak_bytes_of_two_steps, time_steps


def grid(name: str) -> list[tuple[dict, int, Technique]]:
    """(model fields, micro-batch, technique): depth, width, batch, length, precision, ckpt, GQA, MoE, compile."""
    fp32, bf16 = Technique("fp32", fused=True), Technique("bf16", fused=True)
    ck, comp = replace(bf16, ckpt=True), replace(bf16, compile="step", chunked=True)
    if name in HELD_OUT:
        return HELD_OUT[name]()
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


def plan_techniques() -> dict[str, Technique]:
    """The steps plans run: `optimizations=all` (bf16, fused AdamW, forward+loss compiled), `lean` (+ chunked
    loss and checkpointing), and eager bf16, bf16 with checkpointing and fp32."""
    bf16 = Technique("bf16", fused=True)
    comp = replace(bf16, compile="step")
    return {"bf16": bf16, "all": comp, "lean": replace(comp, ckpt=True, chunked=True),
            "ckpt": replace(bf16, ckpt=True), "fp32": Technique("fp32", fused=True)}  # fmt: skip


def gqa_rows(rows) -> list[tuple[dict, int, Technique]]:
    """(layers, dims, batch, seq, technique, vocabulary) rows as grid rows: head_dim 64, kv heads as
    `attention=gqa` picks them."""
    out = []
    for L, d, B, T, t, V in rows:
        heads = max(1, d // 64)
        kv = kv_heads_for(heads, SimpleNamespace(heads_per_kv_head=4))
        out.append((dict(num_layers=L, num_dims=d, num_heads=heads, num_kv_heads=kv, vocab_size=V, seq_len=T), B, t))
    return out


def check2_grid() -> list[tuple[dict, int, Technique]]:
    """A third grid, none of its shapes in the other two, weighted to what the planner runs on Ampere/Hopper:
    bf16 with the whole step compiled (`optimizations=all`), some with checkpointing (`lean`); a few eager
    bf16 and bf16+checkpointing steps, two fp32 and two MoE. GQA as `attention=gqa` gives it. Compilation
    dominates the time (~2.5 s per compiled layer on the H200 host: ~3-4 minutes), so ten shapes compile."""
    t = plan_techniques()
    bf16, comp, lean, ck, fp32 = t["bf16"], t["all"], t["lean"], t["ckpt"], t["fp32"]
    rows = [  # layers, dims, batch, seq, technique
        (2, 1280, 8, 2048, comp), (3, 256, 64, 256, comp), (5, 640, 32, 512, comp), (8, 1152, 16, 1024, comp),
        (12, 384, 64, 256, comp), (16, 768, 8, 1024, comp),
        (4, 1024, 4, 2048, lean), (6, 512, 32, 512, lean), (14, 896, 16, 1024, lean),
        (3, 1280, 16, 1024, bf16), (7, 896, 2, 2048, bf16), (10, 256, 32, 512, bf16), (18, 640, 4, 1024, bf16),
        (26, 512, 64, 256, bf16), (30, 640, 8, 512, bf16),
        (2, 1024, 64, 256, ck), (5, 1152, 8, 1024, ck), (9, 768, 2, 2048, ck), (22, 384, 16, 512, ck),
        (28, 1024, 8, 512, ck),
        (16, 1280, 16, 512, fp32), (24, 256, 16, 1024, fp32),
    ]  # fmt: skip
    out = gqa_rows([(L, d, B, T, tech, 32000) for L, d, B, T, tech in rows])
    moe = dict(use_moe=True, moe_num_experts=8, moe_active_experts=2)
    out += [(dict(num_layers=4, num_dims=640, num_heads=10, num_kv_heads=2, vocab_size=32000, seq_len=1024, **moe), 16, comp),
            (dict(num_layers=10, num_dims=512, num_heads=8, num_kv_heads=2, vocab_size=32000, seq_len=512, **moe), 16, bf16)]  # fmt: skip
    return out


def check3_grid() -> list[tuple[dict, int, Technique]]:
    """A fourth grid, measured after the memory and speed models were refitted on the other three
    (2026-11-29): none of its shapes is in them, and it varies the vocabulary (8,192 as the default corpus's
    tokenizer, 32,000, 50,257) since the compiled step's logits are much of its memory. Weighted like
    check2 to what plans run (compiled, lean, compiled with checkpointing), plus eager bf16, checkpointing,
    fp16 (Turing/Pascal plans), fp32 and MoE. About 80 compiled layers: ~3.5 minutes of compilation."""
    t = plan_techniques()
    bf16, comp, lean, ck, fp32 = t["bf16"], t["all"], t["lean"], t["ckpt"], t["fp32"]
    fp16, comp_ck = Technique("fp16", fused=True), replace(comp, ckpt=True)  # `all` where a plan needs checkpointing
    rows = [  # layers, dims, batch, seq, technique, vocabulary
        (1, 64, 256, 512, comp, 8192), (4, 512, 32, 1024, comp, 8192), (10, 768, 24, 1024, comp, 8192),
        (20, 640, 16, 1024, comp, 8192), (6, 896, 16, 512, comp, 50257), (14, 512, 48, 512, comp, 32000),
        (10, 896, 16, 1024, comp_ck, 8192), (8, 1024, 16, 1024, lean, 8192), (6, 640, 48, 512, lean, 32000),
        (4, 768, 16, 1024, bf16, 8192), (12, 640, 8, 2048, bf16, 32000), (20, 384, 32, 512, bf16, 8192),
        (16, 896, 8, 1024, ck, 8192), (6, 1280, 16, 512, ck, 32000), (10, 512, 16, 1024, fp16, 8192),
        (8, 768, 8, 1024, fp32, 8192), (3, 384, 32, 512, fp32, 50257),
    ]  # fmt: skip
    out = gqa_rows(rows)
    moe = dict(use_moe=True, moe_num_experts=8, moe_active_experts=2)
    out += [(dict(num_layers=4, num_dims=512, num_heads=8, num_kv_heads=2, vocab_size=8192, seq_len=1024, **moe), 16, comp),
            (dict(num_layers=8, num_dims=640, num_heads=10, num_kv_heads=2, vocab_size=32000, seq_len=1024, **moe), 8, bf16)]  # fmt: skip
    return out


HELD_OUT = {"check2": check2_grid, "check3": check3_grid}  # grids measured after fits, as held-out checks


def shape_of(mc: ModelConfig, batch: int, t: Technique, profile: str = "h200") -> Shape:
    """The Shape the resolver builds for this model, micro-batch and technique on the profile's GPU, for a
    step of one micro-batch (as make_train_step runs it: no gradients during the forward)."""
    prof = load_profile(profile)
    hw = Hardware(profile, "cuda:0", profile, int(float(prof.vram_gb) * GIB), t.precision,
                  profile_peak_flops(prof, t.precision), float(prof.mfu), False, [], float(prof.compute_capability))  # fmt: skip
    cfg = SimpleNamespace(attention=SimpleNamespace(sdpa_backend="auto"),
                          optimizations=SimpleNamespace(chunked_loss=t.chunked, loss_chunk_tokens=4096,
                                                        compile=bool(t.compile)))  # fmt: skip
    return replace(memory_shape(mc.to_dict(), cfg, hw, batch, t.ckpt), grads_in_forward=False)  # one micro-batch a step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=["fit", "check", *HELD_OUT], default="check")
    p.add_argument("--profile", default="h200")
    p.add_argument("--out")
    p.add_argument("--list", action="store_true", help="print the grid with predicted GiB and tokens/s; run nothing")
    p.add_argument("--shape", help="one row instead of a grid: LAYERSxDIMS:BATCHxSEQ[:TECHNIQUE[:VOCAB]], e.g. "
                   f"12x512:512x512:all:8192 (techniques: {', '.join(plan_techniques())}; GQA as attention=gqa)")
    p.add_argument("--only", choices=list(SUBSETS), help="only these rows, to re-measure them after a change to "
                   "that step (e.g. compiled after ed2f2e9's graph-break fix)")
    args = p.parse_args()
    device = "cuda"
    use_tf32(device, True)
    prof = load_profile(args.profile)
    if args.list:
        return list_grid(args.grid, args.profile, args.only, args.shape)
    rows = []
    for fields, batch, t in selected(args.grid, args.only, args.shape):
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
        if args.out:  # so far: a call cut short keeps what it measured
            Path(args.out).write_text(json.dumps({"rows": rows, "partial": True, "grid": args.grid}, indent=2))
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


SUBSETS = {"compiled": lambda t: bool(t.compile), "chunked": lambda t: t.chunked}


def selected(name: str, only: str | None, shape: str | None = None) -> list[tuple[dict, int, Technique]]:
    rows = parse_shape(shape) if shape else grid(name)
    return [row for row in rows if only is None or SUBSETS[only](row[2])]


def parse_shape(text: str) -> list[tuple[dict, int, Technique]]:
    """`--shape` as one grid row: LAYERSxDIMS:BATCHxSEQ[:TECHNIQUE[:VOCAB]] (default technique all, vocab 8192)."""
    parts = text.split(":")
    techniques = plan_techniques()
    try:
        (L, d), (B, T) = (map(int, parts[0].split("x")), map(int, parts[1].split("x")))
        technique, vocab = (parts[2:3] or ["all"])[0], int((parts[3:4] or ["8192"])[0])
        if technique not in techniques or len(parts) > 4:
            raise ValueError
    except (ValueError, IndexError):
        raise SystemExit(f"--shape {text!r}: expected LAYERSxDIMS:BATCHxSEQ[:TECHNIQUE[:VOCAB]], e.g. "
                         f"12x512:512x512:all:8192, TECHNIQUE one of {', '.join(techniques)}") from None  # fmt: skip
    return gqa_rows([(L, d, B, T, techniques[technique], vocab)])


def list_grid(name: str, profile: str, only: str | None = None, shape: str | None = None) -> int:
    prof = load_profile(profile)
    rows = selected(name, only, shape)
    print("| layers | dims | heads/kv | batch x seq | technique | MoE | predicted GiB | predicted tokens/s |")
    print("|" + "---|" * 8)
    largest = compiled_layers = 0
    for fields, batch, t in rows:
        s = shape_of(ModelConfig(**fields), batch, t, profile)
        gib = predict_peak_bytes(s).total / GIB
        tps = predict_tokens_per_s(s, profile_peak_flops(prof, t.precision), float(prof.mfu), True)
        largest, compiled_layers = max(largest, gib), compiled_layers + (s.num_layers if t.compile else 0)
        print(f"| {s.num_layers} | {s.num_dims} | {s.num_heads}/{s.num_kv_heads} | {batch} x {s.seq_len} | "
              f"{_key(asdict(t))} | {'8e top-2' if s.moe_layers else ''} | {gib:.2f} | {tps:,.0f} |")  # fmt: skip
    print(f"\n{len(rows)} shapes, largest {largest:.1f} GiB, {compiled_layers} compiled layers")
    return 0


def _key(t: dict) -> str:
    return t["precision"] + ("+ckpt" if t["ckpt"] else "") + ("+compile" if t["compile"] else "")


if __name__ == "__main__":
    sys.exit(main())
