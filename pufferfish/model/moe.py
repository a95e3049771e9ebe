"""Mixture-of-experts SwiGLU feed-forward with DeepSeek-V3 auxiliary-loss-free load balancing.

Routing: each token scores every expert (sigmoid or softmax of a bias-free linear router). A per-expert
bias, nudged after every optimizer step towards equal load, is added to the scores only to *choose* the
top-k experts; the weights the chosen experts' outputs are mixed with come from the unbiased scores
(DeepSeek-V3, section 2.1.2). The bias is a buffer moved outside autograd by `update_moe_biases`.

Dispatch is dropless: every (token, expert) assignment is computed. Assignments are sorted by expert so
each expert reads one contiguous slice, computed either with `torch._grouped_mm` (one kernel for all
experts) or with a loop over experts; both give the same numbers.

Training-loop contract (plain functions at the bottom of this file):
  loss = task_loss + moe_aux_loss(model)   after every forward (micro-batch) in training
  optimizer.step(); update_moe_biases(model)   once per optimizer step, all micro-batches counted
  moe_metrics(model)   any time after update: load statistics of the step just finished
"""

from __future__ import annotations

import math
import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import FeedForward

EXPERT_IMPLS = ("auto", "grouped_mm", "loop")


def grouped_mm_usable(x: torch.Tensor, num_dims: int, hidden: int) -> bool:
    """Whether `auto` should use torch._grouped_mm: its fast CUTLASS kernel needs sm90+ and bf16."""
    return (
        hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device) >= (9, 0)
        and num_dims % 8 == 0  # the kernel wants every row stride a multiple of 16 bytes
        and hidden % 8 == 0
    )


def _cuda_autocast_dtype():
    try:  # torch >= 2.4
        return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    except (TypeError, AttributeError):
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def expert_swiglu(xs, counts, w1, w2, w3, impl: str = "auto") -> torch.Tensor:
    """SwiGLU of expert e on its slice of `xs`: rows are sorted by expert, `counts[e]` rows each.

    xs: (M, C) sorted token rows; counts: (E,) int; w1, w3: (E, hidden, C); w2: (E, C, hidden).
    Returns (M, C) in the same row order.
    """
    if xs.is_cuda and xs.dtype == torch.float32 and (dtype := _cuda_autocast_dtype()) is not None:
        xs = xs.to(dtype)  # autocast does not reach torch._grouped_mm and the norm hands us fp32
    if impl == "auto":
        impl = "grouped_mm" if grouped_mm_usable(xs, xs.shape[1], w1.shape[1]) else "loop"
    if impl == "grouped_mm":
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert's slice
        w1, w2, w3 = (w.to(xs.dtype) for w in (w1, w2, w3))  # no-op unless weights are kept in fp32
        h = F.silu(torch._grouped_mm(xs, w1.transpose(-2, -1), offs=offs))  # (M, hidden)
        h = h * torch._grouped_mm(xs, w3.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)  # (M, C)
    if impl != "loop":
        raise ValueError(f"expert_impl={impl!r} is not known; choose one of {EXPERT_IMPLS}")
    outs = []
    for e, seg in enumerate(xs.split(counts.tolist())):  # one host sync, then contiguous slices
        if seg.shape[0]:
            outs.append(F.linear(F.silu(F.linear(seg, w1[e])) * F.linear(seg, w3[e]), w2[e]))
    return torch.cat(outs) if outs else xs.new_zeros(0, w2.shape[1])


class MoEFeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts, self.active_experts = cfg.moe_num_experts, cfg.moe_active_experts
        self.score_func = cfg.moe_score_func
        self.lossfree_balance = cfg.use_lossfreebalance
        self.bias_update_rate = cfg.moe_bias_update_rate  # gamma
        self.aux_loss_alpha = cfg.moe_aux_loss_alpha
        self.init_std = cfg.init_std
        self.out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)  # as the dense blocks' w2
        self.expert_impl = "auto"  # auto | grouped_mm | loop; a kernel choice, the maths is the same
        E, C, H = cfg.moe_num_experts, cfg.num_dims, cfg.moe_expert_ffn_dims
        self.gate = nn.Linear(C, E, bias=False)  # router
        self.w1 = nn.Parameter(torch.empty(E, H, C))
        self.w3 = nn.Parameter(torch.empty(E, H, C))
        self.w2 = nn.Parameter(torch.empty(E, C, H))
        self.shared_expert = FeedForward(C, H) if cfg.moe_shared_expert else None  # always active
        # Balancing state: buffers, not parameters, so the optimizer and autograd never see them.
        # persistent, so a resumed run keeps its balance; keep it fp32 (autocast, not model.to(bf16)):
        # bf16 cannot resolve steps of gamma=1e-3 once the bias is a few tenths from zero
        self.register_buffer("expert_bias", torch.zeros(E))
        self.register_buffer("tokens_per_expert", torch.zeros(E), persistent=False)  # this step, so far
        self.register_buffer("last_load", torch.zeros(E), persistent=False)  # the last finished step
        self.aux_loss = torch.zeros(())  # set by every forward; read by moe_aux_loss
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.gate.weight, 0.0, self.init_std)
        nn.init.normal_(self.w1, 0.0, self.init_std)
        nn.init.normal_(self.w3, 0.0, self.init_std)
        nn.init.normal_(self.w2, 0.0, self.out_std)  # Transformer.init_weights matches only "w2.weight"
        if self.shared_expert is not None:  # the same init the Transformer gives it, for a standalone layer
            nn.init.normal_(self.shared_expert.w1.weight, 0.0, self.init_std)
            nn.init.normal_(self.shared_expert.w3.weight, 0.0, self.init_std)
            nn.init.normal_(self.shared_expert.w2.weight, 0.0, self.out_std)
        self.expert_bias.zero_()
        self.tokens_per_expert.zero_()
        self.last_load.zero_()

    def route(self, x):
        """x: (N, C) -> scores (N, E) unbiased, experts (N, k) chosen, gates (N, k) their weights."""
        logits = self.gate(x).float()  # (N, E); routing in fp32 so near-ties do not flip in bf16
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        experts = (scores + self.expert_bias).topk(self.active_experts, dim=-1).indices  # bias: choice only
        gates = scores.gather(-1, experts)  # (N, k) unbiased scores of the chosen experts
        gates = gates / gates.sum(dim=-1, keepdim=True)  # mixing weights sum to 1 per token
        return scores, experts, gates

    def forward(self, x):
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # (N, C), N = B*T
        scores, experts, gates = self.route(flat)
        k = self.active_experts
        assigned = experts.reshape(-1)  # (N*k,); assignment a belongs to token a // k
        order = assigned.argsort(stable=True)  # (N*k,) assignments grouped by expert
        counts = torch.bincount(assigned, minlength=self.num_experts)  # (E,) tokens per expert
        token_of = order // k  # (N*k,) source row of each sorted assignment
        h = expert_swiglu(flat[token_of], counts, self.w1, self.w2, self.w3, self.expert_impl)  # (N*k, C)
        weight = gates.reshape(-1)[order].to(h.dtype).unsqueeze(-1)  # (N*k, 1)
        # h's dtype, not x's: under autocast the experts' output is bf16 while x may be fp32
        y = h.new_zeros(flat.shape).index_add(0, token_of, h * weight)  # (N, C) sum over chosen experts
        if self.shared_expert is not None:
            y = y + self.shared_expert(flat)
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += counts.to(self.tokens_per_expert.dtype)
        self.aux_loss = self.balance_loss(scores, experts, B, T)
        return y.view(B, T, C)

    def balance_loss(self, scores, experts, B: int, T: int):
        """DeepSeek-V3 complementary sequence-wise balance loss (eqs. 17-20); zero unless training."""
        if not self.training or self.aux_loss_alpha == 0:
            return scores.new_zeros(())
        E, k = self.num_experts, self.active_experts
        # The paper's indicator is top-k of the unbiased scores, so the bias and this loss act separately.
        chosen = scores.topk(k, dim=-1).indices if self.lossfree_balance else experts  # (N, k)
        hits = torch.zeros_like(scores).scatter_(-1, chosen, 1.0).view(B, T, E)
        f = hits.sum(dim=1) * (E / (k * T))  # (B, E); 1 everywhere when perfectly balanced
        normed = scores / scores.sum(dim=-1, keepdim=True)  # (N, E) s' sums to 1 over all experts
        p = normed.view(B, T, E).mean(dim=1)  # (B, E)
        return self.aux_loss_alpha * (f * p).sum(dim=-1).mean()

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """load: (E,) tokens per expert over the whole optimizer step (every micro-batch and rank).
        ok: a device flag; where it is False (a skipped step) nothing changes but the counts reset."""
        if ok is None:
            self.last_load.copy_(load)
        else:
            self.last_load.copy_(torch.where(ok, load, self.last_load))
        if self.lossfree_balance:  # overloaded experts go down by gamma, underloaded up by gamma
            update = self.bias_update_rate * torch.sign(load.mean() - load)
            self.expert_bias += update if ok is None else update * ok
        self.tokens_per_expert.zero_()


def _named_moe_layers(model: nn.Module) -> list[tuple[str, MoEFeedForward]]:
    """(label, layer) in model order; the label is the block index ("layers.3.feed_forward" -> "3")."""
    named = []
    for name, module in model.named_modules():
        if isinstance(module, MoEFeedForward):
            block = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", name)
            named.append((block.group(1) if block else str(len(named)), module))
    return named


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [layer for _, layer in _named_moe_layers(model)]


@torch.no_grad()
def update_moe_biases(model: nn.Module, ok: torch.Tensor | None = None) -> None:
    """Call once after each optimizer step: global per-expert load -> bias update -> reset counts.
    ok: the step's device-side finiteness flag (no update where it is False), when it is not read on the host."""
    layers = moe_layers(model)
    if not layers:
        return
    counts = torch.stack([layer.tokens_per_expert for layer in layers])  # (L, E), this rank
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)  # one collective for all layers: every rank applies the same update
    for layer, load in zip(layers, counts):
        layer.update_bias(load, ok)


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the layers' balance losses from the latest forward; a 0.0 tensor when there are none."""
    losses = [layer.aux_loss for layer in moe_layers(model)]
    return torch.stack(losses).sum() if losses else torch.zeros(())


def moe_metrics(model: nn.Module) -> dict[str, float]:
    """Load of the step finished by the latest update_moe_biases (before any update: counts so far)."""
    metrics: dict[str, float] = {}
    worst = 0.0
    for label, layer in _named_moe_layers(model):
        load = layer.last_load if layer.last_load.any() else layer.tokens_per_expert
        bias = layer.expert_bias
        prefix = f"moe/L{label}"
        metrics[f"{prefix}/bias_min"] = bias.min().item()
        metrics[f"{prefix}/bias_max"] = bias.max().item()
        total = load.sum().item()
        if total > 0:
            imbalance = (load.max() / load.mean()).item()  # 1.0 = perfectly even
            metrics[f"{prefix}/imbalance"] = imbalance
            worst = max(worst, imbalance)
            for j, share in enumerate((load / total).tolist()):
                metrics[f"{prefix}/frac_e{j}"] = share
    if worst > 0:
        metrics["moe/imbalance_max"] = worst
    return metrics
