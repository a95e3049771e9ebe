"""python -m pufferfish.compare PATH... [--out curves.png]: a table of runs side by side, and their curves.

PATH is a run directory, a folder holding runs (a Hydra sweep directory; searched recursively for
folders with metrics.jsonl beside config.yaml or plan.json), or wandb:ENTITY/PROJECT (W&B's public API;
online only). The table has the chosen group options and the final validation loss, bits per byte,
tokens/s, peak memory and training wall time of each run; the PNG plots validation loss against tokens
and against wall time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from .errors import ConfigError, OneLineArgumentParser, exit_on_user_error
from .loggers import COMPARED_GROUPS, chosen_options, has_wandb_key
from .runlog import read_metrics

GIB = 2**30


@dataclass
class RunResult:
    name: str
    options: dict[str, str]
    val_loss: float | None = None  # the final evaluation (the last one when the run did not finish)
    val_bpb: float | None = None
    tokens_per_s: float | None = None  # tokens trained / training wall time, evaluations included
    peak_bytes: int | None = None  # GPU: peak allocated; CPU: peak resident set size
    wall_s: float | None = None  # training wall time (data preparation not included)
    status: str = "finished"  # finished | stopped (REASON) | running or crashed
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (tokens, wall s, val loss) per eval
    corpus: str | None = None  # what it read: its corpus's size and tokenizer (None: not known, e.g. W&B)


def is_run(folder: Path) -> bool:
    return (folder / "metrics.jsonl").is_file() and any((folder / f).is_file() for f in ("config.yaml", "plan.json"))


def find_runs(path: Path) -> list[Path]:
    if not path.exists():
        raise ConfigError(f"{path} does not exist; give run directories, sweep directories or wandb:ENTITY/PROJECT")
    if is_run(path):
        return [path]
    found = sorted({p.parent for p in path.rglob("metrics.jsonl") if is_run(p.parent)})
    if not found:
        raise ConfigError(f"{path} holds no runs (folders with metrics.jsonl and config.yaml or plan.json)")
    return found


def _wall_at(step: int, clock: list[tuple[int, float]]) -> float:
    """Wall time at `step`, interpolated between the train lines' (step, elapsed_s)."""
    for (s0, t0), (s1, t1) in zip(clock, clock[1:]):
        if s0 <= step <= s1:
            return t0 + (t1 - t0) * (step - s0) / max(1, s1 - s0)
    return clock[-1][1]


def corpus_of(folder: Path) -> str | None:
    """The text a run read, as its plan's corpus size and its tokenizer's digest: runs that differ in either were
    trained and scored on different tokens, so their losses do not compare."""
    plan, tokenizer = folder / "plan.json", folder / "tokenizer.model"
    parts = []
    if plan.is_file():
        parts.append(f"{json.loads(plan.read_text()).get('corpus_tokens', 0) / 1e6:.2f}M tokens")
    if tokenizer.is_file():
        parts.append(f"tokenizer {hashlib.sha256(tokenizer.read_bytes()).hexdigest()[:8]}")
    return ", ".join(parts) or None


def load_run(folder: Path, name: str) -> RunResult:
    records = read_metrics(folder / "metrics.jsonl")
    config = OmegaConf.load(folder / "config.yaml") if (folder / "config.yaml").is_file() else None
    result = RunResult(name, chosen_options(config) if config is not None else {}, corpus=corpus_of(folder))
    clock = [(0, 0.0)] + [(r["step"], r["elapsed_s"]) for r in records if "elapsed_s" in r and "step" in r]
    evals = [r for r in records if r.get("kind") == "eval" and r.get("val_loss") is not None]
    # the final record scores the handed-over (best) weights on the whole validation set: a point of the
    # curve only where no evaluation of the last weights stands at that step (runs that kept no best)
    plain = {r["step"] for r in evals if not r.get("final")}
    evals = [r for r in evals if not (r.get("final") and r["step"] in plain)]
    result.curve = [(r["tokens"], r.get("elapsed_s", _wall_at(r["step"], clock)), r["val_loss"]) for r in evals]
    summary_path = folder / "summary.json"
    if summary_path.is_file():
        s = json.loads(summary_path.read_text())
        result.status = "finished" if s.get("finished") else f"stopped ({s.get('stopped_by', '?')})"
        result.val_loss, result.val_bpb = s.get("val_loss"), s.get("val_bpb")
        result.tokens_per_s, result.wall_s = s.get("tokens_per_s"), s.get("elapsed_s")
        result.peak_bytes = s.get("peak_mem_bytes", s.get("peak_rss_bytes"))
    else:
        result.status = "running or crashed"
        trained = [r for r in records if r.get("kind") == "train"]
        if trained:
            result.wall_s = trained[-1]["elapsed_s"]
            result.tokens_per_s = trained[-1]["tokens"] / max(1e-9, trained[-1]["elapsed_s"])
    if result.val_loss is None and evals:  # stopped early: its last evaluation
        result.val_loss, result.val_bpb = evals[-1]["val_loss"], evals[-1].get("val_bpb")
    return result


