"""Faults injected into real runs: each is survived exactly, or ends in one clear message with the run intact.

Nothing under test is mocked; the faults are injected (a damaged file, a signal, a NaN loss, an
out-of-memory error, a failing write) into the real training function on real text.
"""

import errno
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pufferfish.checkpoint as ckpt
from pufferfish.errors import CheckpointError, ConfigError, OutOfMemoryError, PufferfishError
from pufferfish.reliability import (
    DivergedError,
    PendingSteps,
    StopFlag,
    finite_on_device,
    is_out_of_memory,
    skip_on_device,
)
from pufferfish.runlog import read_metrics
from pufferfish.train import train
from tests.conftest import ROOT, compose, tiny_overrides

# twelve one-micro-batch steps (two with accumulation) of a one-layer model: about a second on 2 CPU cores
SHORT = ("train.max_steps=12", "train.log_interval=1", "train.eval_interval=4", "train.batch_tokens=256",
         "train.micro_batch=2", "train.sample_tokens=0")  # fmt: skip


def losses(run: Path) -> list[tuple]:
    return [(r["kind"], r["step"], r.get("train_loss"), r.get("val_loss"))
            for r in read_metrics(run / "metrics.jsonl") if r["kind"] in ("train", "eval")]  # fmt: skip


def kinds(run: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == kind]


def last_checkpoint(run: Path) -> dict:
    return ckpt.load_latest(run / "checkpoints")[0]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_dir) -> Path:
    """The uninterrupted SHORT run every interrupted one is compared with."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(compose(*tiny_overrides(run, cache_dir, *SHORT)))
    return run


def inject(monkeypatch, fault) -> None:
    """Wrap the loop's lm_loss: fault(call_number, x) may return "nan", raise, or return None (no fault)."""
    import pufferfish.step as loop

    real, calls = loop.lm_loss, itertools.count(1)

    def lm_loss(model, x, y, *args, **kwargs):
        action = fault(next(calls), x)
        loss = real(model, x, y, *args, **kwargs)
        return loss * float("nan") if action == "nan" else loss

    monkeypatch.setattr(loop, "lm_loss", lm_loss)


# ---------------------------------------------------------------- 1. crash-safe checkpoints


def tiny_state(step: int) -> dict:
    return {"step": step, "weights": torch.full((256,), float(step))}


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "bit_flipped":
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    elif how == "no_checksum":
        Path(f"{path}.sha256").unlink()


@pytest.mark.parametrize("how", ["truncated", "bit_flipped", "no_checksum"])
def test_damaged_newest_checkpoint_is_detected_and_the_previous_one_used(tmp_path, how):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, tiny_state(step), step)
    damage(tmp_path / "step_00000003.pt", how)
    with pytest.warns(UserWarning, match=r"step_00000003\.pt .*(checksum).*Using step_00000002\.pt"):
        state, path = ckpt.load_latest(tmp_path)
    assert path.name == "step_00000002.pt" and state["step"] == 2
    assert (tmp_path / "step_00000003.pt").exists()  # evidence is kept, never deleted
    with pytest.warns(UserWarning, match="Using step_00000002.pt"):  # what `generate checkpoint=RUN_DIR` loads
        assert ckpt.resolve_checkpoint_path(tmp_path) == tmp_path / "step_00000002.pt"


def test_no_usable_checkpoint_is_one_clear_error_and_the_files_stay(tmp_path):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, tiny_state(step), step)
        damage(tmp_path / f"step_{step:08d}.pt", "truncated")
    with pytest.raises(CheckpointError, match="no usable checkpoint .*Start a new run directory"):
        ckpt.load_latest(tmp_path)
    assert len(ckpt.checkpoint_files(tmp_path)) == 2


def test_keep_last_k_checkpoints(tmp_path):
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path / "k2", tiny_state(step), step, keep=2)
        ckpt.save_checkpoint(tmp_path / "all", tiny_state(step), step, keep=0)
    assert [f.name for f in ckpt.checkpoint_files(tmp_path / "k2")] == ["step_00000004.pt", "step_00000005.pt"]
    assert sorted(p.name for p in (tmp_path / "k2").glob("*.sha256")) == ["step_00000004.pt.sha256",
                                                                         "step_00000005.pt.sha256"]  # fmt: skip
    assert len(ckpt.checkpoint_files(tmp_path / "all")) == 5  # keep=0 keeps every one


