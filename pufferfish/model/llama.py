"""A Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, tied embeddings.

A pure nn.Module: no device, precision, compile or checkpointing logic here (pufferfish/transforms.py
applies those from outside). Rotary embeddings use the rotate-half layout of Hugging Face's Llama so
exported weights load there unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import FeedForward, RMSNorm
from .moe import MoEFeedForward

# enable_gqa lets SDPA read grouped K/V without materialising repeated heads (torch 2.5+), but only the
# flash and math kernels take it: where flash cannot run (fp32, GPUs before sm80) it would fall back to
# the math kernel and its (T x T) scores, so there K/V heads are repeated for the efficient kernel instead
_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


@torch._dynamo.assume_constant_result
def _flash_enabled() -> bool:
    """Is the flash kernel allowed (attention.sdpa_backend may ask for another)? A constant to torch.compile,
    which chooses the kernel when it traces: traced as a call, torch 2.11 breaks the graph here and runs the
    whole layer loop eagerly (124M on the H200: 441k instead of 540k tokens/s)."""
    return torch.backends.cuda.flash_sdp_enabled()


def _flash_can_run(q) -> bool:
    if not q.is_cuda:
        return True  # the CPU kernels take grouped K/V directly
    if not _flash_enabled():  # another kernel asked for (attention.sdpa_backend)
        return False
    return q.dtype in (torch.float16, torch.bfloat16) and torch.cuda.get_device_capability(q.device) >= (8, 0)


def rope_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd), rotate-half layout
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x: (B, H, T, hd); cos, sin: (T, hd)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Keys and values of every layer for incremental decoding: (layers, B, kv_heads, S, head_dim)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype, device):
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def update(self, layer: int, pos: int, k, v):
        end = pos + k.shape[2]
        self.k[layer, :, :, pos:end] = k
        self.v[layer, :, :, pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.num_dims, cfg.num_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.num_dims, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.num_dims, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.num_dims, bias=False)
        self.q_norm = self.k_norm = None  # model.qk_norm: one weight over head_dim for all heads (Qwen3's)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps), RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x, cos, sin, cache: KVCache | None = None, pos: int = 0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.wv(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:  # each head's query and key to unit RMS (times a weight), before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, pos, k, v)  # (B, KV, pos+T, hd)
        S = k.shape[2]
        mask, causal = None, S == T  # a full sequence: plain causal masking
        if not causal and T > 1:  # a chunk after a cached prefix sees the whole prefix
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1 and _SDPA_HAS_GQA and _flash_can_run(q):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        else:
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.num_dims, cfg.norm_eps)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.num_dims, cfg.norm_eps)
        if cfg.is_moe_layer(layer):
            self.feed_forward = MoEFeedForward(cfg)
        else:
            self.feed_forward = FeedForward(cfg.num_dims, cfg.ffn_dims)

    def forward(self, x, cos, sin, cache: KVCache | None = None, pos: int = 0):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, pos)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.num_dims)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.num_dims, cfg.norm_eps)
        self.output = nn.Linear(cfg.num_dims, cfg.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight  # tied
        cos, sin = rope_tables(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.num_layers)  # depth-scaled residual projections
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, out_std)
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, std)
        for module in self.modules():
            if module is not self and hasattr(module, "init_weights"):
                module.init_weights()  # MoE routers and their balancing buffers

    def hidden_states(self, idx, cache: KVCache | None = None, pos: int = 0):
        """Final normed hidden states (B, T, C): the input to the output projection."""
        T = idx.shape[1]
        if pos + T > self.config.seq_len:
            raise ValueError(f"sequence of {pos + T} tokens is longer than seq_len={self.config.seq_len}")
        cos, sin = self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
        x = self.tok_embeddings(idx)  # (B, T, C)
        for block in self.layers:
            x = block(x, cos, sin, cache, pos)
        return self.norm(x)

    def forward(self, idx, cache: KVCache | None = None, pos: int = 0, hidden_only: bool = False):
        h = self.hidden_states(idx, cache, pos)  # (B, T, C)
        return h if hidden_only else self.output(h)  # (B, T, V) logits


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> Transformer:
    with torch.device(device):
        return Transformer(cfg)
