"""Speed transforms, applied to a pure model from outside, in one order: checkpointing -> compile.

Compilation covers the whole forward pass and the loss (`compile_step`): on the H200 that measured
519k tokens/s against 374k for compiling block by block (docs/benchmarks.md).

None of them changes the maths beyond floating-point rounding (tests/test_parity.py).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def apply_activation_checkpointing(model) -> None:
    """Each block keeps only its input; its activations are recomputed in the backward pass."""
    for block in model.layers:
        forward = block.forward
        block.forward = lambda *args, _f=forward, **kw: checkpoint(_f, *args, use_reentrant=False, **kw)


def apply_compile(model) -> None:
    """Compile block by block: the blocks share one graph, so compilation stays quick."""
    for block in model.layers:
        block.compile()


def apply_speed_transforms(model, grad_ckpt: bool, compile: bool, device: str) -> list[str]:
    """Module-level transforms. `compile` here compiles block by block; training compiles the whole
    step instead through compile_step, and passes compile=False."""
    applied = []
    if grad_ckpt:
        apply_activation_checkpointing(model)
        applied.append("activation checkpointing")
    if compile and device != "cpu":  # inductor on CPU costs minutes of compilation for little gain
        apply_compile(model)
        applied.append("torch.compile (per block)")
    return applied


def compile_step(fn, compile: bool, device: str, backend: str = "inductor", mode: str | None = None):
    """The forward pass and loss as one compiled graph on a GPU; unchanged on CPU, where only a backend other
    than Inductor (no C++ build of minutes) compiles. `mode`: torch.compile's (None: its default)."""
    if compile and (backend != "inductor" or not str(device).startswith("cpu")):
        # a new run in the same process (a multirun's next job) starts afresh: the last job's graphs would
        # otherwise count towards dynamo's recompile limit, and past it a job would silently run eager
        torch._dynamo.reset()
        return torch.compile(fn, backend=backend, mode=mode)
    return fn


def autocast(precision: str, device: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: str):
    """fp16 needs loss scaling; bf16 and fp32 do not (the scaler is then a no-op)."""
    enabled = precision == "fp16"
    try:
        return torch.amp.GradScaler(torch.device(device).type, enabled=enabled)
    except (AttributeError, TypeError):  # torch < 2.3
        return torch.cuda.amp.GradScaler(enabled=enabled)


def sdpa_backend(name: str):
    """A context that allows scaled_dot_product_attention the plan's kernel and those after it in
    capabilities.ATTENTION_KERNELS (math last), so an input a kernel cannot take falls back rather than fails;
    auto lets torch choose. On an emulating GPU this keeps the flash kernel from a card that has none."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .resolver.capabilities import ATTENTION_KERNELS

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH,
    }  # fmt: skip
    return sdpa_kernel([backends[k] for k in ATTENTION_KERNELS[ATTENTION_KERNELS.index(name):]])
