"""Data parallelism: ranks read disjoint micro-batches that together are the single-process stream."""

import numpy as np
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
