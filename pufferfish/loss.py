"""Next-token cross-entropy, optionally in chunks so the full fp32 logits never exist at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
    targets = y.flatten()
    weight = getattr(model, "module", model).output.weight
    total = hidden.new_zeros((), dtype=torch.float32)
    grad = torch.is_grad_enabled()  # evaluation: nothing to recompute, each chunk's logits freed as it ends
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        part = checkpoint(_chunk_loss_sum, h, weight, t, use_reentrant=False) if grad else _chunk_loss_sum(h, weight, t)
        total = total + part  # training: logits recomputed in backward
    return total / targets.numel()
