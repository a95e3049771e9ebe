"""Next-token cross-entropy, optionally in chunks so the full fp32 logits never exist at once."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_loss_sum(hidden, weight, targets):
    logits = F.linear(hidden, weight).float()  # (n, V), alive only inside this chunk
    return F.cross_entropy(logits, targets, reduction="sum")


def lm_loss(model, x, y, chunked: bool = False, chunk_tokens: int = 4096):
    """Mean cross-entropy of predicting y from x; x, y: (B, T). `model` may be wrapped (DDP): every
    path goes through its forward, so data-parallel gradient hooks see it."""
    if not chunked:
        logits = model(x)  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    hidden = model(x, hidden_only=True).flatten(0, 1)  # (B*T, C)
    weight = getattr(model, "module", model).output.weight
    return chunked_loss_sum(hidden, weight, y.flatten(), chunk_tokens) / y.numel()


@torch.compiler.disable  # eager even inside a compiled step (see the docstring)
def chunked_loss_sum(hidden, weight, targets, chunk_tokens: int):
    """Summed cross-entropy, `chunk_tokens` rows of logits at a time, each chunk's logits recomputed in backward.
    Outside torch.compile on purpose: traced into the step's graph (torch 2.11, H200), the partitioner kept
    every chunk's 16-bit logits for backward, the whole (B*T, V) the chunking is there to avoid (lean rows of
    scripts/calibrate.py's grids, docs/benchmarks.md)."""
    total = hidden.new_zeros((), dtype=torch.float32)
    grad = torch.is_grad_enabled()  # evaluation: nothing to recompute, each chunk's logits freed as it ends
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        part = checkpoint(_chunk_loss_sum, h, weight, t, use_reentrant=False) if grad else _chunk_loss_sum(h, weight, t)
        total = total + part  # training: logits recomputed in backward
    return total


class StepLoss(nn.Module):
    """One micro-batch's training loss (cross-entropy plus the MoE auxiliary loss, under autocast) as a module's
    forward. The step compiles this module, and data parallelism wraps it: DDP(compiled StepLoss), as PyTorch
    advises, keeps the forward and the loss in one graph. Compiling a function that calls a DDP-wrapped model
    instead broke the graph at DDP's forward (its Reducer cannot be traced) and compiled the loss apart from
    the model (torch 2.11). Holds no parameters of its own: the pure model stays the one saved and evaluated."""

    def __init__(self, model: nn.Module, autocast=None, chunked: bool = False, chunk_tokens: int = 4096):
        super().__init__()
        self.model, self.chunked, self.chunk_tokens = model, chunked, chunk_tokens
        self.autocast = autocast if autocast is not None else contextlib.nullcontext()

    def forward(self, x, y):
        from .model.moe import moe_aux_loss

        with self.autocast:
            return lm_loss(self.model, x, y, self.chunked, self.chunk_tokens) + moe_aux_loss(self.model)
