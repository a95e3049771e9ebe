"""Memory model: predicted peak bytes of one training step, term by term.

Counts what autograd keeps alive for the backward pass of our own blocks (pufferfish/model/llama.py),
so each coefficient can be checked by hand; the calibration factors below were fitted against
`torch.cuda.max_memory_allocated` (docs/benchmarks.md, pufferfish/lab/calibrate.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..optim import MUON_STACK_BYTES

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ALLOCATOR_SLACK = 1.05  # fragmentation and rounding in the caching allocator
FIXED_BYTES = 64 * 1024**2  # workspaces and small buffers inside the allocator


@dataclass(frozen=True)
class MemoryConstants:
    """The memory model's fitted constants; the defaults are the committed fit. predict_peak_bytes takes
    another set to try it (pufferfish/lab/fit_memory_model.py --refit searches them)."""

    # Fitted (python -m pufferfish.lab.fit_memory_model --refit; data and command:
    # docs/measurements/README.md) on all 89 rows of the H200 grids fit, check, check2 and check3
    # (pufferfish/lab/calibrate.py), the compiled ones re-measured after ed2f2e9's graph-break fix
    # (2026-11-30, torch 2.11), with the gradients counted where they are: a grid step runs one micro-batch,
    # so they are made in its backward (Shape.grads_in_forward=False). All rows: median 5.6 %, worst 16 %
    # (in-sample: every grid was used; the plan check below is the held-out test). Eager: measured / counted
    # bytes of the dynamic terms (activations, logits), by the worst absolute error. fp16 is taken to match
    # bf16.
    activation_calibration: dict[str, float] = field(
        default_factory=lambda: {"fp32": 0.96, "bf16": 1.20, "fp16": 1.20})
    # A torch.compile'd step (forward + loss as one graph) is counted by what that graph keeps, not as a share
    # of the eager step (compiled_bytes_per_token, logit_bytes): an under-prediction weighing 1.5x an
    # over-prediction, within the bounds of the plan check of the same day (pufferfish/lab/check_plans.py):
    # the plans' large micro-batches keep more per block than the grids' shapes (12 x 512 at 512 x 512: 1.34x
    # the count, in train.py and in calibrate.py's step alike, measured 2026-11-30; 1.1-1.25x on the grids),
    # so the plans' bound sets the block factor and the grids the rest. Compiled rows: median 3.8 %, worst 14
    # %.
    compiled_layer_factor: float = 1.30  # measured / counted bytes of a compiled block's saved tensors
    compiled_moe_factor: float = 1.8  # and of a compiled MoE block's, on top (expert dispatch keeps more: 2 rows)
    compiled_logit_bytes: float = 2  # per logit element: the graph keeps 16-bit logits; their gradient reuses them
    # a vocabulary that is not a multiple of 64 (e.g. GPT-2's 50,257) costs more per logit in the compiled
    # loss: fitted on the one such row (check3, 6 x 896, V 50,257)
    compiled_unaligned_vocab_bytes: float = 3
    # checkpointed and compiled: each block's kept input counted at this share of fp32 (the graph keeps some
    # in 16 bits), and the loss's phase at this multiple of its logits (6 rows: check2's and check3's lean
    # rows)
    compiled_ckpt_input_factor: float = 0.75
    compiled_ckpt_logit_factor: float = 1.5


CONSTANTS = MemoryConstants()  # the committed fit


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
    qk_norm: bool = False  # RMSNorm over each head's queries and keys (model.qk_norm)
    optimizer: str = "adamw"  # adamw (two fp32 moments per parameter) | muon (one for the blocks' matrices)
    ns_fp32: bool = False  # Muon's Newton-Schulz in fp32: a GPU without bf16 matmuls (optim.ns_dtype)
    shards: int = 1  # FSDP2 (train.parallel=fsdp2): ranks the weights, gradients and optimizer state are split over
    # gradients exist during the forward: with accumulation (a previous micro-batch's), the safe default. A
    # step of one micro-batch frees them (zero_grad(set_to_none=True)) and makes them during its backward
    grads_in_forward: bool = True

    @property
    def kv_dims(self) -> int:
        return self.num_kv_heads * (self.num_dims // self.num_heads)


def _layer_params(s: Shape, moe: bool, active: bool) -> int:
    C = s.num_dims
    attn = 2 * C * C + 2 * C * s.kv_dims + 2 * C  # wq, wo, wk, wv, two norms
    attn += 2 * (C // s.num_heads) if s.qk_norm else 0  # q_norm, k_norm: one weight of head_dim each
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


def muon_matrices(s: Shape) -> dict[tuple[int, int], int]:
    """The matrices Muon updates (optim.is_hidden_matrix), as (rows, cols): how many of that shape. Every
    layer's attention (wq, wo; wk, wv), the dense layers' MLP (up and gate; down), a shared expert's too."""
    C, dense = s.num_dims, s.num_layers - s.moe_layers
    mlps = [(s.ffn_dims, dense)] + ([(s.moe_expert_ffn_dims, s.moe_layers)] if s.moe_shared_expert else [])
    out: dict[tuple[int, int], int] = {}
    for shape, count in [((C, C), 2 * s.num_layers), ((s.kv_dims, C), 2 * s.num_layers)] + \
            [(shape, n * layers) for f, layers in mlps if layers for shape, n in (((f, C), 2), ((C, f), 1))]:  # fmt: skip
        out[shape] = out.get(shape, 0) + count
    return out


