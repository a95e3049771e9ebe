"""The comparison table and curves, on two tiny runs: one finished, one stopped early."""

import json
import subprocess
import sys

from pufferfish.compare import collect, find_runs, markdown_table
from pufferfish.train import train
from tests.conftest import ROOT, compose, tiny_overrides


def test_compare_two_runs_table_and_png(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    common = ("train.max_steps=6", "train.log_interval=2", "train.eval_interval=2", "train.sample_tokens=0")
    train(compose(*tiny_overrides(sweep / "mha", cache_dir, *common, "attention=mha")))
    train(compose(*tiny_overrides(sweep / "mqa", cache_dir, *common, "attention=mqa", "train.stop_at_step=4")))
    (sweep / "not_a_run").mkdir()  # folders without metrics.jsonl are not runs
    assert [p.name for p in find_runs(sweep)] == ["mha", "mqa"]

    png = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, "-m", "pufferfish.compare", str(sweep), "--out", str(png)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| m")]
    assert len(rows) == 2
    mha, mqa = ([c.strip() for c in row.strip("|").split("|")] for row in rows)
    assert mha[:7] == ["mha", "cpu", "ultra_fast", "mha", "none", "all", "text_files"]
    assert mha[-1] == "finished" and mqa[-1] == "stopped (stop_at_step)" and mqa[3] == "mqa"
    assert all(cell != "-" for cell in mha[7:]) and float(mqa[7]) > 0  # the stopped run: its last evaluation
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "read different text" not in proc.stdout  # one corpus and tokenizer for both

    finished, stopped = collect([str(sweep)])
    batch = json.loads((sweep / "mha" / "plan.json").read_text())["batch_tokens"]
    assert [c[0] for c in finished.curve] == [2 * batch, 4 * batch, 6 * batch]  # evals at 2, 4; the final at 6
    assert finished.curve[-1][1] > finished.curve[0][1] > 0  # wall time grows along the curve
    assert len(stopped.curve) == 1  # the eval at step 2; it stopped at 4, before the one there


def test_wandb_project_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    proc = subprocess.run([sys.executable, "-m", "pufferfish.compare", "wandb:someone/pufferfish"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "needs W&B online" in proc.stderr and "wandb sync" in proc.stderr


def test_runs_on_different_text_are_said_not_to_compare(tmp_path, cache_dir):
    common = ("train.max_steps=2", "train.eval_interval=2", "train.sample_tokens=0")
    train(compose(*tiny_overrides(tmp_path / "a", cache_dir, *common)))
    train(compose(*tiny_overrides(tmp_path / "b", cache_dir, *common)))
    train(compose(*tiny_overrides(tmp_path / "c", cache_dir, *common, "data.vocab_size=384")))  # another tokenizer
    a, b, c = collect([str(tmp_path)])
    assert a.corpus == b.corpus != c.corpus and "tokenizer" in a.corpus
    said = markdown_table([a, b, c]).split("note: ")[1]
    assert said.startswith(f"these runs read different text, so their losses do not compare: a, b: {a.corpus}; "
                           f"c: {c.corpus}.") and "data.max_mb" in said  # fmt: skip
    assert "note: " not in markdown_table([a, b])
