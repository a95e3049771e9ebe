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


def test_two_process_gloo_run_matches_one_process_and_only_rank_0_writes(tmp_path, cache_dir):
    """torchrun with 2 CPU processes (gloo) at the same global batch: the same losses as one process."""
    import os
    import subprocess
    import sys

    from pufferfish.runlog import read_metrics
    from tests.conftest import ROOT, tiny_overrides

    common = ["train.max_steps=6", "train.log_interval=1", "train.eval_interval=3", "train.batch_tokens=2048",
              "train.micro_batch=4", "train.sample_tokens=0", "optimizations.prefetch_batches=0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(run, nproc):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        args = [*tiny_overrides(run, cache_dir, *common), f"hydra.run.dir={run}"]
        proc = subprocess.run([*launcher, "-m", "pufferfish.train", *args], capture_output=True, text=True,
                              timeout=300, cwd=ROOT, env=env)  # fmt: skip
        assert proc.returncode == 0, "\n".join(line for line in proc.stderr.splitlines() if "Error" in line or "error" in line)[-3000:]
        return [(r["kind"], r["step"], r.get("train_loss"), r.get("val_loss"))
                for r in read_metrics(run / "metrics.jsonl") if r["kind"] in ("train", "eval")]  # fmt: skip

    one, two = launch(tmp_path / "one", 1), launch(tmp_path / "two", 2)
    assert [r[:2] for r in one] == [r[:2] for r in two]  # every line once: rank 1 wrote nothing
    for a, b in zip(one, two):  # the summation order of the gradient differs: rounding only
        assert (b[2] or b[3]) == pytest.approx(a[2] or a[3], rel=1e-4)
    plan = json.loads((tmp_path / "two" / "plan.json").read_text())
    assert plan["world_size"] == 2 and plan["micro_batch"] * 2 * plan["grad_accum"] * plan["seq_len"] == 2048
