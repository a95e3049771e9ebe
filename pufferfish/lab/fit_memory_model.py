"""Re-predict measured peak memory with the committed memory model; optionally refit its constants.

    python -m pufferfish.lab.fit_memory_model --grids fit_compiled.json ... --eager-only fit.json ... --rows
    python -m pufferfish.lab.fit_memory_model --grids ... --plans check_plans.json --refit   # refit the constants

The measurements and the exact command: docs/measurements/README.md.

--grids: pufferfish.lab.calibrate's JSON (measured_peak: max_memory_allocated over two steps); the first file named
fit.json has its MoE and fp32 GQA rows skipped (measured before 58cac20 / 03a5d1b, as fit_speed_model.py
--predates). --eager-only: grids whose compiled rows are left out (measured before ed2f2e9's graph-break fix;
re-measured with calibrate --only compiled). --plans: pufferfish.lab.check_plans's JSON: runs that finished
(ok / not memory-bound) must be predicted no more than ~2 % below their measured peak; OOM runs must be
predicted at or above the cap they hit. --refit grid-searches the eager factors (activation_calibration) for
the smallest worst error on the eager rows, then the compiled constants (compiled_*) for the smallest
worst error on the compiled rows, an under-prediction weighing 1.5x an over-prediction (a plan sized by an
under-prediction can run out of memory), within those plan bounds; each set is passed to the memory model
as a MemoryConstants (pufferfish/resolver/memory.py), which holds the committed ones. Offline, CPU, seconds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from pufferfish.model import ModelConfig
from pufferfish.resolver import predict_peak_bytes
from pufferfish.resolver.memory import CONSTANTS, MemoryConstants

from .bench import Technique
from .calibrate import shape_of

FIELDS = set(ModelConfig.__dataclass_fields__)


def category(s) -> str:
    c = "moe" if s.moe_layers else "compiled" if s.compiled else "eager " + s.precision
    return c + (" +ckpt" if s.grad_ckpt else "") + (" +chunked" if s.chunked_loss else "")


def grid_rows(path: str, eager_only: bool = False) -> list[dict]:
    name, predates = Path(path).stem, Path(path).name == "fit.json"
    out = []
    for r in json.loads(Path(path).read_text())["rows"]:
        t = Technique(**r["technique"])
        if eager_only and t.compile:
            continue
        mc = ModelConfig(**{k: v for k, v in r.items() if k in FIELDS})
        s = shape_of(mc, r["batch"], t)
        skip = predates and (s.moe_layers > 0 or (t.precision == "fp32" and mc.num_kv_heads < mc.num_heads))
        label = f"{s.num_layers}x{s.num_dims} kv {s.num_kv_heads}/{s.num_heads} {s.micro_batch}x{s.seq_len}"
        out.append(dict(src=name, shape=s, measured=r["measured_peak"], label=label, skip=skip))
    return out


def plan_rows(path: str) -> list[dict]:
    """Runs of check_plans, their Shapes rebuilt as the planner builds them, for the card they ran on (an
    H200: plan_check's assumed card), by the profile rules check_plans itself plans with (hardware_on)."""
    from pufferfish.api import compose_config
    from pufferfish.resolver import memory_shape, model_dict
    from pufferfish.resolver.hardware import CUDA_CONTEXT_BYTES, GIB, hardware_on

    from .plan_check.cards import ASSUMED_CARD_GIB

    total = int(ASSUMED_CARD_GIB * GIB)
    out = []
    for r in json.loads(Path(path).read_text())["rows"]:
        v = r.get("verdict", "")
        if not r.get("num_layers") or not (v in ("ok", "OOM") or v.startswith("not memory")):
            continue
        if v != "OOM" and not r.get("measured_peak_bytes"):
            continue
        # the optimizer the row ran (rows from before check_plans recorded it: AdamW's plans)
        cfg = compose_config([f"gpu={r['profile']}", f"mode={r['mode']}", f"optim.name={r.get('optimizer', 'adamw')}"])
        hw = hardware_on(cfg.gpu, cfg.optimizations, "cuda", "NVIDIA H200", total, total - CUDA_CONTEXT_BYTES)
        assert hw.precision == r["precision"], f"{r['profile']}: planned {hw.precision}, ran {r['precision']}"
        mc = model_dict(cfg, r["num_layers"], r["num_dims"], 8192, r["seq_len"])
        s = replace(memory_shape(mc, cfg, hw, r["micro_batch"], r["grad_ckpt"]), grads_in_forward=r.get("grad_accum", 2) > 1)
        bound = r["cap_bytes"] if v == "OOM" else r["measured_peak_bytes"]  # OOM: the cap is a lower bound
        out.append(dict(src="plans", shape=s, measured=bound, oom=v == "OOM", skip=False,
                        label=f"{r['profile']}/{r['mode']} {s.num_layers}x{s.num_dims} {s.micro_batch}x{s.seq_len}"))
    return out


def err(r: dict, k: MemoryConstants = CONSTANTS) -> float:
    return predict_peak_bytes(r["shape"], k).total / r["measured"] - 1


def summary(grids: list[dict], k: MemoryConstants) -> dict:
    counted = [r for r in grids if not r["skip"]]
    groups = {"all grids": counted}
    for key in ("src", "cat"):
        for r in counted:
            groups.setdefault(r["src"] if key == "src" else category(r["shape"]), []).append(r)
    return {name: (statistics.median(abs(err(r, k)) for r in v), max(abs(err(r, k)) for r in v), len(v))
            for name, v in groups.items()}  # fmt: skip


def plan_margin(plans: list[dict], k: MemoryConstants) -> tuple[float, float]:
    """(smallest predicted / measured - 1 of runs that finished, smallest predicted / cap - 1 of OOM runs)."""
    ran = [err(r, k) for r in plans if not r["oom"]] or [0.0]
    oom = [err(r, k) for r in plans if r["oom"]] or [0.0]
    return min(ran), min(oom)


def report(grids: list[dict], plans: list[dict], rows: bool, k: MemoryConstants = CONSTANTS) -> None:
    if rows:
        print("| set | shape | technique | measured GiB | predicted GiB | err |\n|---|---|---|---|---|---|")
        for r in grids + plans:
            p = predict_peak_bytes(r["shape"], k).total
            what = "cap (OOM)" if r.get("oom") else "skipped" if r["skip"] else ""
            print(f"| {r['src']} | {r['label']} | {category(r['shape'])} | {r['measured'] / 2**30:.2f} {what} | "
                  f"{p / 2**30:.2f} | {err(r, k):+.1%} |")  # fmt: skip
        print()
    print("| rows | median abs err | worst abs err | n |\n|---|---|---|---|")
    for name, (med, worst, n) in summary(grids, k).items():
        print(f"| {name} | {med:.1%} | {worst:.1%} | {n} |")
    if plans:
        ran, oom = plan_margin(plans, k)
        print(f"\nplan check: finished runs predicted {ran:+.1%} of measured at the least (>= -2 % wanted); "
              f"OOM runs predicted {oom:+.1%} of their cap at the least (>= 0 wanted)")


COMPILED = {  # the compiled constants --refit searches (MemoryConstants' fields), and the values it tries
    "compiled_layer_factor": [1.0 + 0.02 * i for i in range(21)],
    "compiled_moe_factor": [1.6, 1.8, 2.0, 2.2, 2.4],
    "compiled_logit_bytes": [1.75, 2, 2.25, 2.5],
    "compiled_unaligned_vocab_bytes": [0, 2, 3, 4],
    "compiled_ckpt_input_factor": [0.5, 0.75, 1.0, 1.25],
    "compiled_ckpt_logit_factor": [1.0, 1.25, 1.5, 1.75],
}
EAGER = {"fp32": [0.8 + 0.02 * i for i in range(26)], "bf16": [0.8 + 0.02 * i for i in range(26)]}


def with_eager(k: MemoryConstants, fp32: float, bf16: float) -> MemoryConstants:  # fp16 shares bf16's factor
    return replace(k, activation_calibration={**k.activation_calibration, "fp32": fp32, "bf16": bf16, "fp16": bf16})


def weighted_worst(grids: list[dict], k: MemoryConstants, under: float = 1.5) -> float:
    """The worst error, an under-prediction counting `under` times an over-prediction."""
    errors = [err(r, k) for r in grids if not r["skip"]]
    return max(max(errors), -under * min(errors))


def search(what: str, candidates: dict, apply, start: MemoryConstants, rows: list[dict], under: float,
           plans: list[dict]) -> MemoryConstants:  # fmt: skip
    """Every combination of `candidates` applied to `start`: the one with the smallest (weighted worst,
    median) error over `rows` whose plan-check margins hold, or `start` when none holds them."""
    best = None
    for values in itertools.product(*candidates.values()):
        k = apply(start, **dict(zip(candidates, values)))
        ran, oom = plan_margin(plans, k) if plans else (0.0, 0.0)
        score = (weighted_worst(rows, k, under), statistics.median(abs(err(r, k)) for r in rows))
        if ran >= -0.02 and oom >= 0 and (best is None or score < best[0]):
            best = (score, dict(zip(candidates, values)), k)
    if best is None:
        print(f"\n{what}: no constants keep the plan check's bounds")
        return start
    print(f"\nrefit ({what}: weighted worst {best[0][0]:.1%}, median {best[0][1]:.1%}): "
          + ", ".join(f"{n} = {v:g}" for n, v in best[1].items()))
    return best[2]


def refit(grids: list[dict], plans: list[dict]) -> MemoryConstants:
    """Eager factors by the plain worst error (plans run compiled steps on the GPUs that have them, so no
    plan bound is at stake), then the compiled constants, under-predictions weighing 1.5x, within the
    plan check's bounds. Returns the constants found; the committed ones are left as they are."""
    counted = [r for r in grids if not r["skip"]]
    eager = [r for r in counted if not r["shape"].compiled]
    compiled = [r for r in counted if r["shape"].compiled]  # the rows the compiled constants move
    k = CONSTANTS
    if eager:
        k = search("eager rows, activation_calibration", EAGER, with_eager, k, eager, 1.0, [])
    if compiled:
        k = search("compiled rows", COMPILED, replace, k, compiled, 1.5, plans)
    return k


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grids", nargs="+", default=[])
    p.add_argument("--eager-only", nargs="+", default=[], help="grids whose compiled rows are left out")
    p.add_argument("--plans")
    p.add_argument("--refit", action="store_true")
    p.add_argument("--rows", action="store_true", help="print every row, not only the summary")
    args = p.parse_args(argv)
    grids = [r for path in args.grids for r in grid_rows(path)]
    grids += [r for path in args.eager_only for r in grid_rows(path, eager_only=True)]
    plans = plan_rows(args.plans) if args.plans else []
    report(grids, plans, args.rows)
    if args.refit:
        report(grids, plans, False, refit(grids, plans))
    return 0


if __name__ == "__main__":
    sys.exit(main())
