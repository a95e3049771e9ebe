"""The layers the dense blocks (llama.py) and the mixture of experts (moe.py) share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dims))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, num_dims: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(num_dims, hidden, bias=False)
        self.w3 = nn.Linear(num_dims, hidden, bias=False)
        self.w2 = nn.Linear(hidden, num_dims, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