def test_crash_between_checkpoint_and_pointer_keeps_the_old_pointer(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, tiny_state(1), 1)
    real = ckpt.atomic_write_text

    def dies_at_the_pointer(path, text):
        if Path(path).name == ckpt.POINTER:
            raise OSError(errno.EIO, "simulated power cut")
        real(path, text)

    monkeypatch.setattr(ckpt, "atomic_write_text", dies_at_the_pointer)
    with pytest.raises(CheckpointError, match="simulated power cut.*step_00000001.pt, is intact"):
        ckpt.save_checkpoint(tmp_path, tiny_state(2), 2)
    assert (tmp_path / "step_00000002.pt").exists()  # written, but never pointed at
    assert (tmp_path / ckpt.POINTER).read_text().strip() == "step_00000001.pt"
    state, path = ckpt.load_latest(tmp_path)
    assert path.name == "step_00000001.pt" and state["step"] == 1


def test_disk_full_while_writing_a_checkpoint_leaves_the_previous_intact(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, tiny_state(1), 1)
    real_save = torch.save

    def fills_the_disk(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", fills_the_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*step_00000001.pt, is intact.*resume"):
        ckpt.save_checkpoint(tmp_path, tiny_state(2), 2)
    monkeypatch.setattr(torch, "save", real_save)
    assert not list(tmp_path.glob(".*tmp*"))  # the partial file is removed
    assert ckpt.load_latest(tmp_path)[0]["step"] == 1


def test_resume_skips_a_truncated_newest_checkpoint_and_reproduces_the_run(tmp_path, cache_dir, straight):
    run = tmp_path / "run"
    overrides = tiny_overrides(run, cache_dir, *SHORT, "train.ckpt_interval_s=0")  # a checkpoint every step
    train(compose(*overrides, "train.stop_at_step=7"))
    damage(run / "checkpoints" / "step_00000007.pt", "truncated")  # as if the machine died mid-write
    with pytest.warns(UserWarning, match="step_00000007.pt does not match its checksum.*Using step_00000006.pt"):
        result = train(compose(*overrides))
    assert result["finished"] and losses(run) == losses(straight)


# ---------------------------------------------------------------- 2. exact resume


def test_rng_state_round_trip():
    import random

    state = ckpt.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3).tolist())
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(3).tolist()) == first


def test_every_piece_of_state_is_restored(tmp_path, cache_dir):
    # log_interval=5 with a stop at 7: the logging window is cut in two by the interruption as well
    common = (*SHORT, "train.log_interval=5", "train.batch_tokens=512")  # two micro-steps a step
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    train(compose(*tiny_overrides(whole, cache_dir, *common)))
    train(compose(*tiny_overrides(broken, cache_dir, *common, "train.stop_at_step=7")))
    train(compose(*tiny_overrides(broken, cache_dir, *common)))
    assert losses(whole) == losses(broken)
    a, b = last_checkpoint(whole), last_checkpoint(broken)
    assert a.keys() == b.keys()
    for key in ("step", "tokens", "sample", "skipped_steps", "window", "val_tokens", "model_config"):
        assert a[key] == b[key], key
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])  # AdamW moments, step
    assert a["scaler"] == b["scaler"]
    assert a["rng"]["python"] == b["rng"]["python"] and torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert all(np.array_equal(x, y) for x, y in zip(a["rng"]["numpy"], b["rng"]["numpy"]))


