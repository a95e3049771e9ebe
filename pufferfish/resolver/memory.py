"""Memory model: predicted peak bytes of one training step, term by term.

Counts what autograd keeps alive for the backward pass of our own blocks (pufferfish/model/llama.py),
so each coefficient can be checked by hand; the calibration factors below were fitted against
`torch.cuda.max_memory_allocated` (docs/benchmarks.md, scripts/calibrate.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# measured / predicted bytes of the dynamic terms (activations, logits), fitted on the H200 over 22 shapes
# (scripts/calibrate.py --grid fit, 2026-11-29; docs/benchmarks.md). fp16 is taken to match bf16.
ACTIVATION_CALIBRATION = {"fp32": 1.04, "bf16": 1.11, "fp16": 1.11}
# torch.compile fuses elementwise chains, so far fewer tensors are kept. The five compiled steps of the H200
# calibration grids ask for 0.36-0.67 (median 0.52; scripts/fit_speed_model.py), but the deep plans of
# scripts/check_plans.py (30 x 768 at micro-batch 5-192, on the H200 under emulated caps) needed 1.00-1.08 x
# 0.55 and ran out of memory at 0.55 where the plan filled the card: 0.62 covers them with ~5 % to spare,
# on the safe side for the shallow shapes, which need less (docs/benchmarks.md)
COMPILED_ACTIVATIONS = 0.62
ALLOCATOR_SLACK = 1.05  # fragmentation and rounding in the caching allocator
FIXED_BYTES = 64 * 1024**2  # workspaces and small buffers inside the allocator


@dataclass
class Shape:
    num_layers: int
    num_dims: int
    num_heads: int
    num_kv_heads: int
    ffn_dims: int
    vocab_size: int
    seq_len: int
    micro_batch: int = 1
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast: weights and optimizer stay fp32)
    grad_ckpt: bool = False
    chunked_loss: bool = False
    loss_chunk_tokens: int = 4096
    attention_math: bool = False  # the math SDPA kernel keeps (T x T) scores; flash/efficient do not
    compiled: bool = False  # torch.compile of the training step (GPU)
    repeated_kv: bool = False  # GQA without flash (fp32, pre-sm80 GPUs): K/V heads are repeated and kept
    moe_layers: int = 0  # how many layers hold experts instead of the dense MLP
    moe_num_experts: int = 0
    moe_active_experts: int = 0
    moe_expert_ffn_dims: int = 0
    moe_shared_expert: bool = False
    shards: int = 1  # FSDP2 (train.parallel=fsdp2): ranks the weights, gradients and AdamW state are split over

    @property
    def kv_dims(self) -> int:
        return self.num_kv_heads * (self.num_dims // self.num_heads)


def _layer_params(s: Shape, moe: bool, active: bool) -> int:
    C = s.num_dims
    attn = 2 * C * C + 2 * C * s.kv_dims + 2 * C  # wq, wo, wk, wv, two norms
    if not moe:
        return attn + 3 * C * s.ffn_dims
    experts = s.moe_active_experts if active else s.moe_num_experts
    shared = 3 * C * s.moe_expert_ffn_dims if s.moe_shared_expert else 0
    return attn + experts * 3 * C * s.moe_expert_ffn_dims + shared + C * s.moe_num_experts  # + router


def count_params(s: Shape, active: bool = False) -> int:
    """Parameters (tied embedding once). active=True counts only the experts a token uses."""
    dense_layers = s.num_layers - s.moe_layers
    return (
        s.vocab_size * s.num_dims
        + s.num_dims  # final norm
        + dense_layers * _layer_params(s, False, active)
        + s.moe_layers * _layer_params(s, True, active)
    )


def activation_bytes_per_token(s: Shape, moe: bool = False) -> float:
    """Bytes one block keeps for backward per token, without checkpointing."""
    C, F = s.num_dims, s.ffn_dims
    kv = C if s.repeated_kv else s.kv_dims
    if moe:  # k experts' SwiGLU intermediates per token, plus the gathered inputs and router scores
        F = s.moe_active_experts * s.moe_expert_ffn_dims + (s.moe_expert_ffn_dims if s.moe_shared_expert else 0)
        extra = s.moe_active_experts * C + 2 * s.moe_num_experts
    else:
        extra = 0
    if s.precision == "fp32":
        # two norm inputs, two norm outputs, q, k, v, attention output (SDPA's and wo's copy), 4 SwiGLU tensors
        elems = 7 * C + 2 * kv + 4 * F + extra
        total = 4 * elems
    else:
        # fp32 residual into the norms, 16-bit copies of everything a matmul saves
        total = 4 * 2 * C + 2 * (2 * C + C + 2 * kv + 2 * C + 4 * F + extra)
    return total


@dataclass
class MemoryBreakdown:
    weights: int
    gradients: int
    optimizer: int
    autocast_copies: int
    activations: int
    attention_scores: int
    logits: int
    overhead: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def predict_peak_bytes(s: Shape) -> MemoryBreakdown:
    """Peak bytes inside PyTorch's allocator for one AdamW training step (no CUDA context)."""
    P = count_params(s)
    tokens = s.micro_batch * s.seq_len
    weights, grads, optim = 4 * P, 4 * P, 8 * P  # fp32 master weights, fp32 grads, AdamW m and v
    autocast = 2 * P if s.precision != "fp32" else 0  # 16-bit weight copies cached by autocast
    if s.shards > 1:  # FSDP2: each rank keeps 1/N of those, and gathers full weights (and gets full gradients
        # before the reduce-scatter) of the root, the tied embedding, kept all step, and of two blocks at a
        # time, the one running and the next, prefetched. bf16 gathers in bf16, so autocast copies nothing.
        # An estimate from the sharding scheme: FSDP2 peaks have not been measured on GPUs yet
        kinds = [False] * (s.moe_layers < s.num_layers) + [True] * (s.moe_layers > 0)  # dense, MoE layers
        layer = max(_layer_params(s, moe, active=False) for moe in kinds)
        gathered = (s.vocab_size * s.num_dims + 2 * layer) * (2 if s.precision == "bf16" else 4)
        weights, grads = -(-weights // s.shards) + gathered, -(-grads // s.shards) + gathered
        optim = -(-optim // s.shards)
        autocast = 0 if s.precision == "bf16" else autocast
    per_token = {
        False: activation_bytes_per_token(s, moe=False),
        True: activation_bytes_per_token(s, moe=True),
    }
    dense_layers = s.num_layers - s.moe_layers
    full = dense_layers * per_token[False] + s.moe_layers * per_token[True]
    if s.grad_ckpt:  # keep each block's input; recompute one block at a time in backward
        acts = tokens * (s.num_layers * 4 * s.num_dims + max(per_token[False], per_token[True] if s.moe_layers else 0))
    else:
        acts = tokens * full
    acts += tokens * 4 * s.num_dims * 2  # embedding output and final norm input
    scores = 0
    if s.attention_math:  # (B, H, T, T) scores and probabilities, kept per layer unless recomputed
        layers_kept = 1 if s.grad_ckpt else s.num_layers
        scores = layers_kept * s.micro_batch * s.num_heads * s.seq_len**2 * BYTES[s.precision] * 2
    # logits in the compute dtype, their fp32 log-softmax and the fp32 gradient: ~12 bytes per element
    logit_tokens = min(tokens, s.loss_chunk_tokens) if s.chunked_loss else tokens
    logits = logit_tokens * s.vocab_size * (BYTES[s.precision] + 8)
    if s.chunked_loss:
        logits += tokens * s.num_dims * 4  # the hidden states' gradient, gathered chunk by chunk
    dynamic = ACTIVATION_CALIBRATION[s.precision] * (COMPILED_ACTIVATIONS if s.compiled else 1.0)
    acts, logits = acts * dynamic, logits * dynamic
    core = weights + grads + optim + autocast + acts + scores + logits
    overhead = int(core * (ALLOCATOR_SLACK - 1)) + FIXED_BYTES
    return MemoryBreakdown(weights, grads, optim, autocast, int(acts), int(scores), int(logits), overhead)
