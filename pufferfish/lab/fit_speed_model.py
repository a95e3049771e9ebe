"""Re-predict calibration measurements with the committed memory and speed models; refit the speed constants.

    python -m pufferfish.lab.fit_speed_model --fit fit.json --check check.json --predates fit.json   # committed models' errors
    python -m pufferfish.lab.fit_speed_model --fit fit.json --check check.json --predates fit.json --refit
    python -m pufferfish.lab.fit_speed_model --fit fit.json --check check.json check2.json --predates fit.json
    python -m pufferfish.lab.fit_speed_model --fit fit.json check.json check2.json --predates fit.json --refit   # the committed fit
    python -m pufferfish.lab.fit_speed_model --bench bench124.json bench350.json ...   # bench_throughput rows, held out too
    python -m pufferfish.lab.fit_speed_model --count-ops   # ops an MoE / checkpointed block launches per dense block's

Inputs are the JSON of pufferfish.lab.calibrate (rows: model fields, batch, technique, measured peak and
tokens/s) and of pufferfish.lab.bench_throughput. Every row is re-predicted through the Shape the resolver
builds (calibrate.shape_of) at the profile's peak and mfu, so the errors are those a plan would have. `--refit`
fits the fitted constants of the speed model (SpeedConstants in pufferfish/resolver/speed.py) on the --fit rows
only (least squares of the log step time, Nelder-Mead) and prints the errors again with them: --check and
--bench stay held out. Several --fit files are fitted together (their rows show as fit:GRID).
`--predates FILE` marks a file measured before two code paths changed (58cac20: MoE experts run grouped
GEMMs in bf16, not a loop; 03a5d1b: fp32 GQA repeats K/V for the efficient kernel, not math attention):
its MoE and fp32 GQA rows are shown but neither fitted nor counted.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from pufferfish.model import ModelConfig
from pufferfish.resolver import Shape, predict_peak_bytes, speed
from pufferfish.resolver.hardware import load_profile, profile_peak_flops
from pufferfish.resolver.speed import SpeedConstants

from .bench import Technique
from .calibrate import shape_of

FIELDS = set(ModelConfig.__dataclass_fields__)
# the constants --refit fits: (SpeedConstants field, key in a dict field or None); eager_gpu_factor is measured
# by bench_throughput (an eager and a compiled GPU-bound step) and printed as it stands
FITTED = [("half_share_dims", None), ("host_step_s", None), ("host_layer_s", "eager"),
          ("host_layer_s", "compiled"), ("checkpoint_host_factor", None), ("moe_layer_launches", None)]  # fmt: skip


@dataclass
class Row:
    source: str  # fit (fit:GRID, several --fit files) | a held-out grid's name (check, check2) | bench
    shape: Shape
    technique: Technique
    measured_step_s: float
    measured_peak: int | None  # bench_throughput rows carry only the speed
    skip: str = ""  # why the row is shown but not counted
    note: str = ""  # a caveat that does not exclude it

    @property
    def label(self) -> str:
        s, t = self.shape, self.technique
        tech = (t.precision + ("+ckpt" if t.ckpt else "") + (f"+compile({t.compile})" if t.compile else "")
                + ("+chunked" if t.chunked else "") + ("" if t.fused else " (foreach AdamW)"))  # fmt: skip
        return (f"{s.num_layers:2d} x {s.num_dims:4d} kv {s.num_kv_heads:2d} {s.micro_batch:3d} x {s.seq_len:4d} "
                f"{tech:40s}{' MoE' if s.moe_layers else '    '}")  # fmt: skip


def load_calibrate(path: str, source: str | None, predates: bool) -> list[Row]:
    """Rows of a calibrate JSON; source None: the grid it records (the file's name before it recorded one)."""
    data = json.loads(Path(path).read_text())
    source = source or data.get("grid") or Path(path).stem
    rows, compiled_before = [], False
    for r in data["rows"]:
        t = Technique(**r["technique"])
        mc = ModelConfig(**{k: v for k, v in r.items() if k in FIELDS})
        s = shape_of(mc, r["batch"], t)
        skip = note = ""
        if predates and s.moe_layers:
            skip = "measured with the expert loop (before 58cac20)"
        elif predates and t.precision == "fp32" and mc.num_kv_heads < mc.num_heads:
            skip = "fp32 GQA measured with math attention (before 03a5d1b)"
        if t.compile and "git" not in data:  # calibrate before each shape compiled afresh
            note = "dynamic-shape compile" if compiled_before else ""
            compiled_before = True
        rows.append(Row(source, s, t, r["batch"] * mc.seq_len / r["measured_tps"], r["measured_peak"], skip, note))
    return rows


def load_bench(path: str, predates: bool) -> list[Row]:
    from .bench_throughput import TECHNIQUES

    data = json.loads(Path(path).read_text())
    rows = []
    for r in data["rows"]:
        t = TECHNIQUES.get(r["name"].removeprefix("pufferfish "))
        if t is None or t.compile == "blocks" or "tokens_per_s" not in r:  # the peer, or no Shape for it
            continue
        mc = ModelConfig(**data["shape"], seq_len=data["seq"])
        s = shape_of(mc, data["batch"], t)
        skip = "fp32 GQA measured with math attention (before 03a5d1b)" if (
            predates and t.precision == "fp32" and mc.num_kv_heads < mc.num_heads) else ""  # fmt: skip
        rows.append(Row("bench", s, t, data["batch"] * data["seq"] / r["tokens_per_s"], None, skip))
    return rows


@functools.cache
def peak_and_mfu(precision: str, profile: str = "h200") -> tuple[float, float]:
    """As the resolver passes them (the planner gives no bandwidth yet: the H200's ridge)."""
    prof = load_profile(profile)
    return profile_peak_flops(prof, precision), float(prof.mfu)


def predicted_step_s(s: Shape, k: SpeedConstants) -> float:
    return speed.step_seconds(s, *peak_and_mfu(s.precision), on_gpu=True, constants=k)


def bound(s: Shape, k: SpeedConstants) -> str:
    return "gpu" if speed.gpu_seconds(s, *peak_and_mfu(s.precision), constants=k) >= speed.host_seconds(s, k) \
        else "host"  # fmt: skip


def speed_err(r: Row, k: SpeedConstants) -> float:
    """predicted / measured tokens/s - 1 (calibrate's sign: negative = the model is too slow)."""
    return r.measured_step_s / predicted_step_s(r.shape, k) - 1


def memory_err(r: Row) -> float | None:
    return None if r.measured_peak is None else predict_peak_bytes(r.shape).total / r.measured_peak - 1


def stats(errs: list[float]) -> str:
    errs = [abs(e) for e in errs if e is not None]
    if not errs:
        return "no rows"
    return f"median {statistics.median(errs):5.1%}, worst {max(errs):5.1%} ({len(errs)} rows)"


def print_table(rows: list[Row], k: SpeedConstants) -> None:
    print("| set | shape | measured GiB | predicted GiB | err | measured tok/s | predicted tok/s | err | bound | note |")
    print("|" + "---|" * 10)
    for r in rows:
        me = memory_err(r)
        mem = (f"{r.measured_peak / 2**30:.2f} | {predict_peak_bytes(r.shape).total / 2**30:.2f} | {me:+.0%}"
               if me is not None else "| |")  # fmt: skip
        tps = r.shape.micro_batch * r.shape.seq_len
        print(f"| {r.source} | {r.label} | {mem} | {tps / r.measured_step_s:,.0f} | "
              f"{tps / predicted_step_s(r.shape, k):,.0f} | {speed_err(r, k):+.0%} | {bound(r.shape, k)} | "
              f"{r.skip or r.note} |")  # fmt: skip


def summarize(rows: list[Row], k: SpeedConstants) -> None:
    counted = [r for r in rows if not r.skip]
    by = {src: [r for r in counted if r.source == src] for src in dict.fromkeys(r.source for r in counted)}
    grids = [src for src in by if src != "bench"]
    role = {src: f"{src} grid (held out)" for src in grids} | {
        src: f"{src.removeprefix('fit:')} grid (fitted on it)" for src in grids if src.startswith("fit:")} | {
        "fit": "fit grid (the constants were fitted on it)", "bench": "bench_throughput rows (held out)"}  # fmt: skip
    together = f"{' and '.join(g.removeprefix('fit:') for g in grids)} grids together"
    print()
    for src, sel in by.items():
        print(f"speed   {role[src]:45s} {stats([speed_err(r, k) for r in sel])}")
    if len(grids) > 1:
        print(f"speed   {together:45s} {stats([speed_err(r, k) for g in grids for r in by[g]])}")
    for src in grids:
        print(f"memory  {role[src]:45s} {stats([memory_err(r) for r in by[src]])}")
    if len(grids) > 1:
        print(f"memory  {together:45s} {stats([memory_err(r) for g in grids for r in by[g]])}")
    skipped = [r for r in rows if r.skip]
    if skipped:
        print(f"({len(skipped)} rows shown, not counted: {', '.join(sorted({r.skip for r in skipped}))})")


def value_of(k: SpeedConstants, name: str, key: str | None) -> float:
    value = getattr(k, name)
    return value[key] if key else value


def with_value(k: SpeedConstants, name: str, key: str | None, value: float) -> SpeedConstants:
    return replace(k, **{name: {**getattr(k, name), key: value} if key else value})


def nelder_mead(f, x0: list[float], steps: int = 4000, scale: float = 0.3) -> list[float]:
    """Minimise f over R^n from x0 (the speed model's max() has kinks: no gradients needed)."""
    n = len(x0)
    simplex = [list(x0)] + [[x + (scale if i == j else 0.0) for j, x in enumerate(x0)] for i in range(n)]
    values = [f(x) for x in simplex]
    for _ in range(steps):
        order = sorted(range(n + 1), key=values.__getitem__)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        centre = [sum(p[j] for p in simplex[:-1]) / n for j in range(n)]
        worst = simplex[-1]
        reflect = [c + (c - w) for c, w in zip(centre, worst)]
        fr = f(reflect)
        if fr < values[0]:
            expand = [c + 2 * (c - w) for c, w in zip(centre, worst)]
            fe = f(expand)
            simplex[-1], values[-1] = (expand, fe) if fe < fr else (reflect, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflect, fr
        else:
            contract = [c + 0.5 * (w - c) for c, w in zip(centre, worst)]
            fc = f(contract)
            if fc < values[-1]:
                simplex[-1], values[-1] = contract, fc
            else:  # shrink towards the best point
                simplex = [simplex[0]] + [[b + 0.5 * (p - b) for b, p in zip(simplex[0], q)] for q in simplex[1:]]
                values = [values[0]] + [f(q) for q in simplex[1:]]
        if max(values) - min(values) < 1e-12:
            break
    return simplex[min(range(n + 1), key=values.__getitem__)]


def refit(rows: list[Row]) -> SpeedConstants:
    """The speed model's fitted constants at their least-squares values, the others as committed."""
    fit_rows = [r for r in rows if r.source.split(":")[0] == "fit" and not r.skip]

    def constants(logs: list[float]) -> SpeedConstants:
        k = speed.CONSTANTS
        for (name, key), v in zip(FITTED, logs):
            k = with_value(k, name, key, math.exp(v))
        return k

    def loss(logs: list[float]) -> float:
        k = constants(logs)
        return sum(math.log(predicted_step_s(r.shape, k) / r.measured_step_s) ** 2 for r in fit_rows)

    best = [math.log(value_of(speed.CONSTANTS, name, key)) for name, key in FITTED]
    for scale in (0.3, 0.1, 0.03):  # restarts: Nelder-Mead stalls on the max()'s kinks
        best = nelder_mead(loss, best, scale=scale)
    print(f"refit on {len(fit_rows)} fit-grid rows (log step time, least squares):")
    for (name, key), v in zip(FITTED, best):
        committed = value_of(speed.CONSTANTS, name, key)
        print(f"  {name}{f'[{key!r}]' if key else ''} = {math.exp(v):.4g}   (committed {committed:.4g})")
    print(f"  not fitted: eager_gpu_factor = {speed.CONSTANTS.eager_gpu_factor}")
    return constants(best)


def eager_gpu_factor(rows: list[Row], k: SpeedConstants) -> None:
    """Eager / compiled step time where the bench measured both at one shape, each predicted GPU-bound."""
    bench = [r for r in rows if r.source == "bench" and not r.skip and r.shape.precision == "bf16"
             and not r.shape.grad_ckpt and not r.shape.chunked_loss]  # fmt: skip
    for e in (r for r in bench if not r.shape.compiled and r.technique.fused):
        for c in (r for r in bench if r.shape.compiled and replace(r.shape, compiled=False) == e.shape):
            print(f"bench {e.label.strip()}: eager / compiled step time {e.measured_step_s / c.measured_step_s:.2f} "
                  f"(eager_gpu_factor {k.eager_gpu_factor}; the model calls them {bound(e.shape, k)}- and "
                  f"{bound(c.shape, k)}-bound)")  # fmt: skip


def count_ops() -> None:
    """aten ops one block dispatches in forward+backward under bf16 autocast (each is a kernel launch on a GPU)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from pufferfish.model import build_model
    from pufferfish.optim import build_optimizer
    from pufferfish.resolver.plan import OPTIMIZER_DEFAULTS
    from pufferfish.step import StepSpec, TrainStep
    from pufferfish.transforms import apply_speed_transforms

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    def ops(layers: int, moe: bool, ckpt: bool) -> int:
        extra = dict(use_moe=True, moe_num_experts=8, moe_active_experts=2) if moe else {}
        cfg = ModelConfig(num_layers=layers, num_dims=128, num_heads=4, num_kv_heads=1, vocab_size=512, seq_len=64,
                          **extra)  # fmt: skip
        model = build_model(cfg, "cpu")
        apply_speed_transforms(model, ckpt, False, "cpu")
        for m in model.modules():
            if hasattr(m, "expert_impl"):
                m.expert_impl = "grouped_mm"  # the GPU's path (auto picks the loop on a CPU)
        x = torch.randint(0, 512, (2, 64))
        Count.n = 0
        step = TrainStep(model, build_optimizer(model, OPTIMIZER_DEFAULTS, 1e-4, False),
                         StepSpec(precision="bf16", chunked_loss=False), "cpu")  # fmt: skip
        with Count():
            step.forward_backward(lambda: (x, x))  # the training step's forward and backward, not its update
        return Count.n

    per_block = {(moe, ck): (ops(4, moe, ck) - ops(2, moe, ck)) / 2 for moe in (False, True) for ck in (False, True)}
    dense = per_block[(False, False)]
    print(f"ops per block, forward+backward: dense {dense:.0f}, MoE {per_block[(True, False)]:.0f} "
          f"(x{per_block[(True, False)] / dense:.2f}; moe_layer_launches, fitted on host time, "
          f"{speed.CONSTANTS.moe_layer_launches}), checkpointed {per_block[(False, True)]:.0f} "
          f"(x{per_block[(False, True)] / dense:.2f}; checkpoint_host_factor {speed.CONSTANTS.checkpoint_host_factor} "
          f"adds checkpoint's Python hooks)")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fit", nargs="*", default=[], help="calibrate JSON the constants are fitted on")
    p.add_argument("--check", nargs="*", default=[], help="calibrate JSON held out")
    p.add_argument("--bench", nargs="*", default=[], help="bench_throughput JSON held out (speed only)")
    p.add_argument("--predates", nargs="*", default=[], help="files measured before 58cac20 and 03a5d1b")
    p.add_argument("--refit", action="store_true", help="fit the speed model's constants on --fit, then report")
    p.add_argument("--count-ops", action="store_true", help="count the ops of an MoE and a checkpointed block")
    args = p.parse_args(argv)
    if args.count_ops:
        count_ops()
    old = {str(Path(f).resolve()) for f in args.predates}
    rows = []
    for f in args.fit:
        grid = json.loads(Path(f).read_text()).get("grid") or Path(f).stem
        source = "fit" if len(args.fit) == 1 else f"fit:{grid}"
        rows += load_calibrate(f, source, str(Path(f).resolve()) in old)
    for f in args.check:
        rows += load_calibrate(f, None, str(Path(f).resolve()) in old)
    for f in args.bench:
        rows += load_bench(f, str(Path(f).resolve()) in old)
    if not rows:
        return 0 if args.count_ops else p.error("give --fit, --check or --bench files (or --count-ops)")
    k = refit(rows) if args.refit else speed.CONSTANTS
    print_table(rows, k)
    summarize(rows, k)
    eager_gpu_factor(rows, k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