def test_a_run_made_before_optim_name_and_qk_norm_existed_resumes_exactly(tmp_path, cache_dir):
    """Its config.yaml, plan.json and checkpoint lack optim.name, optim.muon_lr and model.qk_norm: they count as
    what it ran with (AdamW, no qk-norm), so its own settings resume it, optim.name=auto among them (its frozen plan
    keeps AdamW); today's default schedule (WSD) is refused with the settings it had named."""
    import yaml

    old = ("optim.name=adamw", "optim.schedule=cosine", "optim.min_lr_ratio=0.1", "optim.decay_frac=0.2")
    straight = tmp_path / "straight"
    train(compose(*tiny_overrides(straight, cache_dir, *SHORT, *old)))
    run = tmp_path / "run"
    train(compose(*tiny_overrides(run, cache_dir, *SHORT, *old, "train.stop_at_step=5")))
    config = yaml.safe_load((run / "config.yaml").read_text())
    del config["optim"]["name"], config["optim"]["muon_lr"], config["model"]["qk_norm"]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    plan = json.loads((run / "plan.json").read_text())
    del plan["optimizer"]["name"], plan["model"]["qk_norm"]
    (run / "plan.json").write_text(json.dumps(plan))
    state, path = ckpt.load_latest(run / "checkpoints")
    del state["model_config"]["qk_norm"]
    ckpt.save_checkpoint(run / "checkpoints", state, state["step"])
    with pytest.raises(ConfigError, match=r"different optim \(it had optim\.decay_frac=0\.2 "
                                          r"optim\.min_lr_ratio=0\.1 optim\.schedule=cosine\)"):  # fmt: skip
        train(compose(*tiny_overrides(run, cache_dir, *SHORT)))
    with pytest.raises(ConfigError, match=r"different optim \(it had optim\.name=adamw\)"):
        train(compose(*tiny_overrides(run, cache_dir, *SHORT, *old[1:], "optim.name=muon")))
    result = train(compose(*tiny_overrides(run, cache_dir, *SHORT, *old[1:])))  # optim.name=auto
    assert result["finished"] and losses(run) == losses(straight)
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["name"] == "auto"  # and its plan's AdamW:
    with pytest.raises(ConfigError, match=r"different optim \(it had optim\.name=adamw\)"):
        train(compose(*tiny_overrides(run, cache_dir, *SHORT, *old[1:], "optim.name=muon")))
    assert "qk_norm" not in ckpt.load_latest(run / "checkpoints")[0]["model_config"]  # the resumed plan's model
    (run / "plan.json").unlink()  # no plan: the checkpoint's own model config is checked against a new plan
    assert train(compose(*tiny_overrides(run, cache_dir, *SHORT, *old)))["step"] == 12  # nothing left to train


def test_a_plan_without_the_loop_settings_resumes_with_the_configs_not_the_defaults(tmp_path, cache_dir):
    """A plan.json from before the plan kept the optimizer, schedule and clipping: the resumed part runs the
    config's (a constant schedule here, not the default cosine), and plan.json gets them back for the ranks."""
    run = tmp_path / "run"
    settings = ("optim.name=adamw", "optim.schedule=constant", "optim.warmup_frac=0.0", "optim.lr=2e-3",
                "optim.grad_clip=0.5")  # AdamW: the only optimizer when plans did not keep these  # fmt: skip
    train(compose(*tiny_overrides(run, cache_dir, *SHORT, *settings, "train.stop_at_step=5")))
    plan = json.loads((run / "plan.json").read_text())
    for key in ("optimizer", "schedule", "grad_clip", "chunked_loss", "loss_chunk_tokens", "prefetch_batches",
                "ddp_graphs"):
        del plan[key]
    (run / "plan.json").write_text(json.dumps(plan))
    train(compose(*tiny_overrides(run, cache_dir, *SHORT, *settings)))
    assert {r["lr"] for r in kinds(run, "train") if r["step"] > 5} == {2e-3}  # cosine would have decayed it
    resumed = json.loads((run / "plan.json").read_text())
    assert resumed["schedule"]["schedule"] == "constant" and resumed["grad_clip"] == 0.5


