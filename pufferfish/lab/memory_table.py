"""The original README's memory tables from a sweep's measuring jobs, with its claimed figure beside ours.

    python -m pufferfish.lab.measure -m experiment=memory_table hydra.sweep.dir=DIR   # or: make sweep-memory
    python -m pufferfish.lab.memory_table DIR --search-max-layers   # GPU: bisect max layers with real runs
    python -m pufferfish.lab.memory_table --predicted --gpu gtx1060  # no GPU: the memory model's version

Reads only the jobs' own measure.json files; writes DIR/memory_table.md and DIR/memory_table.png and
prints the Markdown. Without a GPU every figure is the memory model's and is labelled "predicted".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .sweep_tools import (
    GIB,
    gib,
    markdown,
    max_layers_of,
    read_jobs,
    search_max_layers,
    technique_of,
)

# The rows (conf/experiment/memory/<option>.yaml) and the original README's claims: (reduction % range, max
# layers on a 6 GB GPU). The README's "all" is the three techniques together; it is set beside both rows.
ROWS = {
    "baseline": ("baseline: fp32, multi-head attention", None, 8),
    "grad_ckpt": ("gradient checkpointing", (30, 40), 12),
    "mixed_precision": ("mixed precision (autocast; fp32 weights and AdamW state)", (40, 50), 16),
    "gqa": ("GQA: 4 kv heads for 12 query heads, fp32", (10, 20), 18),
    "all_three": ("all three: checkpointing + mixed precision + GQA (the peer's)", (60, 70), 24),
    "all": ("optimizations=all + GQA: also compile and chunked loss; checkpointing only if needed", (60, 70), 24),
}
NO_FIGURE = "no figure known"  # the README's "Memory Usage vs Model Size" numbers are not available to us


def predicted_records(gpu: str, extra: list[str]) -> list[dict]:
    """The memory model's version of the sweep: one record per technique and depth, as a CPU job writes."""
    import torch
    from hydra import compose, initialize_config_dir

    from pufferfish.paths import CONF_DIR
    from pufferfish.resolver import detect_hardware, predict_peak_bytes
    from pufferfish.runlog import git_revision

    from . import config as _schemas  # noqa: F401  (the measuring job's schema)
    from .sweep_tools import allocator_cap, job_prediction, predicted_max_layers, target_hardware

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        sweep = compose("measure", ["experiment=memory_table"], return_hydra_config=True).hydra.sweeper.params
        records = []
        for technique in str(sweep["experiment/memory@memory"]).split(","):
            cfg = compose("measure", ["experiment=memory_table", f"gpu={gpu}", f"experiment/memory@memory={technique}", *extra])
            hw = detect_hardware(cfg.gpu, cfg.optimizations, "cpu")
            d, micro, vocab = cfg.model.num_dims, cfg.train.micro_batch, cfg.model.vocab_size or cfg.data.vocab_size or 8192
            best = predicted_max_layers(cfg, hw, d, micro, vocab)
            for L in map(int, str(sweep["model.num_layers"]).split(",")):
                _, ckpt, shape = job_prediction(cfg, hw, L, d, micro, vocab)
                peak, cap = predict_peak_bytes(shape).total, allocator_cap(hw)
                records.append({"technique": technique, "num_layers": L, "peak_bytes": peak, "fits": peak <= cap,
                                "measured": False, "predicted_peak_bytes": peak, "predicted_max_layers": best,
                                "cap_bytes": cap, "precision": target_hardware(cfg, hw).precision, "grad_ckpt": ckpt,
                                "device_name": f"the memory model (gpu={gpu})", "profile": gpu, "choices": {},
                                "attention_math": shape.attention_math, "micro_batch": micro, "model": dict(cfg.model),
                                "torch": torch.__version__, "git": git_revision()})  # fmt: skip
    return records


def claim_range(r) -> str:
    return "—" if r is None else f"{r[0]}–{r[1]} %"


def as_run(runs: list[dict]) -> str:
    """What the jobs really did: precision, checkpointing (at which depths), the math attention kernel."""
    ckpt = sorted(r["num_layers"] for r in runs if r.get("grad_ckpt"))
    parts = [runs[0]["precision"]]
    if ckpt:
        parts.append("checkpointing" + ("" if len(ckpt) == len(runs) else " at " + ",".join(map(str, ckpt))))
    if any(r.get("attention_math") for r in runs):
        parts.append("math attention kernel")
    return ", ".join(parts)