def load_wandb(project: str) -> list[RunResult]:
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun") or not has_wandb_key():
        raise ConfigError(
            f"wandb:{project} needs W&B online: an API key (WANDB_API_KEY or `wandb login`) and WANDB_MODE not "
            f"offline. Offline runs live in their run directories: compare those (python -m pufferfish.compare "
            f"multirun/...), or upload them first with `wandb sync RUN_DIR/wandb/offline-run-*`"
        )
    import wandb

    results = []
    for run in wandb.Api().runs(project):
        config, summary = run.config, run.summary
        options = {g: str(config[g]["name"]) for g in COMPARED_GROUPS if isinstance(config.get(g), dict)}
        result = RunResult(run.name, options, summary.get("val_loss"), summary.get("val_bpb"),
                           summary.get("tokens_per_s"), summary.get("peak_mem_bytes", summary.get("peak_rss_bytes")),
                           summary.get("elapsed_s"), run.state)  # fmt: skip
        history = [row for row in run.scan_history(keys=["tokens", "val_loss"])]
        clock = [(0, 0.0)] + [(row["_step"], row["elapsed_s"]) for row in run.scan_history(keys=["elapsed_s"])]
        result.curve = [(row["tokens"], _wall_at(row["_step"], clock), row["val_loss"]) for row in history]
        results.append(result)
    if not results:
        raise ConfigError(f"wandb:{project} has no runs")
    return results


def collect(paths: list[str]) -> list[RunResult]:
    results: list[RunResult] = []
    folders: list[Path] = []
    for p in paths:
        if p.startswith("wandb:"):
            results += load_wandb(p.removeprefix("wandb:"))
        else:
            folders += find_runs(Path(p))
    for folder, name in zip(folders, run_names(folders)):
        results.append(load_run(folder, name))
    return results


def run_names(folders: list[Path]) -> list[str]:
    """What tells the runs apart: the Hydra overrides not shared by all of them, else the relative path."""
    if not folders:
        return []
    root = Path(os.path.commonpath([f.resolve() for f in folders]))
    paths = [str(f.resolve().relative_to(root)) if f.resolve() != root else f.name for f in folders]
    overrides = []
    for f in folders:
        file = f / ".hydra" / "overrides.yaml"  # a Hydra job's command-line overrides
        overrides.append(list(OmegaConf.load(file)) if file.is_file() else None)
    if len(folders) < 2 or any(o is None for o in overrides):
        return paths
    shared = set.intersection(*(set(o) for o in overrides))
    names = [" ".join(x for x in o if x not in shared) for o in overrides]
    return names if all(names) and len(set(names)) == len(names) else paths


def _fmt(value, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return {"loss": f"{value:.4f}", "rate": f"{value:,.0f}", "gib": f"{value / GIB:.2f}",
            "time": f"{value / 60:.1f} min" if value >= 120 else f"{value:.1f} s"}[kind]  # fmt: skip


def markdown_table(results: list[RunResult]) -> str:
    head = ["run", *COMPARED_GROUPS, "val loss", "bits/byte", "tokens/s", "peak GiB", "wall time", "status"]
    rows = [[r.name, *(r.options.get(g, "-") for g in COMPARED_GROUPS), _fmt(r.val_loss, "loss"),
             _fmt(r.val_bpb, "loss"), _fmt(r.tokens_per_s, "rate"), _fmt(r.peak_bytes, "gib"),
             _fmt(r.wall_s, "time"), r.status] for r in results]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i <= len(COMPARED_GROUPS) else "--:"
                                                            for i in range(len(head) - 1)) + "|---|"]  # fmt: skip
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    lines += ["", "peak GiB: peak allocated GPU memory; on CPU the process's peak resident memory. "
                  "wall time: training, evaluations included, data preparation not."]  # fmt: skip
    corpora: dict[str, list[str]] = {}
    for r in results:
        if r.corpus:
            corpora.setdefault(r.corpus, []).append(r.name)
    if len(corpora) > 1:
        lines += ["", "note: these runs read different text, so their losses do not compare: "
                  + "; ".join(f"{', '.join(names)}: {corpus}" for corpus, names in corpora.items())
                  + ". The default corpus is sized to each run's budget and measured speed: give every run the same "
                  "data.max_mb (or the same data.paths) to compare them."]  # fmt: skip
    return "\n".join(lines)


def plot_curves(results: list[RunResult], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for r in results:
        if not r.curve:
            continue
        tokens, wall, loss = zip(*r.curve)
        by_tokens.plot(tokens, loss, marker=".", label=r.name)
        by_time.plot(wall, loss, marker=".", label=r.name)
    by_tokens.set(xlabel="tokens trained", ylabel="validation loss (nats/token)", title="by tokens")
    by_time.set(xlabel="training wall time (s)", title="by wall time")
    for ax in (by_tokens, by_time):
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="python -m pufferfish.compare", description=__doc__.split("\n\n")[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run dir, sweep dir, or wandb:ENTITY/PROJECT")
    parser.add_argument("--out", type=Path, help="write validation-loss curves to this PNG")
    parser.add_argument("--sort", choices=["path", "loss"], default="path", help="row order (default: path)")
    args = parser.parse_args(argv)
    results = collect(args.paths)
    if args.sort == "loss":
        results.sort(key=lambda r: (r.val_loss is None, r.val_loss or 0.0))
    print(markdown_table(results))
    if args.out:
        try:
            print(f"\ncurves: {plot_curves(results, args.out)}")
        except OSError as e:
            raise ConfigError(f"--out {args.out} cannot be written ({e.strerror}); choose a writable path") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
