"""Sweeps: CPU multiruns of tiny measuring jobs become tables; an out-of-memory is a result, not a crash."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch

import pufferfish.lab.config  # noqa: F401  (registers the measuring job's config: conf/measure.yaml's schema)
from pufferfish.api import compose_config
from pufferfish.errors import ConfigError
from pufferfish.overrides import check_command_line
from tests.conftest import run_cli

# the table's experiment, shrunk: 8 heads of 8 dims so the rows' 4 kv heads really group
TINY = ["gpu=cpu", "model.num_dims=64", "model.num_heads=8", "model.ffn_dims=128", "model.vocab_size=256",
        "model.seq_len=32", "train.micro_batch=2"]  # fmt: skip
ABSURD = 100_000  # layers: the memory model's peak is far over any machine's cap, so the job is never run


def run_table(name: str, *args) -> subprocess.CompletedProcess:
    return run_cli(f"pufferfish.lab.{name}", *map(str, args), timeout=120)


@pytest.fixture(scope="module")
def memory_sweep(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("memory_sweep")
    done = run_cli("pufferfish.lab.measure", "-m", "experiment=memory_table", *TINY, "experiment/memory@memory=baseline,all_three",
                   f"model.num_layers=1,2,{ABSURD}", f"hydra.sweep.dir={sweep}", timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return sweep


def test_multirun_writes_one_measure_json_per_job_and_out_of_memory_is_a_result(memory_sweep):
    jobs = sorted(p for p in memory_sweep.iterdir() if p.is_dir())
    assert len(jobs) == 6
    for job in jobs:
        record = json.loads((job / "measure.json").read_text())
        assert record["run_dir"] == str(job) and record["measured"] is False  # CPU: the memory model's peak
        assert record["technique"] in ("baseline", "all_three") and record["overrides"]
        if record["num_layers"] == ABSURD:
            assert record["fits"] is False and "predicted out of memory" in record["oom"]
            assert record["tokens_per_s"] is None and record["peak_bytes"] > record["cap_bytes"]
        else:
            assert record["fits"] is True and record["tokens_per_s"] > 0 and record["loss"] > 0
            assert record["peak_bytes"] == record["predicted_peak_bytes"]
            assert record["grad_ckpt"] is (record["technique"] == "all_three")
            assert record["model"]["num_kv_heads"] == (4 if record["technique"] == "all_three" else 8)


def test_memory_table_reads_only_the_jobs_own_files(memory_sweep, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(memory_sweep, sweep)
    job = next(p for p in sweep.iterdir() if p.name.endswith("baseline_L1"))
    stray = json.loads((job / "measure.json").read_text())
    stray["technique"] = "stray_copy"
    (sweep / "copied").mkdir()
    (sweep / "copied" / "measure.json").write_text(json.dumps(stray))  # a copy: not where its job wrote it
    (sweep / "measure.json").write_text("{not json")
    (job / "notes.json").write_text(json.dumps({**stray, "technique": "notes"}))
    (sweep / "9_crashed_L3" / ".hydra").mkdir(parents=True)  # a job that died before writing its result

    done = run_table("memory_table", sweep)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "stray_copy" not in out and "notes" not in out
    impact = out.split("## Memory Usage")[0]
    assert [line.split("|")[1].strip() for line in impact.splitlines() if line.startswith("| ")][1:] == [
        "baseline", "all_three"]  # fmt: skip
    assert "(predicted)" in out and "does not fit" in out and "9_crashed_L3" in out
    assert "30–40 %" not in impact and "60–70 %" in impact  # the claimed figure beside our row
    assert (sweep / "memory_table.md").read_text() == out.rstrip("\n") + "\n"
    assert (sweep / "memory_table.png").stat().st_size > 10_000


def test_a_users_mistake_in_one_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    # gqa's 4 kv heads do not divide 2 heads: a ConfigError would exit the whole multirun at once
    done = run_cli("pufferfish.lab.measure", "-m", "experiment=memory_table", *TINY, "model.num_heads=2",
                   "experiment/memory@memory=gqa,baseline", "model.num_layers=1", f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = {r["technique"]: r for r in map(json.loads, map(lambda p: p.read_text(), tmp_path.glob("*/measure.json")))}
    assert records["gqa"]["fits"] is None and "num_kv_heads=4" in records["gqa"]["error"]
    assert records["baseline"]["fits"] is True


def test_a_measured_step_under_optim_name_auto_runs_the_optimizer_a_run_would(tmp_path):
    """optim.name=auto (the default) names no optimizer to build: the measured step takes the one a run's plan
    chooses (the nominal large corpus: Muon), and records it; a named optimizer is measured as named."""
    import pufferfish.lab.measure as measure_module

    for name, ran in (("auto", "muon"), ("adamw", "adamw")):
        cfg = compose_config([*TINY, "model.num_layers=1", f"optim.name={name}", f"run_dir={tmp_path / name}"], "measure")
        record = measure_module.measure(cfg)
        assert record["optimizer"] == ran and record["fits"] is True and record["tokens_per_s"] > 0


def test_an_out_of_memory_in_the_steps_is_caught_and_recorded(tmp_path, monkeypatch):
    import pufferfish.lab.measure as measure_module
    import pufferfish.step as step_module

    cfg = compose_config(["experiment=memory_table", *TINY, "model.num_layers=1", f"run_dir={tmp_path}"], "measure")

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(step_module, "lm_loss", out_of_memory)
    record = measure_module.measure(cfg)
    assert record["fits"] is False and record["oom"].startswith("CUDA out of memory")
    assert json.loads((tmp_path / "measure.json").read_text())["fits"] is False

    def bug(*args, **kwargs):
        raise RuntimeError("shape mismatch")  # not memory: a bug, raised for Hydra to report

    monkeypatch.setattr(step_module, "lm_loss", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        measure_module.measure(cfg)


def test_predicted_memory_table_has_one_row_per_technique():
    done = run_table("memory_table", "--predicted", "--gpu", "gtx1060")
    assert done.returncode == 0, done.stderr
    impact = done.stdout.split("## Memory Usage")[0]
    rows = [line.split("|")[1].strip() for line in impact.splitlines() if line.startswith("| ")][1:]
    assert rows == ["baseline", "grad_ckpt", "mixed_precision", "gqa", "all_three", "all"]
    assert "Predicted by the memory model" in impact and "(predicted)" in impact and "6.00 GiB" in impact
    assert "[fp32" in impact  # gtx1060 has no bf16 and no fast fp16: mixed precision is fp32 there


def test_the_measuring_job_is_a_command_of_its_own_and_its_settings_are_not_training_settings():
    for argv, said in ((["job=measure"], "job is not a setting of pufferfish.train: the measuring job"),
                       (["train.measure_steps=3"], "measure.steps of python -m pufferfish.lab.measure"),
                       (["-m", "experiment=memory_table"], "runs as python -m pufferfish.lab.measure -m experiment=")):
        with pytest.raises(ConfigError, match=re.escape(said)):
            check_command_line(argv)
    check_command_line(["-m", "experiment=memory_table", "measure.steps=3"], "measure", "pufferfish.lab.measure")
    with pytest.raises(ConfigError, match=r"measure\.stepz is not a setting of pufferfish\.lab\.measure; did you "
                                          r"mean measure\.steps\?"):  # fmt: skip
        check_command_line(["measure.stepz=3"], "measure", "pufferfish.lab.measure")
    cfg = compose_config(["experiment=speed_table"], "measure")
    assert (cfg.measure.steps, cfg.measure.batches) == (28, "data")  # the experiment's, over measure.yaml's own


def test_a_job_is_shaped_and_checkpointed_as_the_planner_would():
    """The memory model's figures for a job are the planner's: its Shape (the card's attention kernel) and
    its checkpointing rule, decided for the card the job is for (here a GPU profile, predicted on the CPU)."""
    from pufferfish.lab.sweep_tools import job_prediction, target_hardware
    from pufferfish.resolver import detect_hardware, make_plan, predict_peak_bytes

    def job(technique: str, gpu: str, layers: int):
        cfg = compose_config(["experiment=memory_table", f"gpu={gpu}", f"experiment/memory@memory={technique}",
                              f"model.num_layers={layers}"], "measure")  # fmt: skip
        hw = detect_hardware(cfg.gpu, cfg.optimizations, "cpu")
        return cfg, hw, job_prediction(cfg, hw, layers, 768, 8, 32000)

    _, _, (_, _, gqa) = job("gqa", "gtx1060", 12)
    _, _, (_, _, mha) = job("baseline", "gtx1060", 12)
    assert gqa.repeated_kv and not gqa.attention_math  # fp32 on Pascal: K/V repeated for the efficient kernel
    assert predict_peak_bytes(gqa).total < predict_peak_bytes(mha).total  # so grouping saves memory, as measured
    for layers, checkpointed in ((12, False), (24, True)):  # optimizations=all: checkpointing only when needed
        cfg, hw, (_, ckpt, _) = job("all", "rtx3060", layers)
        assert ckpt is checkpointed
        assert make_plan(cfg, target_hardware(cfg, hw), 32000, 10**9).grad_ckpt is checkpointed


def test_bisection_finds_the_largest_depth_that_fits_in_few_probes():
    from pufferfish.lab.sweep_tools import bisect_max_layers

    probes = []

    def fits(layers):
        probes.append(layers)
        return layers <= 17

    known = {12: True, 24: False}  # the sweep's own jobs
    assert bisect_max_layers(fits, known, guess=17) == 17 and probes == [17, 18]
    probes.clear()
    assert bisect_max_layers(fits, {}, guess=3) == 17 and len(probes) <= 10  # no bracket: gallop, then halve
    assert bisect_max_layers(lambda L: False, {}, guess=5) == 0


def test_speed_table_pairs_jobs_into_improvements(tmp_path):
    done = run_cli("pufferfish.lab.measure", "-m", "experiment=speed_table", *TINY, "model.num_layers=1",
                   "model.num_kv_heads=4", "measure.batches=random", "measure.steps=3",
                   "experiment/speed@speed=reference,mixed_precision", f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = run_table("speed_table", tmp_path)
    assert table.returncode == 0, table.stderr
    assert "| mixed precision |" in table.stdout and "x |" in table.stdout and "faster (no figure)" in table.stdout
    assert (tmp_path / "speed_table.png").exists()


def test_measured_sweep_gets_bisected_max_layers_from_probe_jobs(tmp_path, monkeypatch):
    """The GPU side without a GPU: jobs' records as CUDA writes them, probes faked where they would run."""
    import pufferfish.lab.sweep_tools as st
    from pufferfish.lab import memory_table

    cap, fitting = 6 * st.GIB, {"baseline": 13, "grad_ckpt": 30}

    def record(technique: str, layers: int, job_dir) -> dict:
        job_dir.mkdir(parents=True)
        peak = int(0.5 * st.GIB * (layers - fitting[technique]) + cap - 1)  # crosses the cap after `fitting`
        r = {"schema": st.SCHEMA, "run_dir": str(job_dir), "technique": technique, "num_layers": layers,
             "fits": peak <= cap, "measured": True, "peak_bytes": peak, "peak_uncapped": peak > cap,
             "predicted_peak_bytes": peak, "predicted_max_layers": fitting[technique] - 2, "cap_bytes": cap,
             "grad_ckpt": technique == "grad_ckpt", "precision": "fp32", "device_name": "NVIDIA H200",
             "profile": "gtx1060", "micro_batch": 8, "choices": {}, "overrides": [f"experiment/memory@memory={technique}"],
             "model": {"num_dims": 768, "num_heads": 12, "ffn_dims": 2048, "vocab_size": 32000, "seq_len": 512}}  # fmt: skip
        (job_dir / "measure.json").write_text(json.dumps(r))
        (job_dir / ".hydra").mkdir()
        return r

    for i, (t, L) in enumerate([(t, L) for t in fitting for L in (12, 24)]):
        record(t, L, tmp_path / f"{i}_{t}_L{L}")
    probed = []

    def fake_probe(overrides, layers, job_dir, timeout=0):
        probed.append((overrides[0].split("=")[1], layers))
        return record(overrides[0].split("=")[1], layers, job_dir)

    monkeypatch.setattr(st, "probe", fake_probe)
    records, failed = st.read_jobs(tmp_path)
    assert st.search_max_layers(tmp_path, records, minutes=1e-9) == {"baseline": None, "grad_ckpt": None}
    assert not probed  # past the deadline no probe starts
    assert st.search_max_layers(tmp_path, records, workers=2) == fitting and not failed
    assert len(probed) <= 8  # the linear guess from the 12- and 24-layer peaks lands next to the answer
    md, _ = memory_table.render(*st.read_jobs(tmp_path))
    assert "| 13 (bisected) | 8 | 11 |" in md and "| 30 (bisected) | 12 | 28 |" in md
    assert "Measured on NVIDIA H200" in md and "does not fit; needed uncapped" in md
    assert "max_layers/probe_baseline_L14" in {r["job_dir"] for r in st.read_jobs(tmp_path)[0]}


def test_the_batch_sweep_trains_every_batch_on_the_same_tokens_at_each_optimizers_planned_rates():
    from pufferfish.resolver import detect_hardware, make_plan
    from tests.conftest import ROOT, compose

    make = (ROOT / "Makefile").read_text()
    pairs = [tuple(map(int, p.split(":"))) for p in re.search(r"for bs in ([\d: ]+); do", make).group(1).split()]
    assert len(pairs) >= 4 and len({b * s for b, s in pairs}) == 1  # batch tokens x steps: the same at every batch
    plans = {}
    for b, s in pairs:
        for name in ("adamw", "muon"):
            cfg = compose("experiment=optimizer_batch", "gpu=rtx3060", f"optim.name={name}",
                          f"train.batch_tokens={b}", f"train.max_steps={s}", f"train.eval_interval={s // 8}")  # fmt: skip
            plan = plans[name, b] = make_plan(cfg, detect_hardware(cfg.gpu, cfg.optimizations, cfg.train.device),
                                              8192, 10**8)  # fmt: skip
            assert (plan.batch_tokens, plan.steps, plan.model["num_dims"]) == (b, s, 128)
            assert plan.optimizer["name"] == name
    for name in ("adamw", "muon"):  # the rates do not move with the batch: only the batch differs
        assert len({(plans[name, b].lr, plans[name, b].optimizer.get("muon_lr")) for b, _ in pairs}) == 1
