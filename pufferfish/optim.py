"""AdamW with weight decay on matrices only, fused where the device has the kernel."""

from __future__ import annotations

import inspect

import torch


def build_optimizer(model, settings, lr: float, fused: bool) -> torch.optim.AdamW:
    """`settings`: weight_decay, beta1, beta2 (the plan's `optimizer`, or the optim config group)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # matrices and the (tied) embedding
    no_decay = [p for p in params if p.dim() < 2]  # norms: decaying them only hurts
    groups = [
        {"params": decay, "weight_decay": settings["weight_decay"]},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs = dict(lr=lr, betas=(settings["beta1"], settings["beta2"]), eps=1e-8)
    if fused and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        try:  # CUDA; CPU since torch 2.4. Fused also skips a non-finite step on the device (reliability.py)
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except RuntimeError:  # no fused kernel for this device or dtype
            pass
    return torch.optim.AdamW(groups, **kwargs)
