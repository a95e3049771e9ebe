"""Data parallelism: `torchrun --nproc_per_node=N -m pufferfish.train ...` (or submitit's tasks).

Every rank holds the whole model (DDP), or 1/N of it (FSDP2, `train.parallel=fsdp2`: sharding.py);
rank r reads the micro-batches r, r+N, r+2N, ... of the one sample stream, so N ranks together see
exactly the batches one process would, and the resolver plans the global batch across them. Rank 0
alone writes the run directory.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.size > 1


def init_world(device_request: str) -> tuple[World, str]:
    """Join the process group torchrun (or SLURM through submitit) describes; (world, device)."""
    size = int(os.environ.get("WORLD_SIZE", 1))
    if size == 1:
        return World(), device_request
    rank = int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and device_request in ("auto", "cuda") or device_request.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)  # before the first collective: NCCL maps each rank to its current GPU
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = f"cuda:{local}" if use_cuda else "cpu"
    return World(rank, size, local), device


def barrier(world: World) -> None:
    if world.enabled:
        dist.barrier()


def mean_across(world: World, value: torch.Tensor) -> torch.Tensor:
    if world.enabled:
        value = value.clone()
        dist.all_reduce(value)
        value /= world.size
    return value


def wrap(model, world: World, device: str, parallel: str = "ddp", precision: str = "fp32"):
    """DDP around the pure model, which stays the one that is saved and evaluated; or, with
    parallel="fsdp2", the model itself sharded in place (pufferfish/sharding.py)."""
    if not world.enabled:
        return model
    if parallel == "fsdp2":
        from .sharding import shard

        return shard(model, world.size, device, precision)
    from torch.nn.parallel import DistributedDataParallel as DDP

    # gradients as views of the all-reduce buckets: no copy into them each step, one gradient-sized buffer less
    return DDP(model, device_ids=[world.local_rank] if device.startswith("cuda") else None,
               gradient_as_bucket_view=True)  # fmt: skip


def gradient_sync(parallel, last: bool):
    """DDP all-reduces once a step, after the last micro-batch. FSDP2 reduce-scatters after every one:
    keeping the full gradients across micro-batches would cost the memory that sharding saves."""
    if last or not hasattr(parallel, "no_sync"):  # one process, or FSDP2
        return contextlib.nullcontext()
    return parallel.no_sync()


def same_on_all(world: World, value):
    """Rank 0's value of a picklable object on every rank (a run directory, a decision)."""
    if not world.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree_to_stop(world: World, why: str | None, steps: int, val_tokens: int) -> tuple[str | None, int, int]:
    """Rank 0 decides when to stop, how many steps the plan has and how long evaluations are (its clock
    and its speed measurement), so every rank leaves the loop at the same step and no collective is left
    waiting. A host sync: the loop calls it at log intervals only."""
    if not world.enabled:
        return why, steps, val_tokens
    return same_on_all(world, (why, steps, val_tokens))


def close(world: World) -> None:
    if world.enabled and dist.is_initialized():
        dist.destroy_process_group()