def test_elapsed_time_carries_over_and_the_budget_counts_across_resumes(tmp_path, cache_dir):
    run = tmp_path / "run"
    # a 7.2 s budget: the run plans its steps from it, and the time guard ends the resumed part
    common = ("mode.target_hours=0.002", "train.batch_tokens=256", "train.micro_batch=2",
              "train.log_interval=1", "train.eval_interval=100000", "train.sample_tokens=0")  # fmt: skip
    train(compose(*tiny_overrides(run, cache_dir, *common, "train.stop_at_step=3")))
    state, path = ckpt.load_latest(run / "checkpoints")
    assert state["step"] == 3 and state["elapsed_s"] > 0
    budget = 0.002 * 3600
    state["elapsed_s"] = budget - 1.5  # as if the earlier part of the run had used all but 1.5 s
    ckpt.save_checkpoint(run / "checkpoints", state, 3)
    result = train(compose(*tiny_overrides(run, cache_dir, *common)))
    assert result["stopped_by"] == "time budget" and result["finished"]
    # the budget is the whole run's, not this part's: the resumed steps' clock starts at the checkpoint's
    # elapsed time and the loop ends within the 1.5 s left (a fresh clock would have run for the whole 7.2 s)
    assert budget - 1.5 < result["elapsed_s"] < budget + 1.0
    resumed = [r for r in kinds(run, "train") if r["step"] > 3]
    assert resumed and resumed[0]["elapsed_s"] > budget - 1.5


# ---------------------------------------------------------------- 3. preemption


def test_requeue_exit_is_the_code_submitit_requeues_on():
    from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

    assert StopFlag.REQUEUE_EXIT == LOCAL_REQUEUE_RETURN_CODE == 144


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGUSR2"])
def test_signal_saves_at_the_step_boundary_then_hands_on_and_resumes_exactly(tmp_path, cache_dir, monkeypatch,
                                                                            straight, sig):  # fmt: skip
    run = tmp_path / "run"
    signum = getattr(signal, sig)
    seen = []

    def launcher_handler(num, frame):  # what submitit installs for SIGUSR2: it runs once our checkpoint exists
        seen.append((num, last_checkpoint(run)["step"]))
        raise SystemExit(StopFlag.REQUEUE_EXIT)

    previous = signal.signal(signum, launcher_handler if sig == "SIGUSR2" else signal.SIG_DFL)
    try:
        inject(monkeypatch, lambda call, x: os.kill(os.getpid(), signum) if call == 5 else None)
        with pytest.raises(SystemExit) as stopped:
            train(compose(*tiny_overrides(run, cache_dir, *SHORT)))
        assert signal.getsignal(signum) in (launcher_handler, signal.SIG_DFL)  # ours is gone again
    finally:
        signal.signal(signum, previous)
    assert stopped.value.code == StopFlag.REQUEUE_EXIT
    assert last_checkpoint(run)["step"] == 5  # the step in flight was finished, then saved
    assert seen == ([(signum, 5)] if sig == "SIGUSR2" else [])
    monkeypatch.undo()
    assert train(compose(*tiny_overrides(run, cache_dir, *SHORT)))["finished"]
    assert losses(run) == losses(straight)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):  # a process that ended while we looked
            continue
    return found


