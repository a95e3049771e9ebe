"""The original README's "Training Speed Improvements" table from a speed sweep's measuring jobs.

    python -m pufferfish.lab.measure -m experiment=speed_table hydra.sweep.dir=DIR   # or: make sweep-speed
    python -m pufferfish.lab.speed_table DIR

Reads only the jobs' own measure.json files; writes DIR/speed_table.md and DIR/speed_table.png and prints
the Markdown. Each improvement is the ratio of two jobs' tokens/s (median step after warm-up), named below.
The original README claims no figures here, only that each technique is faster; the table says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .sweep_tools import gib, markdown, read_jobs, technique_of

# (the README's row, the job with the technique, the job without it: conf/experiment/speed/<option>.yaml)
ROWS = [
    ("flash attention", "flash_attention", "mixed_precision", "SDPA's flash kernel vs the math kernel, both bf16"),
    ("threaded loading", "all", "all_sync_loading", "batches from a background thread vs the training thread, all else on"),
    ("mixed precision", "mixed_precision", "reference", "bf16 autocast vs fp32, math kernel both"),
    ("torch.compile", "compile", "reference", "compiled blocks vs eager, fp32 (not a row of the README)"),
    ("combined", "all", "reference", "everything on (optimizations=all, flash kernel) vs everything off"),
]
CLAIM = {"torch.compile": "not in the README"}  # every other row: "faster", no figure


def compiled(r: dict) -> str:
    applied = any("compile" in t for t in r.get("transforms") or [])
    return "yes" if applied else "asked, not applied (CPU)" if r.get("compile") else "no"


def render(records: list[dict], failed: list[str]) -> tuple[str, list]:
    by = {technique_of(r): r for r in records if r.get("fits") is not None}
    any_ = next(iter(by.values()))
    measured = any(r.get("measured") for r in by.values())
    head = (f"{'Measured on ' + any_['device_name'] if measured else 'On ' + any_['device_name'] + ' (not a GPU)'}, "
            f"torch {any_.get('torch')}, git {any_.get('git')}. Model {any_['num_layers']} layers x "
            f"{any_['model']['num_dims']} dims, {any_['model']['num_heads']} heads / {any_['model']['num_kv_heads']} kv "
            f"heads, vocab {any_['model']['vocab_size']}, batch {any_['micro_batch']} x {any_['model']['seq_len']} from "
            f"{'the real loader' if any_.get('batches') == 'data' else 'random tokens'}; {any_['steps']} steps, "
            f"median of those after {any_.get('warmup_steps')} warm-up.")  # fmt: skip
    rows, bars = [], []
    for name, on, off, what in ROWS:
        a, b = by.get(on), by.get(off)
        ta, tb = (a or {}).get("tokens_per_s"), (b or {}).get("tokens_per_s")
        ratio = ta / tb if ta and tb else None
        why = " / ".join(f"{t}: {(r or {}).get('oom') or 'no job'}" for t, r in ((on, a), (off, b)) if not (r or {}).get("tokens_per_s"))
        rows.append([name, what, f"{on} vs {off}", f"{tb:,.0f} → {ta:,.0f}" if ratio else why or "—",
                     f"{ratio:.2f}x" if ratio else "—", CLAIM.get(name, "faster (no figure)")])  # fmt: skip
        bars.append((name, ratio))
    raw = [[t, r["precision"], r["sdpa_backend"] + (" (math for grouped K/V)" if r.get("attention_math") and
            r["sdpa_backend"] != "math" else ""), compiled(r), r["prefetch_batches"],
            f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else r.get("oom") or "—",
            f"{r['model_tflops']:.3g}" if r.get("model_tflops") else "—", gib(r.get("peak_bytes"))]
           for t, r in by.items()]  # fmt: skip
    md = ["## Training Speed Improvements" + ("" if measured else " (not on a GPU)"), "", head, "",
          markdown(["improvement", "what is compared", "jobs", "tokens/s without → with", "speed-up",
                    "the original README's claim"], rows), "", "### The jobs", "",
          markdown(["technique", "precision", "sdpa kernel", "compile", "prefetch", "tokens/s",
                    "model TFLOP/s (6N + 12LdT)", "peak GiB" + ("" if measured else " (predicted)")], raw)]  # fmt: skip
    errors = [f"{r['job_dir']}: {r['error']}" for r in records if r.get("fits") is None]
    if failed or errors:
        md += ["", "Jobs without a result (see each job's .log): " + "; ".join(failed + errors)]
    return "\n".join(md) + "\n", bars


def draw(bars: list, path: Path, measured_on: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [n for n, _ in bars]
    ax.bar(names, [r or 0 for _, r in bars], label=f"ours ({measured_on})")
    for i, (n, r) in enumerate(bars):
        ax.annotate(f"{r:.2f}x" if r else "no result", (i, r or 0), ha="center", va="bottom")
        ax.annotate(CLAIM.get(n, "claimed: faster\n(no figure)"), (i, 0.05), ha="center", va="bottom", fontsize=7,
                    color="tab:orange")  # fmt: skip
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set(ylabel="speed-up (tokens/s ratio)", title="Training speed improvements: ours beside the original README's claims")
    ax.legend()
    fig.autofmt_xdate(rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", type=Path, help="a speed_table multirun directory")
    p.add_argument("--out", type=Path, help="folder for speed_table.md/.png (default: the sweep folder)")
    args = p.parse_args()
    records, failed = read_jobs(args.sweep_dir)
    if not any(r.get("fits") is not None for r in records):
        sys.exit(f"no measure.json with a result under {args.sweep_dir}")
    md, bars = render(records, failed)
    print(md)
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed_table.md").write_text(md)
    where = next(r["device_name"] for r in records if r.get("fits") is not None)
    draw(bars, out / "speed_table.png", where)
    print(f"wrote {out / 'speed_table.md'} and {out / 'speed_table.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
