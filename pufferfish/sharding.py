"""FSDP2 (`train.parallel=fsdp2`): for models whose weights, gradients and AdamW state do not fit on
each GPU beside the activations, as DDP needs them to.

Each rank keeps 1/N of every parameter, its gradient and its AdamW moments; a block's full weights are
all-gathered for its forward and again for its backward, and its gradients are reduce-scattered back
into shards. Checkpoints stay ordinary full state dicts, the same as one process writes: every rank
takes part in gathering them, rank 0 writes, and any number of ranks (one included) resumes them.
"""

from __future__ import annotations

import torch

FULL = {"full_state_dict": True, "cpu_offload": True}  # gathered onto rank 0's CPU; the others get {}


def _fsdp():
    try:  # torch >= 2.6
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.4 and 2.5
        from torch.distributed._composable.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    return FSDPModule, MixedPrecisionPolicy, fully_shard


def is_sharded(model) -> bool:
    if not torch.distributed.is_available():
        return False
    return isinstance(model, _fsdp()[0])


def shard(model, world_size: int, device: str, precision: str):
    """Each block, then the root (the tied embedding and the final norm), in place; build the optimizer
    after this, over the sharded parameters."""
    from torch.distributed.device_mesh import init_device_mesh

    _, MixedPrecisionPolicy, fully_shard = _fsdp()
    mesh = init_device_mesh(torch.device(device).type, (world_size,))
    policy = MixedPrecisionPolicy()  # fp32; fp16 too: fp32 weights under autocast, with the sharded scaler
    if precision == "bf16":  # weights gathered and used in bf16, gradients reduced in fp32 into fp32 shards;
        # autocast stays on around the step, so the ops it runs in fp32 still do
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    last = len(model.layers) - 1
    for i, block in enumerate(model.layers):  # the last block's weights are needed at once in backward: kept
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < last)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the root keeps its weights from forward to backward
    return model


def grad_scaler(precision: str, device: str):
    """fp16 under FSDP2: every rank must agree that a step overflowed, though each sees only its shards."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    return ShardedGradScaler(torch.device(device).type, enabled=precision == "fp16")


def plain(value: torch.Tensor) -> torch.Tensor:
    """A DTensor (clip_grad_norm_'s total norm over sharded gradients) as an ordinary tensor."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def full_state(model, optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts exactly as one process's model.state_dict() and optimizer.state_dict()
    would be. A collective: every rank calls it; only rank 0 gets them (the others get empty dicts)."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint import state_dict as dcp

    options = dcp.StateDictOptions(**FULL)
    weights = dcp.get_model_state_dict(model, options=options)
    if not optimizer.state:  # before the first step: dcp would fill the state with an extra AdamW step
        return weights, optimizer.state_dict()  # no tensors to gather: the same on every rank
    by_name = dcp.get_optimizer_state_dict(model, optimizer, options=options)  # keyed by parameter name
    if not by_name:
        return weights, {}
    index: dict[str, int] = {}  # names -> the optimizer's own numbering: parameters in group order
    groups = [{**g, "params": [index.setdefault(n, len(index)) for n in g["params"]]}
              for g in by_name["param_groups"]]  # fmt: skip
    return weights, {"state": {index[n]: s for n, s in by_name["state"].items()}, "param_groups": groups}


def load_full_state(model, optimizer, weights: dict, optimizer_state: dict) -> None:
    """The inverse of full_state: every rank passes the whole checkpoint and keeps its own shards."""
    if not is_sharded(model):
        model.load_state_dict(weights)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint import state_dict as dcp

    options = dcp.StateDictOptions(full_state_dict=True)
    dcp.set_model_state_dict(model, weights, options=options)
    if not optimizer_state["state"]:  # saved before the first step: dcp would load it with an extra AdamW step
        optimizer.state.clear()
        return
    name_of = {p: n for n, p in model.named_parameters()}
    names = [name_of[p] for g in optimizer.param_groups for p in g["params"]]  # the numbering full_state used
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in optimizer_state["param_groups"]]
    by_name = {"state": {names[i]: s for i, s in optimizer_state["state"].items()}, "param_groups": groups}
    dcp.set_optimizer_state_dict(model, optimizer, by_name, options=options)


def full_weights(model) -> dict:
    """The model's weights as one process's state_dict(), copied to the CPU (a snapshot that training does
    not change). A collective under FSDP2: every rank calls it; only rank 0 gets the weights."""
    if not is_sharded(model):
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint import state_dict as dcp

    return dcp.get_model_state_dict(model, options=dcp.StateDictOptions(**FULL))


def load_full_weights(model, weights: dict) -> None:
    """The inverse of full_weights. Under FSDP2 every rank calls it; rank 0's weights are broadcast."""
    if not is_sharded(model):
        model.load_state_dict(weights)
        return
    from torch.distributed.checkpoint import state_dict as dcp

    options = dcp.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    dcp.set_model_state_dict(model, weights, options=options)


def unsharded(model, world, device: str):
    """A model with all its weights for rank 0 to sample from (generation is no collective): the model
    itself, or under FSDP2 a plain copy, gathered with every rank taking part (the others get None)."""
    if not is_sharded(model):
        return model
    from .model import build_model

    weights = full_weights(model)
    if not world.is_main:
        return None
    copy = build_model(model.config, device)
    copy.load_state_dict(weights)
    return copy
