"""End to end on real English text: the loss falls, resume is exact, the run directory is complete."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pufferfish.checkpoint import checkpoint_files
from pufferfish.runlog import read_metrics
from pufferfish.train import train
from tests.conftest import compose, run_cli, tiny_overrides


def unigram_entropy_nats(token_file: Path, dtype: str) -> float:
    tokens = np.memmap(token_file, dtype=np.dtype(dtype), mode="r")
    counts = np.bincount(tokens)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_loss_falls_far_below_unigram_entropy(tmp_path, cache_dir):
    cfg = compose(*tiny_overrides(tmp_path / "run", cache_dir, "train.max_steps=150", "mode.target_hours=1", "model.num_layers=2",
                                  "model.num_dims=128", "train.batch_tokens=2048", "optim.lr=3e-3"))  # fmt: skip
    result = train(cfg)
    from pufferfish.data import prepare_data

    data = prepare_data(cfg.data, progress=False)
    entropy = unigram_entropy_nats(data.val_path, data.dtype)
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    assert result["val_loss"] < entropy - 0.6, (result["val_loss"], entropy)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert result["val_bpb"] == pytest.approx(result["val_loss"] / math.log(2) / data.val_bytes_per_token)


def test_run_directory_describes_itself(tmp_path, cache_dir):
    run = tmp_path / "run"
    result = train(compose(*tiny_overrides(run, cache_dir, "train.max_steps=20", "train.log_interval=5")))
    for name in ["config.yaml", "plan.json", "metrics.jsonl", "summary.json", "sample.txt", "tokenizer.model",
                 "checkpoints/latest"]:  # fmt: skip
        assert (run / name).exists(), name
    plan = json.loads((run / "plan.json").read_text())
    for key in ["params", "predicted_peak_bytes", "vram_bytes", "predicted_tokens_per_s", "train_tokens",
                "time_budget_s", "binding_constraint", "reasons"]:  # fmt: skip
        assert key in plan
    lines = read_metrics(run / "metrics.jsonl")
    train_lines = [r for r in lines if r["kind"] == "train"]
    assert [r["step"] for r in train_lines] == [5, 10, 15, 20]
    assert all({"step", "train_loss", "lr", "tokens_per_s"} <= r.keys() for r in train_lines)
    assert any("val_loss" in r and "val_bpb" in r for r in lines if r["kind"] == "eval")
    assert result["finished"] and result["step"] == 20
    assert "peak_rss_bytes" in json.loads((run / "summary.json").read_text())


def test_profile_steps_write_a_table_and_a_trace(tmp_path, cache_dir):
    run = tmp_path / "run"
    train(compose(*tiny_overrides(run, cache_dir, "train.max_steps=8", "train.profile_steps=3", "train.profile_start=2",
                                  "train.sample_tokens=0")))  # fmt: skip
    text = (run / "profile_rank0.txt").read_text()
    head = text.splitlines()[0]
    assert head.startswith("rank 0: 3 step(s) recorded after 3;"), head
    assert float(head.split("wall ")[1].split(" ms")[0]) > 0
    assert "aten::" in text and "Self CPU" in text  # the ops table, by host time on CPU
    trace = json.loads((run / "profile_rank0.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert any(str(n).startswith("ProfilerStep#") for n in names)  # the recorded steps, marked in the trace
    assert sum(str(n).startswith("ProfilerStep#") for n in names) == 3
    cut = tmp_path / "cut"  # the run ends inside the recorded steps: the table says how many it holds
    train(compose(*tiny_overrides(cut, cache_dir, "train.max_steps=4", "train.profile_steps=4", "train.profile_start=1",
                                  "train.sample_tokens=0")))  # fmt: skip
    assert (cut / "profile_rank0.txt").read_text().startswith("rank 0: 2 step(s) recorded after 2;")


def test_interrupted_and_resumed_run_reproduces_losses_exactly(tmp_path, cache_dir):
    common = ("train.max_steps=16", "train.log_interval=1", "train.eval_interval=5", "model.num_layers=2",
              "train.batch_tokens=1024", "train.micro_batch=4")  # two micro-steps: accumulation is resumed too
    straight = tmp_path / "straight"
    train(compose(*tiny_overrides(straight, cache_dir, *common)))
    broken = tmp_path / "broken"
    first = train(compose(*tiny_overrides(broken, cache_dir, *common, "train.stop_at_step=7")))
    assert first["stopped_by"] == "stop_at_step" and not first["finished"]
    second = train(compose(*tiny_overrides(broken, cache_dir, *common)))
    assert second["finished"]

    def losses(run):
        return [(r["kind"], r["step"], r.get("train_loss"), r.get("val_loss"))
                for r in read_metrics(run / "metrics.jsonl") if r["kind"] in ("train", "eval")]  # fmt: skip

    assert losses(straight) == losses(broken)  # bit for bit on CPU, evaluations included
    assert second["val_loss"] == pytest.approx(json.loads((straight / "summary.json").read_text())["val_loss"], abs=0)


def test_dry_run_plans_and_trains_nothing(tmp_path, cache_dir):
    run = tmp_path / "run"
    out = train(compose(*tiny_overrides(run, cache_dir, "dry_run=true")))
    assert (run / "plan.json").exists() and not (run / "checkpoints").exists()
    assert out["plan"]["model"]["num_layers"] == 1 and out["plan"]["model"]["num_dims"] == 64


def test_checkpoints_keep_the_last_k(tmp_path, cache_dir):
    run = tmp_path / "run"
    train(compose(*tiny_overrides(run, cache_dir, "train.max_steps=6", "train.ckpt_interval_s=0",
                                  "train.keep_checkpoints=2")))  # fmt: skip
    files = checkpoint_files(run / "checkpoints")
    assert [f.name for f in files] == ["step_00000005.pt", "step_00000006.pt"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006.pt"


def test_cli_contract_run_then_generate(tmp_path, cache_dir):
    run = tmp_path / "cli"
    overrides = [o for o in tiny_overrides(run, cache_dir, "train.max_steps=10") if not o.startswith("run_dir=")]
    proc = run_cli("pufferfish.train", *overrides, f"hydra.run.dir={run}")  # the contract's way to name the dir
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / ".hydra" / "config.yaml").exists() and (run / "checkpoints" / "latest").exists()
    gen = run_cli("pufferfish.generate", f"checkpoint={run}", "prompt=Note:", "max_new_tokens=12")
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.startswith("Note:") and len(gen.stdout.strip()) > len("Note:")


def test_python_api_like_the_users_readme(tmp_path, cache_dir):
    from pufferfish import ModelConfig, Trainer
    from tests.conftest import english_file

    trainer = Trainer(
        config=ModelConfig(num_layers=1, num_dims=64, num_heads=2, vocab_size=512, seq_len=64),
        dataset_path=str(english_file()), target_hours=0.002, run_dir=tmp_path / "api",
        overrides=[f"data.cache_dir='{cache_dir}'", "data.tokenizer_train_mb=1", "train.progress=false",
                   "train.sample_tokens=0", "train.eval_tokens=2048"],
    )  # fmt: skip
    result = trainer.train()
    assert result["finished"] and result["step"] > 0 and math.isfinite(result["val_loss"])
    plan = json.loads((tmp_path / "api" / "plan.json").read_text())
    assert plan["model"]["num_heads"] == 2 and plan["model"]["vocab_size"] == 512
    assert result["elapsed_s"] < 0.002 * 3600 + 5  # the time budget ends the run
    assert isinstance(trainer.generate("To be", max_new_tokens=5), str)
    from pufferfish.lab.budget_check import check

    row = check(tmp_path / "api", tolerance=0.5)  # what `python -m pufferfish.lab.budget_check RUN` prints
    assert row["budget_s"] == pytest.approx(7.2) and row["steps"] == result["step"], row
    assert row["on_time"] and row["tokens"] == result["tokens"], row
    # a 7 s run on a shared CPU may meet its clock a few steps before its re-planned schedule ends
    assert row["schedule_complete"] or row["steps"] >= 0.9 * row["planned_steps"] or row["stopped_by"] == "early stop"
    with pytest.raises(SystemExit, match=r"has no plan.json, summary.json, config.yaml, metrics.jsonl; give"):
        check(tmp_path, tolerance=0.5)  # not a run's folder


@pytest.mark.slow
def test_contract_default_corpus_ultra_fast(tmp_path):
    """The README's headline command as written: the embedded default corpus, nothing but gpu, mode and the dir."""
    import time

    run = tmp_path / "contract"
    start = time.perf_counter()
    proc = run_cli("pufferfish.train", "gpu=cpu", "mode=ultra_fast", f"hydra.run.dir={run}", "train.progress=false",
                   timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.perf_counter() - start < 120 or "cached" in proc.stderr  # corpus preparation may be first-time
    for name in [".hydra/config.yaml", "plan.json", "metrics.jsonl", "checkpoints/latest"]:
        assert (run / name).exists(), name
    gen = run_cli("pufferfish.generate", f"checkpoint={run}", "prompt=def ", "max_new_tokens=32")
    assert gen.returncode == 0 and gen.stdout.startswith("def")  # Hydra trims an unquoted trailing space
    assert len(gen.stdout.strip()) > len("def")


def test_the_cpu_is_measured_once_for_the_default_corpus_cap_and_the_plan(tmp_path, monkeypatch):
    """The default corpus is capped to what the budget can use, and the plan is then made for the same hardware:
    on the CPU one measurement of its matmul rate serves both (two would disagree on a busy machine)."""
    from pufferfish.data import corpora
    from pufferfish.resolver import hardware

    package = Path(__file__).resolve().parents[1] / "pufferfish"  # real Python source, small enough to be quick
    monkeypatch.setattr(corpora, "_python_roots", lambda: [("stdlib", package)])
    measured, probe = [], hardware.cpu_matmul_flops

    def counted(*args, **kwargs):
        measured.append(probe(*args, **kwargs))
        return measured[-1]

    monkeypatch.setattr(hardware, "cpu_matmul_flops", counted)
    out = train(compose("gpu=cpu", "mode=ultra_fast", f"data.cache_dir='{tmp_path / 'cache'}'",
                        f"run_dir='{tmp_path / 'run'}'", "train.progress=false", "dry_run=true"))  # fmt: skip
    assert len(measured) == 1
    assert out["plan"]["hardware"]["peak_flops"] == measured[0]