def wait_for_train_lines(run: Path, count: int, alive, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and alive():
        metrics = run / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count('"kind": "train"') >= count:
            return
        time.sleep(0.02)


PREEMPT = ("mode.target_hours=1", "train.max_steps=150", "train.log_interval=1", "train.eval_interval=50", "train.batch_tokens=256",
           "train.micro_batch=2", "train.sample_tokens=0")  # fmt: skip


# The PREEMPT runs are compared to the last bit, and a matmul's sums depend on how many threads share them:
# every PREEMPT run is a process of its own with this environment, never the test process (whose thread
# count earlier tests or the way the suite was started may have changed).
SAME_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def preempt_command(run: Path, cache_dir: Path) -> list[str]:
    return [sys.executable, "-m", "pufferfish.train", *tiny_overrides(run, cache_dir, *PREEMPT), f"hydra.run.dir={run}"]


@pytest.fixture(scope="module")
def preempt_reference(tmp_path_factory, cache_dir) -> Path:
    """The uninterrupted PREEMPT run that the signalled subprocess and submitit job are compared with."""
    run = tmp_path_factory.mktemp("preempt") / "whole"
    proc = subprocess.run(preempt_command(run, cache_dir), cwd=ROOT, env={**os.environ, **SAME_THREADS},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


@pytest.mark.parametrize("sig, exit_code, message", [
    (signal.SIGTERM, StopFlag.REQUEUE_EXIT, "SIGTERM: checkpoint saved"),  # preemption: exit for a requeue
    (signal.SIGINT, 130, "checkpoint saved; run the same command again to resume"),  # the first Ctrl-C
])  # fmt: skip
def test_signal_mid_run_saves_at_the_step_boundary_and_the_same_command_resumes_exactly(
    tmp_path, cache_dir, preempt_reference, sig, exit_code, message
):
    run = tmp_path / "cli"
    args, env = preempt_command(run, cache_dir), {**os.environ, **SAME_THREADS}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_train_lines(run, 3, alive=lambda: proc.poll() is None)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == exit_code, err[-2000:]
    assert "Traceback" not in err and message in err
    stopped_at = last_checkpoint(run)["step"]
    assert 3 <= stopped_at < 150  # saved past the start, before the end
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert losses(run) == losses(preempt_reference)  # nothing lost, nothing repeated


try:
    import cloudpickle
    import submitit

    class TrainJob(submitit.helpers.Checkpointable):
        """train(cfg) as a submitit job; submitit requeues it with the same arguments after its signal."""

        def __call__(self, overrides: list[str]) -> int:
            from pufferfish.api import compose_config
            from pufferfish.train import train

            return train(compose_config(overrides))["step"]

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # pytest's module name is not importable there
except ImportError:  # pragma: no cover
    submitit = None


@pytest.mark.skipif(submitit is None or not Path("/proc/self/stat").exists(), reason="needs submitit and /proc")
def test_submitit_local_job_is_preempted_requeued_by_submitit_and_resumed_exactly(tmp_path, cache_dir,
                                                                                 preempt_reference, monkeypatch):  # fmt: skip
    run = tmp_path / "job"
    for name, value in SAME_THREADS.items():  # submitit starts the job with this process's environment
        monkeypatch.setenv(name, value)
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=10)
    job = executor.submit(TrainJob(), tiny_overrides(run, cache_dir, *PREEMPT))
    wait_for_train_lines(run, 3, alive=lambda: not job.done())
    [task] = children(int(job.job_id))  # submitit's controller runs the task as its child
    os.kill(task, signal.SIGUSR2)  # the signal submitit's job environment treats as preemption
    assert job.result() == 150  # waits for the requeued attempt; raises if submitit gave up
    log = job.stdout() + (job.stderr() or "")
    assert "SIGUSR2: checkpoint saved; exiting with 144" in log and "Requeued job" in log, log[-3000:]
    assert log.count("resuming step_") == 1
    assert losses(run) == losses(preempt_reference)


# ---------------------------------------------------------------- 4. non-finite loss


def test_fp16_overflow_is_left_to_the_grad_scaler():
    inf, nan, one = torch.tensor(float("inf")), torch.tensor(float("nan")), torch.tensor(1.0)
    assert finite_on_device(one, inf, scaler_enabled=True)  # the scaler skips it and lowers its scale
    assert not finite_on_device(one, inf, scaler_enabled=False)
    assert not finite_on_device(nan, one, scaler_enabled=True)  # a NaN loss is ours, scaler or not
    pending = PendingSteps()  # what the host reads back at a log line
    pending.add(4, torch.tensor(2.5), torch.tensor(0.5), finite_on_device(torch.tensor(2.5), torch.tensor(0.5)))
    assert pending.read() == [(4, 2.5, 0.5, True)] and pending.read() == []


def test_a_nan_step_is_skipped_counted_and_logged(tmp_path, cache_dir, monkeypatch, straight):
    run = tmp_path / "run"
    inject(monkeypatch, lambda call, x: "nan" if call == 5 else None)
    result = train(compose(*tiny_overrides(run, cache_dir, *SHORT)))
    assert result["finished"] and result["skipped_steps"] == 1
    [skip] = kinds(run, "skip")
    assert skip["step"] == 5 and "loss=nan" in skip["reason"] and skip["skipped_steps"] == 1
    assert losses(run)[:4] == losses(straight)[:4]  # identical until the bad batch
    state = last_checkpoint(run)
    counted = {float(s["step"]) for s in state["optimizer"]["state"].values() if "step" in s}  # AdamW's part: Muon's
    assert counted == {11.0}  # matrices keep no count, but they step with it, in one optimizer: 12 steps, 11 updates
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not kinds(run, "rollback")


def test_fused_adamw_skips_a_step_flagged_on_the_device():
    """The non-finite skip without a host sync: found_inf set -> no update and the step is not counted."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1, fused=True)
    assert skip_on_device(opt)
    w.grad = torch.full((3,), float("nan"))
    opt.found_inf = (~finite_on_device(torch.tensor(1.0), w.grad.norm())).float()
    opt.step()
    assert torch.equal(w.detach(), torch.ones(3)) and float(opt.state[w]["step"]) == 0
    w.grad = torch.ones(3)
    opt.found_inf = (~finite_on_device(torch.tensor(1.0), w.grad.norm())).float()
    opt.step()
    assert (w.detach() < 1).all() and float(opt.state[w]["step"]) == 1


def test_a_nan_step_between_log_lines_is_counted_when_the_host_reads_them(tmp_path, cache_dir, monkeypatch, straight):
    """The host reads losses at log intervals only; a skipped step in between is still found, logged at its
    own step, kept out of the logged mean, and made no update."""
    run = tmp_path / "run"
    inject(monkeypatch, lambda call, x: "nan" if call == 5 else None)
    every4 = tuple(o.replace("train.log_interval=1", "train.log_interval=4") for o in SHORT)
    result = train(compose(*tiny_overrides(run, cache_dir, *every4)))
    assert result["finished"] and result["skipped_steps"] == 1
    [skip] = kinds(run, "skip")
    assert skip["step"] == 5 and "loss=nan" in skip["reason"]
    train_lines = {r["step"]: r["train_loss"] for r in kinds(run, "train")}
    assert set(train_lines) == {4, 8, 12} and all(np.isfinite(v) for v in train_lines.values())
    straight_loss = {r["step"]: r["train_loss"] for r in kinds(straight, "train")}
    assert train_lines[4] == pytest.approx(np.mean([straight_loss[s] for s in (1, 2, 3, 4)]), rel=1e-6)
    state = last_checkpoint(run)
    assert {float(s["step"]) for s in state["optimizer"]["state"].values() if "step" in s} == {11.0}  # 11 updates


def test_a_nan_streak_rolls_back_and_skips_the_offending_batches(tmp_path, cache_dir, monkeypatch):
    run = tmp_path / "run"
    inject(monkeypatch, lambda call, x: "nan" if call in (6, 7, 8) else None)  # steps 6-8; max_bad_steps=3
    result = train(compose(*tiny_overrides(run, cache_dir, *SHORT, "train.ckpt_interval_s=0")))
    assert result["finished"] and result["skipped_steps"] == 3
    assert [s["in_a_row"] for s in kinds(run, "skip")] == [1, 2, 3]
    [rollback] = kinds(run, "rollback")
    assert rollback["step"] == 5 and rollback["from_step"] == 8 and rollback["checkpoint"] == "step_00000005.pt"
    assert rollback["skipped_samples"] == 3 * 2  # three batches of two sequences, not replayed
    state = last_checkpoint(run)
    assert state["step"] == 12 and state["sample"] == (12 + 3) * 2  # the stream went on past them
    assert state["skipped_steps"] == 3


def test_nan_that_keeps_coming_stops_with_a_clear_message(tmp_path, cache_dir, monkeypatch):
    run = tmp_path / "run"
    inject(monkeypatch, lambda call, x: "nan" if call >= 4 else None)  # from step 4 on
    with pytest.raises(DivergedError, match=r"NaN or Inf for 3 steps in a row \(train.max_bad_steps\).*after 3 "
                                            r"rollbacks.*Lower optim.lr") as e:  # fmt: skip
        train(compose(*tiny_overrides(run, cache_dir, *SHORT, "train.ckpt_interval_s=0")))
    assert isinstance(e.value, PufferfishError)
    assert len(kinds(run, "rollback")) == 3 and len(kinds(run, "skip")) == 12
    assert ckpt.load_latest(run / "checkpoints")[0]["step"] == 3  # the good weights are kept


# ---------------------------------------------------------------- 5. out of memory


def oom_at(calls: set[int] | None):
    def fault(call, x):
        if calls is None or call in calls:
            raise RuntimeError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected at call {call})")

    return fault


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_loss_curve(tmp_path, cache_dir, monkeypatch):
    common = (*SHORT, "train.batch_tokens=1024", "train.micro_batch=4")  # 4 x 128 tokens, 2 accumulation steps
    whole, run = tmp_path / "whole", tmp_path / "run"
    train(compose(*tiny_overrides(whole, cache_dir, *common)))
    sizes = []
    inject(monkeypatch, lambda call, x: sizes.append(x.shape[0]) or oom_at({10})(call, x))  # step 5, 2nd micro
    result = train(compose(*tiny_overrides(run, cache_dir, *common)))
    assert result["finished"]
    assert sizes[:10] == [4] * 10 and set(sizes[10:]) == {2} and len(sizes) == 10 + 4 * 8  # step 5 retried
    [backoff] = kinds(run, "oom_backoff")
    assert backoff["step"] == 5 and backoff["micro_batch"] == 2 and backoff["grad_accum"] == 4
    assert "out of memory" in backoff["error"]
    plan = json.loads((run / "plan.json").read_text())
    assert plan["micro_batch"] == 2 and plan["grad_accum"] == 4 and plan["batch_tokens"] == 1024
    assert "out of memory at step 5" in plan["reasons"]["micro_batch"]
    a, b = losses(whole), losses(run)
    assert [r[:2] for r in a] == [r[:2] for r in b]
    for x, y in zip(a, b):  # the same samples in the same order; only the summation order differs
        value_a, value_b = x[2] if x[0] == "train" else x[3], y[2] if y[0] == "train" else y[3]
        assert value_b == pytest.approx(value_a, rel=1e-5)


def test_out_of_memory_at_micro_batch_one_says_what_to_change(tmp_path, cache_dir, monkeypatch):
    run = tmp_path / "run"
    inject(monkeypatch, oom_at(None))
    with pytest.raises(OutOfMemoryError, match="even at micro_batch=1 .*optimizations.grad_ckpt=always.*seq_len"):
        train(compose(*tiny_overrides(run, cache_dir, *SHORT)))
    assert [r["micro_batch"] for r in kinds(run, "oom_backoff")] == [1]  # 2 -> 1, then nothing smaller


def test_only_out_of_memory_errors_are_backed_off():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


# ---------------------------------------------------------------- 6. the run directory


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("config_saved", [True, False])
def test_resuming_with_another_architecture_is_refused_and_keeps_the_files(tmp_path, cache_dir, config_saved):
    run = tmp_path / "run"
    train(compose(*tiny_overrides(run, cache_dir, *SHORT, "train.stop_at_step=3")))
    if not config_saved:
        (run / "config.yaml").unlink()  # then only the checkpoint itself can tell
        (run / "plan.json").unlink()
    before = snapshot(run)
    error = ConfigError if config_saved else CheckpointError
    match = "different model" if config_saved else "holds another model .*num_dims 64 there, 128 here"
    with pytest.raises(error, match=match):
        train(compose(*tiny_overrides(run, cache_dir, *SHORT, "model.num_dims=128")))
    assert snapshot(run) == before


def test_a_checkpoint_with_other_optimizer_groups_is_refused_with_advice(tmp_path, cache_dir):
    """E.g. one from a version whose model had other parameters: its optimizer lists one more."""
    run = tmp_path / "run"
    train(compose(*tiny_overrides(run, cache_dir, *SHORT, "train.stop_at_step=3")))
    state, path = ckpt.load_latest(run / "checkpoints")
    state["optimizer"]["param_groups"][0]["params"].append(10_000)  # one parameter the model does not have
    for stale in ckpt.checkpoint_files(run / "checkpoints"):
        stale.unlink()
    ckpt.save_checkpoint(run / "checkpoints", state, state["step"])
    with pytest.raises(CheckpointError, match="does not fit this model.*another version.*Start a new run directory"):
        train(compose(*tiny_overrides(run, cache_dir, *SHORT)))


def test_unwritable_run_directory_is_reported_before_anything_else(tmp_path, cache_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # root ignores permissions, not this
    with pytest.raises(ConfigError, match="is not writable.*choose another"):
        train(compose(*tiny_overrides(blocker / "run", cache_dir, *SHORT)))


def test_full_disk_is_reported_before_training(tmp_path, cache_dir, monkeypatch):
    import shutil

    import pufferfish.rundir

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(pufferfish.rundir.shutil, "disk_usage", lambda p: usage._replace(free=50 * 2**20))
    with pytest.raises(ConfigError, match="only 50 MiB free"):
        train(compose(*tiny_overrides(tmp_path / "run", cache_dir, *SHORT)))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_disk_too_small_for_the_checkpoints_is_reported_before_training(tmp_path, cache_dir, monkeypatch):
    import shutil

    import pufferfish.rundir

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(pufferfish.rundir.shutil, "disk_usage", lambda p: usage._replace(free=600 * 2**20))
    overrides = tiny_overrides(tmp_path / "run", cache_dir, "model.num_layers=8", "model.num_dims=512",
                               "train.max_steps=10", "dry_run=true")  # ~20M parameters: ~250 MiB a checkpoint
    with pytest.raises(ConfigError, match=r"MiB each and 4 exist at once.*train.keep_checkpoints"):
        train(compose(*overrides))
    train(compose(*overrides, "train.keep_checkpoints=1"))  # two at once fit


# ---------------------------------------------------------------- on a GPU (not run on CPU machines)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_RUN = ("gpu=gtx1060", "mode=ultra_fast", "model.num_layers=4", "model.num_dims=512", "model.seq_len=512",
           "train.max_steps=8", "train.log_interval=1", "train.eval_interval=4", "train.sample_tokens=0")  # fmt: skip


@pytest.mark.gpu
@needs_cuda
def test_gpu_out_of_memory_backs_off_under_a_smaller_cap_than_planned(tmp_path, cache_dir, monkeypatch):
    """The plan is made for an emulated 6 GB card; the allocator is then capped below what the planned step
    was measured to need, so the step really runs out of memory and must back off."""
    import pufferfish.step as loop

    whole, run = tmp_path / "whole", tmp_path / "run"
    common = (*GPU_RUN, "optimizations=baseline", "train.batch_tokens=65536")  # fp32: comparable to float tolerance
    needed = train(compose(*tiny_overrides(whole, cache_dir, *common)))["peak_mem_bytes"]
    torch.cuda.empty_cache()  # cached blocks would be reused under the cap without ever asking for more
    total = torch.cuda.get_device_properties(0).total_memory
    monkeypatch.setattr(loop, "apply_memory_cap", lambda hw: torch.cuda.set_per_process_memory_fraction(
        0.6 * needed / total, 0))  # fmt: skip
    try:
        result = train(compose(*tiny_overrides(run, cache_dir, *common)))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()
    assert result["finished"] and kinds(run, "oom_backoff")
    a, b = losses(whole), losses(run)
    assert [r[:2] for r in a] == [r[:2] for r in b]
    for x, y in zip(a, b):
        value_a, value_b = x[2] if x[0] == "train" else x[3], y[2] if y[0] == "train" else y[3]
        assert value_b == pytest.approx(value_a, rel=1e-4)


@pytest.mark.gpu
@needs_cuda
def test_gpu_interrupted_run_resumes_within_tolerance(tmp_path, cache_dir):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    train(compose(*tiny_overrides(whole, cache_dir, *GPU_RUN)))  # the profile's mixed precision
    train(compose(*tiny_overrides(broken, cache_dir, *GPU_RUN, "train.stop_at_step=3")))
    train(compose(*tiny_overrides(broken, cache_dir, *GPU_RUN)))
    a, b = losses(whole), losses(broken)
    assert [r[:2] for r in a] == [r[:2] for r in b]
    for x, y in zip(a, b):
        value_a, value_b = x[2] if x[0] == "train" else x[3], y[2] if y[0] == "train" else y[3]
        assert value_b == pytest.approx(value_a, rel=1e-3)


def test_metrics_reader_leaves_out_a_killed_runs_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n{"kind": "tra')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"kind": "train", "st\n{"kind": "train", "step": 2}\n')  # torn inside: damaged, not cut short
    with pytest.raises(json.JSONDecodeError):
        read_metrics(path)