def muon_params(s: Shape) -> int:
    """Parameters Muon updates; 0 under AdamW."""
    if s.optimizer != "muon":
        return 0
    return sum(rows * cols * count for (rows, cols), count in muon_matrices(s).items())


def muon_step_bytes(s: Shape) -> int:
    """What Muon's step holds beside the weights, gradients and state while it orthogonalises the stacked
    matrices of one shape (optim.MuonWithAdamW): per parameter of the shape, the fp32 stack of updates
    (MUON_STACK_BYTES), two iterates and two Gram-sized matrices (short side / long side of a parameter each), in
    bf16, or in fp32 on a GPU without bf16 matmuls (Shape.ns_fp32); the largest shape's. 0 under AdamW, and under
    FSDP2 (one matrix at a time)."""
    if s.optimizer != "muon" or s.shards > 1:
        return 0
    iterate = 4 if s.ns_fp32 else 2
    return int(max(rows * cols * count * (MUON_STACK_BYTES + 2 * iterate * (1 + min(rows, cols) / max(rows, cols)))
                   for (rows, cols), count in muon_matrices(s).items()))  # fmt: skip


def optimizer_bytes(s: Shape) -> int:
    """fp32 optimizer state: AdamW's two moments per parameter, Muon's one momentum buffer per matrix it updates."""
    return 8 * count_params(s) - 4 * muon_params(s)


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
    if s.qk_norm:  # the norms keep their inputs, the raw q and k (counted, not yet measured)
        total += BYTES[s.precision] * (C + s.kv_dims)
    return total


def compiled_bytes_per_token(s: Shape, moe: bool = False) -> float:
    """Bytes one compiled block keeps for backward per token, without checkpointing: inductor's partitioner
    saves the matmuls' inputs and outputs and recomputes the cheap elementwise ops (norm outputs, RoPE,
    SiLU x gate): the fp32 residual into each norm (2 x 4C), q, k, v and the attention output in the compute
    dtype (2C + 2kv), and the two SwiGLU matmul outputs (2F)."""
    C, F = s.num_dims, s.ffn_dims
    kv = C if s.repeated_kv else s.kv_dims
    extra = 0
    if moe:  # k experts' SwiGLU outputs per token, plus the gathered inputs and router scores
        F = s.moe_active_experts * s.moe_expert_ffn_dims + (s.moe_expert_ffn_dims if s.moe_shared_expert else 0)
        extra = s.moe_active_experts * C + 2 * s.moe_num_experts
    qk = C + s.kv_dims if s.qk_norm else 0  # the normed q and k beside the raw ones (counted, not yet measured)
    return 4 * 2 * C + BYTES[s.precision] * (2 * C + 2 * kv + 2 * F + extra + qk)


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


def block_bytes_per_token(s: Shape, moe: bool) -> float:
    """What one block keeps for backward per token: eager autograd's tensors, or the compiled graph's."""
    return compiled_bytes_per_token(s, moe) if s.compiled else activation_bytes_per_token(s, moe)


def logit_bytes(s: Shape, constants: MemoryConstants = CONSTANTS) -> float:
    """The loss's tensors at its peak. Eager: logits in the compute dtype, their fp32 log-softmax and fp32
    gradient (~12 bytes per element at bf16). Eager and chunked: one chunk's logits (recomputed in backward)
    and its fp32 copies as above, plus the hidden states' gradient. Compiled, chunked or not: the graph fuses
    the fp32 softmax into its reductions and keeps the 16-bit logits of the whole micro-batch, their gradient
    written over them (measured: ~2 bytes per element; traced, the chunked loss keeps every chunk's logits);
    see MemoryConstants.compiled_logit_bytes."""
    tokens = s.micro_batch * s.seq_len
    if s.compiled:  # chunked or not: traced into the graph, the chunked loss kept every chunk's logits too
        unaligned = constants.compiled_unaligned_vocab_bytes if s.vocab_size % 64 else 0
        return tokens * s.vocab_size * (constants.compiled_logit_bytes + unaligned)
    if s.chunked_loss:
        chunk = min(tokens, s.loss_chunk_tokens) * s.vocab_size * (BYTES[s.precision] + 8)
        return chunk + tokens * s.num_dims * 4
    return tokens * s.vocab_size * (BYTES[s.precision] + 8)


