"""Training throughput of Pufferfish against transformers' LlamaForCausalLM, same device, same shape.

    python -m pufferfish.lab.bench_throughput                      # 124M-class shape, every speed technique
    python -m pufferfish.lab.bench_throughput --shape 350m --only all
    python -m pufferfish.lab.bench_throughput --device cpu --tiny  # a seconds-long smoke run (CI)

Tokens/s is the median over timed steps after warm-up (device synchronised around each step); MFU is
(6N + 12 L d T) x tokens/s over a peak, N the parameters (tied embedding once, no position table),
against both the profile's datasheet peak and a bf16 matmul ceiling measured in this process.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

from pufferfish.model import ModelConfig
from pufferfish.step import use_tf32

from .bench import Technique, make_train_step, sync, time_steps

SHAPES = {  # the peers' shapes in ../shared/BASELINES.md
    "124m": dict(num_layers=12, num_dims=768, num_heads=12, num_kv_heads=4, ffn_dims=2048, vocab_size=32000),
    "350m": dict(num_layers=24, num_dims=1024, num_heads=16, num_kv_heads=4, ffn_dims=2816, vocab_size=32000),
    "tiny": dict(num_layers=2, num_dims=64, num_heads=4, num_kv_heads=2, ffn_dims=192, vocab_size=512),
}
DATASHEET_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
# each technique on top of the one before: the table shows what each one adds
TECHNIQUES = {
    "baseline": Technique("fp32"),
    "bf16": Technique("bf16"),
    "bf16+fused": Technique("bf16", fused=True),
    "bf16+fused+compile(blocks)": Technique("bf16", fused=True, compile="blocks"),
    "bf16+fused+compile(step)": Technique("bf16", fused=True, compile="step"),
    "bf16+fused+compile(step)+cudnn-attention": Technique("bf16", fused=True, compile="step", attention="cudnn"),
    "bf16+fused+compile(step)+chunked": Technique("bf16", fused=True, compile="step", chunked=True),
    "lean (+checkpointing)": Technique("bf16", fused=True, compile="step", chunked=True, ckpt=True),
}
# measured only when named in --only: minutes of autotuning, and not (yet) an option of the training loop
TRIALS = {
    "bf16+fused+compile(step, max-autotune)": Technique("bf16", fused=True, compile="step",
                                                        compile_mode="max-autotune-no-cudagraphs"),
    # CUDA graphs: the compiled forward and backward replayed as graphs, no per-kernel launches from Python
    "bf16+fused+compile(step, CUDA graphs)": Technique("bf16", fused=True, compile="step", compile_mode="reduce-overhead"),
}
# kernel families by name, for --profile (CUDA kernel names of cuBLAS/CUTLASS, SDPA's flash and cuDNN
# kernels, inductor's generated Triton kernels and fused AdamW)
KERNEL_FAMILIES = [  # first match wins: flash kernels' names carry cutlass types, so attention goes first
    ("attention", re.compile(r"flash|fmha|attention|sdpa|cudnn", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|wgmma", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("fused (Triton)", re.compile(r"^triton|triton_", re.I)),
]


def shown(value: float, spec: str, unit: str = "") -> str:
    """A figure for the table; NaN (no GPU peak or GPU memory on CPU) reads as what it is."""
    return "n/a on CPU" if math.isnan(value) else f"{value:{spec}}{unit}"


def matmul_ceiling(device: str, n: int = 8192, reps: int = 20) -> float:
    if not device.startswith("cuda"):
        return float("nan")
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def transformers_step(shape: dict, seq: int, batch: int, device: str, compiled: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(hidden_size=shape["num_dims"], intermediate_size=shape["ffn_dims"],
                     num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
                     num_key_value_heads=shape["num_kv_heads"], vocab_size=shape["vocab_size"],
                     max_position_embeddings=seq, tie_word_embeddings=True, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf).to(device)
    fused = device.startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
    x = torch.randint(0, shape["vocab_size"], (batch, seq), device=device)
    fwd = torch.compile(model) if compiled and device != "cpu" else model

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=device != "cpu"):
            loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters())


def measure(name, build, shape, seq, batch, device, args, peaks):
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        step, n = build()
        timing = time_steps(step, device, args.warmup, args.steps)
    except torch.cuda.OutOfMemoryError:
        return {"name": name, "error": "out of memory"}
    except RuntimeError as e:  # e.g. no SDPA kernel of the asked kind for this shape: the row says so
        print(f"# {name}: {str(e).splitlines()[0][:200]}", flush=True)
        return {"name": name, "error": str(e).splitlines()[0][:120]}
    tps, warm = batch * seq / timing["step_s"], timing["warmup_s"]
    flops = (6 * n + 12 * shape["num_layers"] * shape["num_dims"] * seq) * tps
    row = {"name": name, "tokens_per_s": tps, "params": n, "warmup_s": warm,
           "mfu_datasheet": flops / peaks["datasheet"], "mfu_measured": flops / peaks["measured"],
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")}  # fmt: skip
    if args.profile and device.startswith("cuda"):
        try:
            row["profile"] = kernel_profile(step, device)
        except Exception as e:  # noqa: BLE001 (a profiler failure must not lose the row)
            print(f"# {name}: profile failed: {e!r}"[:200], flush=True)
    print(json.dumps(row), flush=True)
    return row


def kernel_profile(step, device: str, steps: int = 3) -> list[tuple[str, float, int]]:
    """GPU time per step by kernel family: (family, milliseconds per step, kernels per step). Also prints
    where the host spends the step (the operators with the most self CPU time) and torch.compile's counters
    (graph breaks, graphs, CUDA-graph skips): a step whose GPU time is below its wall time waits on the host."""
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile

    step()
    sync(device)
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync(device)
    wall_ms = (time.perf_counter() - t) / steps * 1e3
    ops = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:14]
    print(f"# host, {wall_ms:.1f} ms per profiled step; operators by self CPU time (ms per step, calls per step):")
    for a in ops:
        print(f"#   {a.self_cpu_time_total / steps / 1e3:7.2f} ms {a.count // steps:5d}x  {a.key[:90]}")
    print("# torch.compile counters: " + json.dumps({k: dict(v) for k, v in counters.items()
                                                    if k in ("graph_break", "stats", "inductor")})[:1500], flush=True)  # fmt: skip
    time_us, count = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        family = next((f for f, pattern in KERNEL_FAMILIES if pattern.search(e.name)), "other")
        time_us[family] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        count[family] += 1
    return sorted(((f, t / steps / 1e3, count[f] // steps) for f, t in time_us.items()), key=lambda r: -r[1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="124m", choices=sorted(SHAPES))
    p.add_argument("--tiny", action="store_true", help="the tiny shape, 2 x 64 tokens: a smoke run")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--only", nargs="*", help="techniques to run (default: all of them)")
    p.add_argument("--no-peer", action="store_true", help="skip transformers")
    p.add_argument("--profile", action="store_true", help="also print each technique's GPU time by kernel family")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    if args.device == "cpu" and not args.tiny:
        print("# no GPU: running the tiny shape (--tiny); throughput figures need a GPU", flush=True)
        args.tiny = True
    if args.tiny:
        args.shape, args.batch, args.seq, args.warmup, args.steps = "tiny", 2, 64, 1, 3
    device, shape = args.device, SHAPES[args.shape]
    if device.startswith("cuda"):
        use_tf32(device, True)
        name = torch.cuda.get_device_name()
        datasheet = next((v for k, v in DATASHEET_BF16.items() if k in name), float("nan"))
    else:
        name, datasheet = "cpu", float("nan")
    peaks = {"datasheet": datasheet, "measured": matmul_ceiling(device)}
    print(f"# {name}, torch {torch.__version__}, shape {args.shape} {shape}, batch {args.batch} x {args.seq}; "
          f"bf16 matmul ceiling {shown(peaks['measured'] / 1e12, '.1f', ' TFLOP/s')}", flush=True)  # fmt: skip
    rows = []
    wanted = args.only or list(TECHNIQUES)  # a trial runs only when named
    for tname, t in {**TECHNIQUES, **TRIALS}.items():
        if tname not in wanted:
            continue
        if device == "cpu" and (t.precision == "bf16" and not args.tiny or t.attention == "cudnn"):
            continue

        def build(t=t):
            return make_train_step(ModelConfig(seq_len=args.seq, **shape), args.batch, device, t)

        rows.append(measure(f"pufferfish {tname}", build, shape, args.seq, args.batch, device, args, peaks))
    if not args.no_peer:
        for compiled in (False, True):
            rows.append(measure(f"transformers Llama {'compile' if compiled else 'eager'}",
                                lambda c=compiled: transformers_step(shape, args.seq, args.batch, device, c),
                                shape, args.seq, args.batch, device, args, peaks))  # fmt: skip
    print("\n| system | tokens/s | MFU (datasheet) | MFU (measured ceiling) | peak GiB | warm-up s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | {r['error']} | | | | |")
            continue
        print(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {shown(r['mfu_datasheet'], '.3f')} | "
              f"{shown(r['mfu_measured'], '.3f')} | {shown(r['peak_gib'], '.2f')} | {r['warmup_s']:.1f} |")  # fmt: skip
    for tname, families in ((r["name"], r["profile"]) for r in rows if "profile" in r):
        total = sum(ms for _, ms, _ in families)
        print(f"\n{tname}: GPU time per step by kernel family ({total:.2f} ms in all)\n"
              "| family | ms per step | share | kernels per step |\n|---|---|---|---|")  # fmt: skip
        for family, ms, n in families:
            print(f"| {family} | {ms:.2f} | {ms / total:.0%} | {n} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": name, "torch": torch.__version__, "peaks": peaks,
                                              "shape": shape, "batch": args.batch, "seq": args.seq, "rows": rows},
                                             indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