def render(records: list[dict], failed: list[str]) -> tuple[str, dict]:
    ok = [r for r in records if r.get("fits") is not None]
    measured = any(r.get("measured") for r in ok)
    kind = "measured" if measured else "predicted"
    by: dict[str, list[dict]] = {}
    for r in ok:
        by.setdefault(technique_of(r), []).append(r)
    order = [t for t in ROWS if t in by] + sorted(t for t in by if t not in ROWS)
    jobs = {(technique_of(r), r["num_layers"]): r for r in ok if "probe_" not in r.get("job_dir", "")}  # not probes
    depths = sorted({L for _, L in jobs})
    base = {L: jobs[("baseline", L)]["peak_bytes"] for L in depths if ("baseline", L) in jobs}
    first = ok[0]
    cap, m = first["cap_bytes"], first["model"]
    head = (f"{'Measured on ' + first['device_name'] if measured else 'Predicted by the memory model'}"
            f" ({first['profile']}: PyTorch's allocator capped at {cap / GIB:.2f} GiB), torch {first.get('torch')}, "
            f"git {first.get('git')}. Model {m['num_dims']} dims, {m['num_heads']} heads, ffn {m['ffn_dims']}, "
            f"vocab {m['vocab_size']}, batch {first['micro_batch']} x {m['seq_len']}; peak = "
            f"{'torch.cuda.max_memory_allocated over two training steps' if measured else 'predict_peak_bytes'}.")  # fmt: skip
    impact, usage = [], []
    plot = {"technique": order, "reduction": [], "claim": [], "max": [], "claim_max": [], "peaks": {}}
    for t in order:
        label, claim, claim_max = ROWS.get(t, (t, None, None))
        runs = [jobs[(t, L)] for L in depths if (t, L) in jobs]
        best, how = max_layers_of(by[t]) if measured else (runs[0]["predicted_max_layers"], "predicted")
        peaks = {L: jobs[(t, L)]["peak_bytes"] for L in depths if (t, L) in jobs}
        red = {L: 1 - peaks[L] / base[L] for L in depths if peaks.get(L) and base.get(L)}
        model_says = [runs[0]["predicted_max_layers"]] if measured else []  # beside a measured figure only
        impact.append([t, f"{label} [{as_run(runs)}]", *[f"{red[L]:.0%}" if L in red else "—" for L in depths],
                       claim_range(claim), f"{best} ({how})", claim_max or "—", *model_says])  # fmt: skip
        cells = []
        for L in depths:
            r = jobs.get((t, L))
            note = "" if r is None or r["fits"] else " does not fit" + ("; needed uncapped" if r.get("peak_uncapped") else "")
            cells.append("—" if r is None else gib(r["peak_bytes"]) + note)
        if measured:
            cells += [gib(jobs[(t, L)]["predicted_peak_bytes"]) if (t, L) in jobs else "—" for L in depths]
        usage.append([t, *cells, NO_FIGURE])
        plot["reduction"].append(100 * red.get(depths[0], float("nan")))
        plot["claim"].append(claim)
        plot["max"].append(best or 0)
        plot["claim_max"].append(claim_max)
        plot["peaks"][t] = [(peaks.get(L) or 0) / GIB for L in depths]
    md = [f"## Memory Optimization Impact ({kind})", "", head, "",
          markdown(["technique", "what the row is [settings]", *[f"reduction at {L} layers ({kind})" for L in depths],
                    "claimed reduction", f"max layers under {cap / GIB:.2f} GiB ({kind})", "claimed max layers (6 GB)",
                    *(["memory model's max layers"] if measured else [])], impact),
          "", f"## Memory Usage vs Model Size ({kind}, GiB)", "",
          markdown(["technique", *[f"{L} layers ({kind})" for L in depths],
                    *([f"{L} layers (memory model)" for L in depths] if measured else []), "claimed"], usage)]  # fmt: skip
    errors = [f"{r['job_dir']}: {r['error']}" for r in records if r.get("fits") is None]
    if failed or errors:
        md += ["", "Jobs without a result (see each job's .log): " + "; ".join(failed + errors)]
    plot.update(depths=depths, cap=cap / GIB, kind=kind)
    return "\n".join(md) + "\n", plot


