"""Data parallelism: ranks read disjoint micro-batches that together are the single-process stream."""

import json

import numpy as np
import pytest
import torch

from pufferfish.data.loader import TrainBatches


def _token_file(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(50_000, dtype=np.uint16).tofile(path)
    return path


def test_ranks_interleave_into_the_single_process_stream(tmp_path):
    path, mb, world = _token_file(tmp_path), 3, 2
    single = TrainBatches(path, "uint16", 16, mb, seed=7, prefetch=0)
    ranks = [TrainBatches(path, "uint16", 16, mb, seed=7, start_sample=r * mb, stride=world * mb, prefetch=2)
             for r in range(world)]  # fmt: skip
    for _ in range(5):
        for rank in ranks:
            x, y = rank.next()
            sx, sy = single.next()
            assert torch.equal(x, sx) and torch.equal(y, sy)
    assert ranks[0].sample == single.sample  # rank 0 holds the global position: what a checkpoint stores
    for loader in [single, *ranks]:
        loader.close()


# a few seconds of training at one global batch: 16 sequences a step, 4 to a micro-batch
COMMON = ["train.max_steps=6", "train.log_interval=1", "train.eval_interval=3", "train.batch_tokens=2048",
          "train.micro_batch=4", "train.sample_tokens=8", "optimizations.prefetch_batches=0"]  # fmt: skip
FSDP2 = "train.parallel=fsdp2"


def launch(run, cache_dir, nproc: int, *extra: str) -> list[tuple]:
    """torchrun with `nproc` CPU processes (gloo); the run's train and eval lines."""
    import os
    import subprocess
    import sys

    from pufferfish.runlog import read_metrics
    from tests.conftest import ROOT, tiny_overrides

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    args = [*tiny_overrides(run, cache_dir, *COMMON, *extra), f"hydra.run.dir={run}"]
    proc = subprocess.run([*launcher, "-m", "pufferfish.train", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, "\n".join(line for line in proc.stderr.splitlines() if "Error" in line or "error" in line)[-3000:]
    return [(r["kind"], r["step"], r.get("train_loss"), r.get("val_loss"), r.get("grad_norm"))
            for r in read_metrics(run / "metrics.jsonl") if r["kind"] in ("train", "eval")]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache_dir) -> list[tuple]:
    return launch(tmp_path_factory.mktemp("one"), cache_dir, 1)


def assert_same_run(one: list[tuple], other: list[tuple]) -> None:
    assert [r[:2] for r in one] == [r[:2] for r in other]  # every line once: rank 1 wrote nothing
    for a, b in zip(one, other):  # the summation order of the gradient differs: rounding only, which Muon's
        for x, y in zip(a[2:], b[2:]):  # bf16 Newton-Schulz carries into its update (None: a line lacks the field)
            assert (x is None and y is None) or y == pytest.approx(x, rel=1e-3)


def test_two_process_gloo_run_matches_one_process_and_only_rank_0_writes(tmp_path, cache_dir, one_process):
    """torchrun with 2 CPU processes (gloo) at the same global batch: the same losses as one process."""
    assert_same_run(one_process, launch(tmp_path / "two", cache_dir, 2))
    plan = json.loads((tmp_path / "two" / "plan.json").read_text())
    assert plan["world_size"] == 2 and plan["micro_batch"] * 2 * plan["grad_accum"] * plan["seq_len"] == 2048


def test_fsdp2_matches_one_process_and_checkpoints_resume_across_world_sizes(tmp_path, cache_dir, one_process):
    """FSDP2 on 2 gloo processes, stopped at step 2, resumed in one process to step 4, then under FSDP2 again
    to the end: every loss and gradient norm where the uninterrupted single process had it (within 1e-4),
    each line written once, and the checkpoints ordinary full state dicts."""
    import torch

    run = tmp_path / "fsdp2"
    launch(run, cache_dir, 2, FSDP2, "train.stop_at_step=2")
    launch(run, cache_dir, 1, "train.stop_at_step=4")  # the FSDP2 checkpoint in one process
    assert_same_run(one_process, launch(run, cache_dir, 2, FSDP2))  # and one process's under FSDP2
    plan = json.loads((run / "plan.json").read_text())  # the global batch kept on each world size
    assert plan["world_size"] == 2 and plan["micro_batch"] * 2 * plan["grad_accum"] * plan["seq_len"] == 2048
    state = torch.load(run / "checkpoints" / "step_00000006.pt", weights_only=False)
    assert not any(hasattr(t, "full_tensor") for t in state["model"].values())  # plain tensors, no DTensors
    assert sorted(state["optimizer"]["state"]) == list(range(len(state["optimizer"]["state"])))  # numbered
    assert (run / "sample.txt").read_text()  # rank 0 sampled from the gathered weights; no rank waited


def test_fsdp2_trains_muon_on_whole_matrices_and_its_checkpoint_resumes_in_one_process(tmp_path, cache_dir):
    """optim.name=muon under FSDP2: each rank holds a shard of every matrix, Muon orthogonalises the whole one
    (gathered) and keeps its shard of the update; the gathered checkpoint resumes in one process. The losses
    and gradient norms are one process's within 1e-3: the bf16 orthogonalisation rounds a gradient whose
    summation order differs."""
    one = launch(tmp_path / "one", cache_dir, 1, "optim.name=muon")
    run = tmp_path / "fsdp2"
    launch(run, cache_dir, 2, FSDP2, "optim.name=muon", "train.stop_at_step=3")
    resumed = launch(run, cache_dir, 1, "optim.name=muon")
    assert [r[:2] for r in one] == [r[:2] for r in resumed]
    for a, b in zip(one, resumed):
        for x, y in zip(a[2:], b[2:]):
            assert (x is None and y is None) or y == pytest.approx(x, rel=1e-3)


def test_an_unknown_parallel_strategy_names_the_allowed_ones():
    from pufferfish.errors import ConfigError
    from pufferfish.validate import validate
    from tests.conftest import compose

    with pytest.raises(ConfigError, match="train.parallel='zero3'.*ddp, fsdp2"):
        validate(compose("train.parallel=zero3"))


def test_only_rank_0_shows_a_progress_bar(tmp_path, cache_dir):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT, tiny_overrides

    quiet = [o for o in tiny_overrides(tmp_path, cache_dir, *COMMON) if o != "train.progress=false"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*launcher, "-m", "pufferfish.train", *quiet, "train.progress=true",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    bars = proc.stderr.replace("\r", "\n").splitlines()
    assert sum(b.startswith("train:   0%") for b in bars) == 1, proc.stderr[-3000:]  # one bar is started, not two
    assert any(b.startswith("train: 100%") for b in bars)
