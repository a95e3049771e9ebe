"""Typed schemas for every config group, registered in Hydra's ConfigStore.

The YAML options under conf/<group>/ are validated against these dataclasses: an unknown key or a value
of the wrong type fails at composition time with Hydra's message naming the key. compose_config composes
them as the command line does, for the Python API, the config editor, scripts and tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from .paths import CONF_DIR


@dataclass
class GpuConfig:
    name: str = MISSING  # profile name, as in conf/gpu/<name>.yaml; `auto` reads the real device
    vram_gb: float = 0.0  # memory the plan may use; 0 on cpu means "a quarter of system RAM"
    compute_capability: float = 0.0  # 0 for cpu
    tflops_fp32: float = 0.0  # dense datasheet peak, no tensor cores
    tflops_tensor: float = 0.0  # dense fp16/bf16 tensor-core peak (datasheet); 0 where there are none
    bandwidth_gbs: float = 0.0  # memory bandwidth, GB/s
    bf16: bool = False  # bf16 arithmetic is supported (compute capability 8.0+)
    fast_fp16: bool = False  # fp16 runs faster than fp32 (tensor cores, Volta+); Pascal: memory only
    mfu: float = 0.35  # fraction of the peak a well-tuned small-model step reaches on this class
    mfu_assumed: bool = True  # not measured on this card: the plan says its speed is assumed
    emulate: bool = True  # cap the process at vram_gb when the real device is larger


@dataclass
class ModeConfig:
    name: str = MISSING
    target_hours: float = MISSING  # the time budget; the run stops here and its schedule ends here
    min_hours: float = 0.0  # the band this mode is meant for (the original README's table); outside it we warn
    max_hours: float = 0.0  # 0 = no upper end
    min_layers: int = 1
    max_layers: int = 1
    min_dims: int = 64
    max_dims: int = 64
    min_data_fraction: float = 1.0
    max_data_fraction: float = 1.0
    seq_len: int = 256  # context length for this mode


@dataclass
class ModelSpec:
    # null = the resolver decides from the gpu profile and the time budget
    num_layers: int | None = None
    num_dims: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None  # null = from the attention group
    vocab_size: int | None = None  # null = the tokenizer's size
    ffn_dims: int | None = None  # null = 8/3 * num_dims rounded up to a multiple of 64 (SwiGLU)
    seq_len: int | None = None  # null = the mode's seq_len
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (OLMo 2, Qwen3, modded-nanogpt)


@dataclass
class AttentionConfig:
    name: str = MISSING  # mha | gqa | mqa
    heads_per_kv_head: int = 1  # mha: 1; gqa: 4; mqa: 0 means one kv head for all
    head_dim: int = 64  # the resolver's heads = num_dims / head_dim
    sdpa_backend: str = "auto"  # auto | flash | efficient | cudnn | math


@dataclass
class MoeConfig:
    name: str = MISSING  # none | topk | topk_shared
    enabled: bool = False
    num_experts: int = 8
    active_experts: int = 2
    lossfree_balance: bool = True  # DeepSeek-V3 bias balancing
    bias_update_rate: float = 1e-3  # gamma
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight (DeepSeek-V3 uses 1e-4)
    shared_expert: bool = False
    every_n_layers: int = 1  # MoE in every N-th layer
    first_dense_layers: int = 0  # the first k layers stay dense
    score_func: str = "sigmoid"  # sigmoid | softmax
    expert_ffn_dims: int | None = None  # null = ffn_dims / active_experts (same active parameters as dense)


@dataclass
class OptimizationsConfig:
    # These change speed and memory only, never the maths beyond floating-point rounding.
    name: str = MISSING
    precision: str = "fp32"  # fp32 | auto (bf16 where supported, else fp16 with a scaler) | bf16 | fp16
    grad_ckpt: str = "never"  # never | auto (only when the plan needs it to fit) | always
    compile: bool = False  # torch.compile the forward and loss as one graph where the card can (the plan says)
    # inductor (fused Triton kernels: GPUs of compute capability 8.0+) or another torch.compile backend such as
    # aot_eager (no Triton; any device, the CPU too: checks compilation itself, no faster)
    compile_backend: str = "inductor"
    fused_adamw: bool = False  # fused AdamW kernel where the device has one
    chunked_loss: bool = False  # cross-entropy over sequence chunks: full fp32 logits never exist
    loss_chunk_tokens: int = 4096
    prefetch_batches: int = 2  # background-thread loader queue depth; 0 = load in the training thread
    # compiled DDP on several GPUs: whole (one graph; the gradients are all-reduced after the backward: 2-GPU
    # scaling 1.62x on two H200s) | split (torch's default: DDPOptimizer cuts the graph at each gradient bucket
    # so the all-reduces overlap the backward; 1.24x there, docs/benchmarks.md)
    ddp_graphs: str = "whole"


@dataclass
class DataConfig:
    name: str = MISSING  # pysource | pystdlib | text_files | tinystories | wikitext103 | fineweb_edu
    source: str = MISSING  # python | pystdlib | text | hub
    max_mb: float | None = None  # source=python: at most this much source text; null = what the budget can use
    paths: list[str] = field(default_factory=list)  # text_files: files or folders (*.txt, *.md, *.py)
    val_paths: list[str] = field(default_factory=list)  # optional held-out files; else a hashed split
    hub_name: str = ""  # hub datasets: path for datasets.load_dataset
    hub_config: str | None = None
    hub_split: str = "train"
    text_field: str = "text"
    max_hub_documents: int = 0  # 0 = all
    sample_by: str = "document"  # text_files: document | paragraph | line
    val_fraction: float = 0.02  # share of documents held out for validation (hashed, stable)
    vocab_size: int | None = None  # tokenizer pieces; null = sized to the corpus (data.tokenizer.auto_vocab_size)
    tokenizer_train_mb: float = 20.0  # text sampled for tokenizer training
    cache_dir: str = ""  # "" = $PUFFERFISH_CACHE or ~/.cache/pufferfish
    prompt: str = "\n"  # default prompt for the end-of-run sample


@dataclass
class LoggerConfig:
    name: str = MISSING  # jsonl | wandb
    wandb_project: str = "pufferfish"
    wandb_entity: str | None = None
    wandb_group: str | None = None  # None = the sweep directory's name (one group per multirun)
    wandb_mode: str = "auto"  # auto (offline without an API key) | online | offline | disabled


@dataclass
class OptimConfig:
    # auto | muon | adamw: Muon (momentum orthogonalised by Newton-Schulz) for the blocks' hidden matrices, AdamW
    # for the embedding and norms (pufferfish/optim.py); it keeps one buffer per matrix parameter where AdamW keeps
    # two. auto: Muon, or AdamW where Muon's plan would read the data more than 5 times (resolver/plan.py)
    name: str = "auto"
    lr: float | None = None  # null = the resolver's choice (adamw: by the model's width; muon: its AdamW part's)
    muon_lr: float | None = None  # muon: the hidden matrices' rate; null = the resolver's (0.02, Muon's own scale)
    min_lr_ratio: float = 0.0  # the schedule ends at lr * min_lr_ratio
    schedule: str = "wsd"  # wsd (warmup-stable-decay) | cosine | constant
    warmup_frac: float = 0.05
    decay_frac: float = 0.4  # wsd only: last fraction of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    seed: int = 1337
    batch_tokens: int | None = None  # tokens per optimizer step; null = the resolver's choice
    micro_batch: int | None = None  # sequences per forward; null = the largest that fits
    max_steps: int | None = None  # fixes the number of steps (the schedule runs over it) instead of the budget
    stop_at_step: int | None = None  # stop early at this step, as an interruption would (for tests and demos)
    eval_interval: int | None = None  # steps between evaluations; null = about 20 per run
    eval_tokens: int = 65536  # validation tokens per evaluation (at most; the plan keeps evaluations cheap)
    early_stop: bool = True  # end a time-budgeted run whose validation loss keeps rising above its best
    log_interval: int = 10  # steps between train lines (reading the loss syncs the device)
    ckpt_interval_s: float = 600.0  # wall seconds between checkpoints (and one at the end)
    keep_checkpoints: int = 3
    max_bad_steps: int = 3  # NaN/Inf steps in a row (each skipped) before rolling back to the last checkpoint
    sample_tokens: int = 64  # tokens sampled at the end of the run; 0 = none
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    parallel: str = "ddp"  # torchrun: ddp (a whole model per rank) | fsdp2 (weights, grads, optimizer sharded)
    progress: bool = True
    profile_steps: int = 0  # >0: torch.profiler over this many steps; tables and traces in the run directory
    profile_start: int = 10  # steps of this run (after a resume: from there) before profiling: compile, warm-up


@dataclass
class PufferfishConfig:
    gpu: GpuConfig = MISSING
    mode: ModeConfig = MISSING
    model: ModelSpec = field(default_factory=ModelSpec)
    attention: AttentionConfig = MISSING
    moe: MoeConfig = MISSING
    optimizations: OptimizationsConfig = MISSING
    data: DataConfig = MISSING
    logger: LoggerConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dry_run: bool = False  # print and save the plan, train nothing
    run_dir: str | None = None  # null = Hydra's output directory


GROUPS = {
    "gpu": GpuConfig,
    "mode": ModeConfig,
    "model": ModelSpec,
    "attention": AttentionConfig,
    "moe": MoeConfig,
    "optimizations": OptimizationsConfig,
    "data": DataConfig,
    "logger": LoggerConfig,
}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="pufferfish_schema", node=PufferfishConfig)  # train.yaml's first default


register_configs()


def compose_config(overrides: list[str], config_name: str = "train") -> DictConfig:
    """The config the command line composes from these overrides, from the package's own conf/."""
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return compose(config_name, overrides=overrides)
