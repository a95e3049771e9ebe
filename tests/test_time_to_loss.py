"""python -m pufferfish.lab.time_to_loss end to end on the CPU: real runs of two recipes at two sizes on English text; the
table's seconds are the runs' own eval records."""

import json
import sys

import pytest

from pufferfish.lab import time_to_loss
from pufferfish.runlog import read_metrics
from tests.conftest import ROOT, english_file

SIZES = ("1x64", "2x64")


@pytest.fixture(scope="module")
def measured(tmp_path_factory, cache_dir):
    import subprocess

    out = tmp_path_factory.mktemp("ttl")
    # fixed steps keep the losses the same from run to run on a busy machine; the seconds are still measured
    proc = subprocess.run([sys.executable, "-m", "pufferfish.lab.time_to_loss", "--out", str(out), "--target", "default",
                           "--corpus", str(english_file()), "--gpu", "cpu", "--mode", "ultra_fast", "--budget", "30",
                           "--sizes", ",".join(SIZES), "--systems", "default,combined", "--set", "data.vocab_size=512",
                           "data.tokenizer_train_mb=1", f"data.cache_dir='{cache_dir}'", "train.eval_tokens=2048",
                           "train.sample_tokens=0", "train.max_steps=20", "train.eval_interval=4",
                           "train.batch_tokens=512", "train.micro_batch=4"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def table(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| system")]
    keys = ["system", "size", "target", "seconds", "step", "handed_over", "steps", "verdict"]
    return [dict(zip(keys, (c.strip() for c in line.strip("|").split("|")))) for line in lines]


def test_the_table_has_a_row_per_system_and_size_with_seconds_from_the_runs_metrics(measured):
    out, stdout = measured
    rows = table((out / "time_to_loss.md").read_text())
    assert table(stdout) == rows
    assert [(r["system"], r["size"]) for r in rows] == [(s, size) for size in SIZES for s in ("default", "combined")]
    for r in rows:
        run = out / "runs" / f"{r['system']}_{r['size']}"
        evals = [e for e in read_metrics(run / "metrics.jsonl") if e["kind"] == "eval" and not e.get("final")]
        default = [e for e in read_metrics(out / "runs" / f"default_{r['size']}" / "metrics.jsonl")
                   if e["kind"] == "eval" and not e.get("final")]  # fmt: skip
        target = min(e["val_loss"] for e in default)  # --target default: the default's lowest evaluation
        assert float(r["target"]) == pytest.approx(target, abs=5e-4)
        hit = next((e for e in evals if e["val_loss"] <= target), None)
        if hit is None:
            assert r["seconds"] == "not reached" and r["step"] == ""
        else:
            assert float(r["seconds"]) == pytest.approx(hit["elapsed_s"], abs=0.005) and int(r["step"]) == hit["step"]
        summary = json.loads((run / "summary.json").read_text())
        assert float(r["handed_over"]) == pytest.approx(summary["val_loss"], abs=5e-4)
        assert int(r["steps"]) == summary["step"] == 20
    plan = json.loads((out / "runs" / "combined_2x64" / "plan.json").read_text())
    assert plan["optimizer"]["name"] == "muon" and plan["model"]["qk_norm"] and plan["schedule"]["schedule"] == "wsd"
    assert (out / "time_to_loss.png").stat().st_size > 10_000


def test_the_verdict_follows_the_rule_at_both_sizes(measured):
    """Recomputed from the runs' own files at full precision (the table rounds)."""
    out, _ = measured
    rows = {(r["system"], r["size"]): r for r in table((out / "time_to_loss.md").read_text())}
    assert {rows["default", s]["verdict"] for s in SIZES} == {"reference"}

    def run(system, size):
        folder = out / "runs" / f"{system}_{size}"
        evals = [e for e in read_metrics(folder / "metrics.jsonl") if e["kind"] == "eval" and not e.get("final")]
        return evals, json.loads((folder / "summary.json").read_text())["val_loss"]

    def better(size):
        (mine, mine_loss), (base, base_loss) = run("combined", size), run("default", size)
        target = min(e["val_loss"] for e in base)
        hit = next((e["elapsed_s"] for e in mine if e["val_loss"] <= target), None)
        base_hit = next(e["elapsed_s"] for e in base if e["val_loss"] <= target)
        return hit is not None and hit < base_hit and mine_loss <= base_loss

    verdict = rows["combined", SIZES[0]]["verdict"]
    assert verdict == rows["combined", SIZES[1]]["verdict"]
    if all(better(s) for s in SIZES):
        assert verdict == "kept"
    else:
        assert verdict.startswith("rejected (")


def test_verdicts_need_both_sizes_sooner_and_no_worse_hand_over():
    def row(system, size, curve, loss):
        return {"system": system, "size": size, "curve": [(t, v, 10 * i) for i, (t, v) in enumerate(curve)],
                "val_loss": loss}  # fmt: skip

    goal = {"a": 3.0, "b": 3.0}
    base = [row("default", "a", [(10, 3.5), (20, 3.0)], 3.0), row("default", "b", [(10, 3.4), (20, 2.9)], 2.9)]
    sooner_both = [row("muon", "a", [(10, 2.9)], 2.9), row("muon", "b", [(10, 2.95)], 2.8)]
    assert time_to_loss.verdicts(base + sooner_both, goal) == {"muon": "kept"}
    worse_hand_over = [row("wsd", "a", [(10, 2.9)], 2.9), row("wsd", "b", [(10, 2.95)], 2.91)]
    assert time_to_loss.verdicts(base + worse_hand_over, goal)["wsd"] == "rejected (b: handed-over loss 2.910 > 2.900)"
    one_size_only = [row("qk_norm", "a", [(5, 2.9)], 2.8)]
    assert time_to_loss.verdicts(base + one_size_only, goal)["qk_norm"] == "rejected (b: no run to compare)"
    never = [row("combined", "a", [(10, 3.1)], 2.9), row("combined", "b", [(5, 2.9)], 2.8)]
    assert time_to_loss.verdicts(base + never, goal)["combined"] == "rejected (a: not sooner)"
    assert time_to_loss.first_at_or_below(never[1]["curve"], 3.0) == (5, 0)
    assert time_to_loss.first_at_or_below(base[0]["curve"], 3.0) == (20, 10)  # at or below: 3.0 counts
