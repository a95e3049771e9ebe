"""One training step at a fixed shape on random tokens, and how to time it: shared by the throughput
benchmark, the memory/speed calibration and the measuring job of sweeps."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from .loss import lm_loss
from .model import ModelConfig, build_model, count_parameters
from .optim import build_optimizer
from .transforms import apply_speed_transforms, autocast, sdpa_backend


@dataclass
class Technique:
    precision: str = "fp32"  # fp32 | bf16 | fp16
    fused: bool = False  # fused AdamW
    compile: str | None = None  # None | blocks (each block) | step (the whole forward and loss)
    chunked: bool = False  # chunked cross-entropy
    ckpt: bool = False  # activation checkpointing
    attention: str = "auto"  # the SDPA kernel: auto | flash | efficient | cudnn | math
    compile_mode: str | None = None  # torch.compile's mode for compile="step", e.g. "max-autotune-no-cudagraphs"


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def make_train_step(cfg: ModelConfig, batch: int, device: str, t: Technique, seed: int = 0):
    """A closure running one AdamW step on fixed random tokens, and the parameter count."""
    torch.manual_seed(seed)
    model = build_model(cfg, device)
    apply_speed_transforms(model, t.ckpt, t.compile == "blocks", device)
    optim_cfg = SimpleNamespace(weight_decay=0.1, beta1=0.9, beta2=0.95)
    opt = build_optimizer(model, optim_cfg, 3e-4, t.fused)
    ctx = autocast(t.precision, device)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=device)
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=device)

    def loss_fn(x, y):
        with ctx:
            return lm_loss(model, x, y, t.chunked, 4096)

    if t.compile == "step" and not str(device).startswith("cpu"):
        loss_fn = torch.compile(loss_fn, mode=t.compile_mode)

    graphs = t.compile == "step" and t.compile_mode in ("reduce-overhead", "max-autotune")

    def step():
        if graphs:  # the last step's graph outputs are dead: their memory may be reused
            torch.compiler.cudagraph_mark_step_begin()
        with sdpa_backend(t.attention):  # compiled: the kernel is chosen when the graph is traced
            loss = loss_fn(x, y)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, count_parameters(model)


def time_steps(step, device: str, warmup: int, steps: int) -> dict:
    """Warm-up steps (compilation included), then the median of synchronised timed steps."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return {"warmup_s": warm, "step_s": statistics.median(times)}


def peak_bytes_of_two_steps(step, device: str) -> int:
    """Peak allocated bytes over two steps from a clean start, as the peers' tables were measured."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    step()
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device)