def draw(plot: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts, x = plot["technique"], range(len(plot["technique"]))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    ax.bar([i - 0.2 for i in x], plot["reduction"], 0.4, label=f"ours ({plot['kind']})")
    for i, c in zip(x, plot["claim"]):
        if c:
            ax.bar(i + 0.2, c[1] - c[0], 0.4, bottom=c[0], color="tab:orange", alpha=0.6,
                   label="claimed range" if i == next(j for j, k in enumerate(plot["claim"]) if k) else None)  # fmt: skip
    ax.axhline(0, color="black", lw=0.8)
    ax.set(title=f"Peak reduction at {plot['depths'][0]} layers vs baseline (%)", xticks=list(x))
    ax.set_xticklabels(ts, rotation=30, ha="right")
    ax.legend()
    ax = axes[1]
    ax.bar([i - 0.2 for i in x], plot["max"], 0.4, label=f"ours ({plot['kind']})")
    ax.bar([i + 0.2 for i in x], [c or 0 for c in plot["claim_max"]], 0.4, label="claimed", color="tab:orange")
    ax.set(title=f"Max layers under a {plot['cap']:.2f} GiB allocator cap", xticks=list(x))
    ax.set_xticklabels(ts, rotation=30, ha="right")
    ax.legend()
    ax = axes[2]
    width = 0.8 / max(1, len(plot["depths"]))
    for k, L in enumerate(plot["depths"]):
        ax.bar([i - 0.4 + width * (k + 0.5) for i in x], [plot["peaks"][t][k] for t in ts], width, label=f"{L} layers",
               color=plt.cm.Blues(0.45 + 0.45 * k / max(1, len(plot["depths"]) - 1)))  # ours only: no orange
    ax.axhline(plot["cap"], color="red", ls="--", lw=1, label="cap")
    ax.set(title=f"Peak GiB ({plot['kind']}; no claimed figures known)", xticks=list(x))
    ax.set_xticklabels(ts, rotation=30, ha="right")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", nargs="?", type=Path, help="a memory_table multirun directory")
    p.add_argument("--predicted", action="store_true", help="the memory model's table, no sweep needed")
    p.add_argument("--gpu", default="gtx1060", help="--predicted: the gpu profile (its precision support)")
    p.add_argument("--search-max-layers", action="store_true", help="GPU: bisect max layers with real runs")
    p.add_argument("--workers", type=int, default=6, help="techniques searched side by side (one GPU is enough)")
    p.add_argument("--minutes", type=float, help="start no probe after this long (the table says 'at least')")
    p.add_argument("--out", type=Path, help="folder for memory_table.md/.png (default: the sweep folder)")
    p.add_argument("overrides", nargs="*", help="--predicted: extra config overrides, e.g. model.seq_len=1024")
    args = p.parse_args()
    if args.predicted:
        records, failed = predicted_records(args.gpu, args.overrides), []
    elif args.sweep_dir and args.sweep_dir.is_dir():
        records, failed = read_jobs(args.sweep_dir)
        if args.search_max_layers:
            if any(r.get("measured") for r in records):
                found = search_max_layers(args.sweep_dir, records, args.workers, args.minutes)
                print("max layers (bisected): " + ", ".join(f"{t} {'unfinished' if n is None else n}" for t, n in found.items()), file=sys.stderr)
                records, failed = read_jobs(args.sweep_dir)
            else:
                print("no measured jobs (no GPU): max layers are the memory model's (predicted)", file=sys.stderr)
    else:
        p.error("give a sweep directory, or --predicted")
    if not any(r.get("fits") is not None for r in records):
        sys.exit(f"no measure.json with a result under {args.sweep_dir}")
    md, plot = render(records, failed)
    print(md)
    out = args.out or (None if args.predicted else args.sweep_dir)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "memory_table.md").write_text(md)
        draw(plot, out / "memory_table.png")
        print(f"wrote {out / 'memory_table.md'} and {out / 'memory_table.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
