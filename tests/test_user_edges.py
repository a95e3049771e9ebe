"""What a new user meets at the edges, through the real entry points: each bad input is one line on stderr,
exit status 2, no traceback, and nothing lost or left behind; a run stops for a reason it names, and ends
on its time budget when its steps are slower than the plan expected.

Everything here trains on text written by the test itself (the interpreter's own library source), so it
needs nothing outside the repository.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from pufferfish import ModelConfig, Trainer
from pufferfish.errors import ConfigError, PufferfishError
from tests.conftest import ROOT, compose, run_cli


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    source = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join(p.read_text(errors="ignore") for p in sorted(source.glob("[a-m]*.py"))[:40])
    path = tmp_path_factory.mktemp("corpus") / "stdlib.txt"
    path.write_text(text)  # about 1 MB of real text
    return path


def small(corpus: Path, cache: Path, *extra: str) -> list[str]:
    return ["gpu=cpu", "mode=ultra_fast", "data=text_files", f"data.paths=['{corpus}']", "data.vocab_size=512",
            "data.tokenizer_train_mb=1", f"data.cache_dir='{cache}'", "train.progress=false", "train.sample_tokens=8",
            "train.eval_tokens=1024", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, cache_dir) -> Path:
    """A real 12-step run: the checkpoint that generate and export read."""
    run = tmp_path_factory.mktemp("trained") / "run"
    result = run_cli("pufferfish.train", *small(corpus, cache_dir, "train.max_steps=12"), f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-2000:]
    return run


def one_line_error(result: subprocess.CompletedProcess, pattern: str) -> str:
    """Exit 2, no traceback, and exactly one line on stderr, matching the pattern."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pufferfish: error: ") and re.search(pattern, lines[0]), lines[0]
    return lines[0]