def dynamic_parts(s: Shape, constants: MemoryConstants = CONSTANTS) -> tuple[float, float, float]:
    """(kept, block, loss), calibrated: what stays from the forward to the backward (every block's saved
    tensors; with checkpointing each block's input), the one block recomputed at a time (checkpointing;
    else 0), and the loss's tensors at its peak."""
    tokens = s.micro_batch * s.seq_len
    kinds = [False] * (s.moe_layers < s.num_layers) + [True] * (s.moe_layers > 0)  # dense, MoE layers
    k = constants
    per_token = {moe: block_bytes_per_token(s, moe) * (k.compiled_moe_factor if moe and s.compiled else 1)
                 for moe in kinds}  # fmt: skip
    dense = s.num_layers - s.moe_layers
    if s.compiled:
        act_k, logit_k = k.compiled_layer_factor, 1.0
        input_k, ckpt_logit_k = k.compiled_ckpt_input_factor, k.compiled_ckpt_logit_factor
    else:
        act_k = logit_k = input_k = ckpt_logit_k = k.activation_calibration[s.precision]
    kept = tokens * 4 * s.num_dims * 2  # embedding output and final norm input
    if s.grad_ckpt:  # keep each block's (fp32) input; recompute one block at a time in backward
        inputs = tokens * s.num_layers * 4 * s.num_dims
        block = tokens * max(per_token.values()) * act_k
        return kept * act_k + inputs * input_k, block, logit_bytes(s, k) * ckpt_logit_k
    kept += tokens * (dense * per_token.get(False, 0) + s.moe_layers * per_token.get(True, 0))
    return kept * act_k, 0.0, logit_bytes(s, k) * logit_k


def allocator_reserve_bytes(s: Shape) -> int:
    """What PyTorch's caching allocator may hold beyond the allocated peak, unusable by the step, that the
    planner's headroom (resolver/shapes.py USABLE_MEMORY) does not cover: for a compiled step, one micro-batch's
    16-bit logits. The plan check on each card's path (docs/benchmarks.md; H100, torch 2.11, 2026-12-05, with
    expandable segments) measured compiled steps reserving 0.43-0.80 of them beyond their peaks (rtx4060
    quick_dev: 0.70 GiB past a 7.41 GiB cap, out of memory), their eager steps at most 0.65 GiB, within it."""
    return s.micro_batch * s.seq_len * s.vocab_size * 2 if s.compiled else 0


def predict_peak_bytes(s: Shape, constants: MemoryConstants = CONSTANTS) -> MemoryBreakdown:
    """Peak bytes inside PyTorch's allocator for one training step (no CUDA context), by the committed
    constants or by `constants`."""
    P = count_params(s)
    weights, grads, optim = 4 * P, 4 * P, optimizer_bytes(s)  # fp32 master weights, fp32 grads, optimizer state
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
    kept, block, loss = dynamic_parts(s, constants)
    if s.grads_in_forward:  # every gradient all step. With checkpointing the loss's backward is over before
        # the last block is recomputed, so the two do not coexist: `logits` counts the loss's excess over the block
        acts, logits = kept + block, max(0.0, loss - block)
    else:  # the larger of two moments: the loss's backward, when only the tied output weight has its
        # gradient, and the end of the blocks' backward, every gradient made
        output_grad = min(grads, 4 * s.vocab_size * s.num_dims)
        at_end = grads + (kept + block if s.grad_ckpt else 0)
        grads, acts, logits = (output_grad, kept, loss) if kept + loss + output_grad >= at_end \
            else (grads, at_end - grads, 0)  # fmt: skip
    scores = 0
    if s.attention_math:  # (B, H, T, T) scores and probabilities, kept per layer unless recomputed
        layers_kept = 1 if s.grad_ckpt else s.num_layers
        scores = layers_kept * s.micro_batch * s.num_heads * s.seq_len**2 * BYTES[s.precision] * 2
    core = weights + grads + optim + autocast + acts + scores + logits
    # Muon's step, after the backward: every gradient, no activations, its stacked Newton-Schulz beside them.
    # Where that moment is the higher, its excess is counted with the optimizer
    transient = muon_step_bytes(s)
    step = weights + 4 * P + optim + transient
    if transient and step > core:
        optim, core = optim + step - core, step
    overhead = int(core * (ALLOCATOR_SLACK - 1)) + FIXED_BYTES
    return MemoryBreakdown(weights, grads, optim, autocast, int(acts), int(scores), int(logits), overhead)
