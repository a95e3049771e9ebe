"""Autoregressive sampling with a KV cache: temperature, top-k and nucleus (top-p)."""

from __future__ import annotations

import torch

from .llama import KVCache, Transformer


def filter_logits(logits, temperature: float, top_k: int, top_p: float):
    # logits: (B, V) for the next position
    if temperature <= 0:  # greedy: keep only the best token
        return torch.where(logits == logits.max(-1, keepdim=True).values, 0.0, float("-inf"))
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: Transformer,
    idx: torch.Tensor,  # (B, T) prompt tokens
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 1.0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Returns (B, T + max_new_tokens). Past seq_len the context slides and is recomputed in full."""
    seq_len = model.config.seq_len
    B = idx.shape[0]
    cache = None
    if use_cache:
        dtype = model.tok_embeddings.weight.dtype
        cache = KVCache(model.config, B, seq_len, dtype, idx.device)
    pos = 0  # tokens already in the cache
    for _ in range(max_new_tokens):
        if cache is not None and idx.shape[1] <= seq_len:
            logits = model(idx[:, pos:], cache=cache, pos=pos)[:, -1]
            pos = idx.shape[1]
        else:  # no cache, or the context is full: recompute the last seq_len tokens
            cache = None
            logits = model(idx[:, -seq_len:])[:, -1]
        probs = filter_logits(logits.float(), temperature, top_k, top_p).softmax(-1)
        nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        idx = torch.cat([idx, nxt], dim=1)
    return idx
