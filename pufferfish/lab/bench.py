"""The training step (step.py) at a fixed shape on random tokens, and how to time it: for the throughput
benchmark and the memory/speed calibration."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from pufferfish.model import ModelConfig, build_model, count_parameters
from pufferfish.optim import build_optimizer
from pufferfish.resolver.plan import OPTIMIZER_DEFAULTS
from pufferfish.step import StepSpec, TrainStep
from pufferfish.transforms import apply_speed_transforms


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
    """A closure running one training step (step.py's, as a run runs it) on fixed random tokens, with AdamW at
    the default optim settings; and the parameter count."""
    torch.manual_seed(seed)
    model = build_model(cfg, device)
    apply_speed_transforms(model, t.ckpt, t.compile == "blocks", device)
    optimizer = build_optimizer(model, OPTIMIZER_DEFAULTS, 3e-4, t.fused)
    spec = StepSpec(precision=t.precision, chunked_loss=t.chunked, compile=t.compile == "step",
                    compile_mode=t.compile_mode, attention_kernel=t.attention)  # fmt: skip
    train_step = TrainStep(model, optimizer, spec, device)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=device)
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=device)

    def step():
        train_step(lambda: (x, y))

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