def in_tmp(tmp_path: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    """The command run in an empty working folder (with this checkout importable): what it leaves is visible."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)  # fmt: skip


# ---------------------------------------------------------------- train: Hydra's own errors


HYDRA_CASES = {  # overrides: what the line must say
    "unknown_option": (["gpu=rtx9999"], r"gpu=rtx9999 is not an option of gpu; choose one of: .*gtx1060.*rtx3060"),
    "misspelled_key": (["mode.target_hour=1"], r"mode\.target_hour is not a setting.*did you mean mode\.target_hours\?"),
    "wrong_type": (["model.num_layers=abc"], r"model\.num_layers=abc.*'abc'.*Integer"),
    "unparsable": (["data.prompt=f(x"], r"'data\.prompt=f\(x' cannot be read as key=value.*quote"),
    "null_group": (["model=null"], r"model=null: a config group needs an option name"),
    "slurm": (["-m", "hydra/launcher=submitit_slurm"], r"submitit_slurm needs SLURM.*sbatch"),
    "out_of_range": (["mode.target_hours=-1"], r"mode\.target_hours=-1"),
}


@pytest.mark.parametrize("name", sorted(HYDRA_CASES))
def test_train_answers_a_bad_override_in_one_line_and_leaves_no_folder(tmp_path, name):
    overrides, pattern = HYDRA_CASES[name]
    one_line_error(in_tmp(tmp_path, "pufferfish.train", "gpu=cpu", *overrides), pattern)
    assert not list(tmp_path.iterdir()), list(tmp_path.rglob("*"))  # no outputs/DATE/TIME folder


def test_an_unwritable_run_folder_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    one_line_error(in_tmp(tmp_path, "pufferfish.train", "gpu=cpu", f"hydra.run.dir={blocker}/run"),
                   r"hydra\.run\.dir=.*cannot be created")  # fmt: skip


def test_a_run_that_fails_on_its_data_leaves_no_folder_and_a_good_one_logs_its_console(tmp_path, corpus, cache_dir):
    missing = in_tmp(tmp_path, "pufferfish.train", *small(corpus, cache_dir, f"data.paths=['{tmp_path}/nowhere.txt']"))
    one_line_error(missing, r"nowhere\.txt' does not exist")
    assert not (tmp_path / "outputs").exists(), list(tmp_path.rglob("*"))
    good = in_tmp(tmp_path, "pufferfish.train", *small(corpus, cache_dir, "train.max_steps=3"))
    assert good.returncode == 0, good.stderr[-2000:]
    (log,) = tmp_path.glob("outputs/*/*/train.log")
    last = good.stdout.strip().splitlines()[-1]
    assert last in log.read_text() and "step 3/3" in last  # the console's last line, in the log


# ---------------------------------------------------------------- max_steps and the stop line


def test_max_steps_runs_exactly_that_many_steps_with_the_schedule_complete_past_the_budget(tmp_path, corpus, cache_dir):
    """A budget of 0.36 s cannot hold 40 steps; with train.max_steps the budget only reports."""
    result = run_cli("pufferfish.train", *small(corpus, cache_dir, "train.max_steps=40", "mode.target_hours=0.0001",
                                                "train.log_interval=1"), f"hydra.run.dir={tmp_path}/run")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert re.match(r"done \(train\.max_steps reached, schedule complete\): step 40/40, .* of a 0 s budget", last), last
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    floor = plan["lr"] * plan["schedule"]["min_lr_ratio"]  # the default: zero, at the end of its decay
    assert len(lrs) == 40 and max(lrs) == plan["lr"] and lrs[-1] == pytest.approx(floor, abs=0.05 * plan["lr"])


def test_every_run_says_why_it_stopped(tmp_path, corpus, cache_dir):
    result = run_cli("pufferfish.train", *small(corpus, cache_dir, "train.max_steps=6", "train.stop_at_step=2"),
                     f"hydra.run.dir={tmp_path}/run")  # fmt: skip
    assert result.stdout.strip().splitlines()[-1].startswith("stopped (train.stop_at_step reached): step 2/6")


# ---------------------------------------------------------------- generate and export


GENERATE_CASES = {
    "no_checkpoint": ([], r"checkpoint= is required"),
    "negative_top_k": (["top_k=-3"], r"top_k=-3 is not allowed; give a whole number >= 0"),
    "negative_temperature": (["temperature=-1"], r"temperature=-1 is not allowed; give a number from 0"),
    "absurd_length": (["max_new_tokens=100000"], r"max_new_tokens=100000 is far beyond .* allowed: 1 to \d+"),
    "prompt_with_paren": (["prompt=print(1"], r"cannot be read as key=value.*quote"),
    "long_prompt": (["prompt='" + "word " * 400 + "'"], r"the prompt is \d+ tokens but this model reads at most"),
    "misspelled": (["checkpoint=x", "temprature=1"], r"temprature is not a setting.*did you mean temperature\?"),
}


@pytest.mark.parametrize("name", sorted(GENERATE_CASES))
def test_generate_answers_bad_input_in_one_line(trained, name):
    args, pattern = GENERATE_CASES[name]
    with_checkpoint = [] if name in ("no_checkpoint", "misspelled") else [f"checkpoint={trained}"]
    one_line_error(run_cli("pufferfish.generate", *with_checkpoint, *args), pattern)


def test_export_without_out_or_into_an_unwritable_folder_is_one_line(trained, tmp_path):
    one_line_error(run_cli("pufferfish.export", f"checkpoint={trained}"), r"out= is required")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    one_line_error(run_cli("pufferfish.export", f"checkpoint={trained}", f"out={blocker}/hf"),
                   r"out=.*cannot be written")  # fmt: skip
    if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses it all the same
        read_only = Path("/sys/pufferfish-export")
    else:
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o555)
    one_line_error(run_cli("pufferfish.export", f"checkpoint={trained}", f"out={read_only}/hf"),
                   r"out=.*cannot be written")  # fmt: skip


def test_export_writes_files_with_the_usual_permissions(trained, tmp_path):
    result = run_cli("pufferfish.export", f"checkpoint={trained}", f"out={tmp_path}/hf")
    assert result.returncode == 0, result.stderr[-2000:]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o777 == (tmp_path / "hf" / "config.json").stat().st_mode & 0o777


def copy_run(trained: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(trained, to)
    return to


def best_weights_are_used_while_intact(run):
    """A run directory hands over checkpoints/best.pt, whatever the step checkpoints' state; without it
    (a run stopped before its first evaluation) the step checkpoints are what is left."""
    best = run / "checkpoints" / "best.pt"
    result = run_cli("pufferfish.generate", f"checkpoint={run}", "max_new_tokens=2")
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr[-2000:]
    best.unlink()
    Path(f"{best}.sha256").unlink()


def test_a_damaged_latest_checkpoint_never_becomes_an_untrained_model(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    ckpts = sorted((run / "checkpoints").glob("step_*.pt"))
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    for ckpt in ckpts:  # only the initial step-0 checkpoint stays intact
        if ckpt.name != "step_00000000.pt":
            ckpt.write_bytes(ckpt.read_bytes()[:1000])
    best_weights_are_used_while_intact(run)
    for module, extra in (("pufferfish.generate", ["max_new_tokens=2"]), ("pufferfish.export", [f"out={tmp_path}/hf"])):
        line = one_line_error(run_cli(module, f"checkpoint={run}", *extra), rf"{latest.name}.*untrained initial model")
        assert "checkpoint=" in line.split("name it:")[-1]  # says how to use it anyway
    assert not (tmp_path / "hf").exists()
    named = run_cli("pufferfish.generate", f"checkpoint={run}/checkpoints/step_00000000.pt", "max_new_tokens=2")
    assert named.returncode == 0, named.stderr[-2000:]  # named by the user: used


def test_a_damaged_latest_falls_back_to_a_trained_checkpoint_and_says_which(tmp_path, corpus, cache_dir):
    run = tmp_path / "run"
    overrides = small(corpus, cache_dir, "train.max_steps=6", "train.ckpt_interval_s=0", f"hydra.run.dir={run}")
    assert run_cli("pufferfish.train", *overrides).returncode == 0
    (run / "checkpoints" / "step_00000006.pt").write_bytes(b"overwritten")
    best_weights_are_used_while_intact(run)
    result = run_cli("pufferfish.generate", f"checkpoint={run}", "max_new_tokens=2")
    assert result.returncode == 0, result.stderr[-2000:]
    warning = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warning) == 1 and re.match(r"pufferfish: warning: .*step_00000006\.pt.*Using step_00000005\.pt", warning[0])


# ---------------------------------------------------------------- the Python API


def test_the_api_answers_bad_input_with_one_message_and_leaves_no_folder(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"did you mean mode\.target_hours\?"):
        Trainer(target_hours=0.005, gpu="cpu", overrides=["mode.target_hour=1"])
    with pytest.raises(ConfigError, match=r"gpu=rtx9999 is not an option of gpu"):
        Trainer(target_hours=0.005, gpu="rtx9999")
    with pytest.raises(PufferfishError, match=r"nowhere\.txt' does not exist") as error:
        Trainer(target_hours=0.005, gpu="cpu", dataset_path=tmp_path / "nowhere.txt").train()
    assert "\n" not in str(error.value)
    assert not (tmp_path / "outputs").exists(), list(tmp_path.rglob("*"))
    trainer = Trainer(target_hours=0.005, gpu="cpu", run_dir=tmp_path / "never_trained")
    with pytest.raises(PufferfishError, match=r"top_k=-1 is not allowed"):
        trainer.generate("x", top_k=-1)


# ---------------------------------------------------------------- the time budget on a loaded CPU


def snippet_trainer(corpus: Path, cache: Path, run_dir: Path) -> Trainer:
    """The README's Python API example, on the test's own text, at 0.005 h (18 s)."""
    config = ModelConfig(num_layers=4, num_dims=256, num_heads=4, vocab_size=8192)
    config.update({"use_moe": True, "moe_num_experts": 4, "moe_active_experts": 2, "use_lossfreebalance": True})
    return Trainer(config=config, dataset_path=str(corpus), target_hours=0.005, run_dir=run_dir,
                   overrides=[f"data.cache_dir='{cache}'", "train.progress=false"])  # fmt: skip


@pytest.mark.slow
def test_the_readme_api_example_ends_within_a_tenth_of_its_budget_with_a_core_busy(tmp_path, corpus, cache_dir):
    snippet_trainer(corpus, cache_dir, tmp_path / "warm").plan()  # the tokenizer and token cache, made once
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # another process loads one core
    try:
        trainer = snippet_trainer(corpus, cache_dir, tmp_path / "run")
        t = time.perf_counter()
        result = trainer.train()
        total = time.perf_counter() - t
    finally:
        hog.kill()
        hog.wait()
    budget = 0.005 * 3600
    assert result["finished"] and result["step"] > 1, result
    assert abs(total - budget) <= 0.1 * budget, (total, result)


@pytest.mark.slow
def test_a_run_whose_steps_are_slower_than_planned_still_ends_on_its_budget(tmp_path, corpus, cache_dir, monkeypatch):
    """Every step made 0.15 s slower than the speed the plan was made with: the run re-plans from its
    measured steps, ends within a tenth of its budget, and its schedule still completes."""
    import pufferfish.step as step_module
    import pufferfish.train as train_module

    real_loss = step_module.lm_loss

    def slow_loss(*args, **kwargs):
        time.sleep(0.15)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(step_module, "lm_loss", slow_loss)
    cfg = compose(*small(corpus, cache_dir, "mode.target_hours=0.004", f"run_dir='{tmp_path}/run'"))
    t = time.perf_counter()
    result = train_module.train(cfg)
    total = time.perf_counter() - t
    assert result["finished"] and abs(total - 14.4) <= 1.44, (total, result)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert "re-planned" in plan["reasons"]["steps"]
