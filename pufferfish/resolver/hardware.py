"""What the run may use: the gpu profile, or the real device for `gpu=auto`, and how fast it is."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from omegaconf import OmegaConf

from ..errors import ConfigError
from ..paths import CONF_DIR
from .capabilities import choose_precision

CONF_GPU = CONF_DIR / "gpu"
GIB = 1024**3
CUDA_CONTEXT_BYTES = 600 * 1024**2  # CUDA context + cuBLAS/cuDNN workspaces: outside PyTorch's allocator


@dataclass
class Hardware:
    profile: str  # the gpu profile the plan is for
    device: str  # where this process runs: cpu | cuda:N
    device_name: str  # what is really there
    vram_bytes: int  # memory the plan may fill (the profile's, or what is free on `auto`)
    precision: str  # fp32 | bf16 | fp16, from the optimizations group and what the profile supports
    peak_flops: float  # datasheet (or probed, on cpu) FLOP/s at that precision
    mfu: float  # achievable share of peak_flops
    emulated: bool  # the profile is smaller than the real device: memory is capped to it
    notes: list[str]
    compute_capability: float = 0.0  # 0 on cpu
    bandwidth: float = 0.0  # datasheet memory bandwidth, bytes/s (0 on cpu): the speed model's roofline
    precision_reason: str = ""  # why that precision (capabilities.choose_precision)
    mfu_assumed: bool = False  # the profile's mfu is assumed, not measured on its card: the plan says so

    def to_dict(self) -> dict:
        return asdict(self)


def known_profiles() -> list[str]:
    return sorted(p.stem for p in CONF_GPU.glob("*.yaml"))


def load_profile(name: str):
    path = CONF_GPU / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"gpu={name} is not a known profile; known: {', '.join(known_profiles())}")
    return OmegaConf.load(path)


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={requested} but no CUDA device is visible; use train.device=cpu")
    if requested != "cpu" and not requested.startswith("cuda"):
        raise ConfigError(f"train.device={requested!r}; allowed: auto, cpu, cuda, cuda:N")
    return requested


def nearest_profile(device_name: str, total_bytes: int) -> str:
    name = device_name.lower()
    for key, profile in [
        ("h200", "h200"), ("h100", "h100"), ("4090", "rtx4090"), ("4060", "rtx4060"), ("3090", "rtx3090"),
        ("3060", "rtx3060"), ("2060", "rtx2060"), ("1060", "gtx1060"), ("1650", "gtx1650"),
    ]:  # fmt: skip
        if key in name:
            return profile
    if "a100" in name:
        return "a100_80gb" if total_bytes > 50 * GIB else "a100_40gb"
    # unknown card: the profile with the closest memory
    sized = [(abs(float(load_profile(p).vram_gb) * GIB - total_bytes), p) for p in known_profiles()
             if p not in ("auto", "cpu")]  # fmt: skip
    return min(sized)[1]


def cpu_matmul_flops(seconds: float = 0.3, n: int = 512) -> float:
    """Measured fp32 matmul rate of this CPU with torch's threads: the cpu profile's peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / elapsed


def system_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * GIB


def profile_peak_flops(prof, precision: str) -> float:
    """The matmul peak a GPU profile offers at a precision (datasheet, dense)."""
    tensor = float(prof.tflops_tensor)
    if precision != "fp32" and tensor > 0 and prof.fast_fp16:
        return 1e12 * tensor
    if float(prof.compute_capability) >= 8.0:  # fp32 matmuls run as TF32 on tensor cores (half rate)
        return 1e12 * max(float(prof.tflops_fp32), tensor / 2)
    return 1e12 * float(prof.tflops_fp32)


def detect_hardware(gpu_cfg, optimizations_cfg, requested_device: str = "auto") -> Hardware:
    """The Hardware of the gpu profile on the device this process sees."""
    device = pick_device("cpu" if gpu_cfg.name == "cpu" and requested_device == "auto" else requested_device)
    if device == "cpu":
        return hardware_on(gpu_cfg, optimizations_cfg, "cpu", "cpu", system_memory_bytes(), 0)
    index = torch.device(device).index or 0
    props = torch.cuda.get_device_properties(index)
    free, _ = torch.cuda.mem_get_info(index)
    return hardware_on(gpu_cfg, optimizations_cfg, device, props.name, props.total_memory, free)


def own_card(cfg) -> Hardware:
    """The gpu profile's Hardware as if its own card were present (its whole memory free), described without a
    device: what the tables of predicted plans and speeds plan for."""
    total = int(float(cfg.gpu.vram_gb) * GIB)
    return hardware_on(cfg.gpu, cfg.optimizations, "cuda:0", cfg.gpu.name, total, total)


def hardware_on(gpu_cfg, optimizations_cfg, device: str, device_name: str, total: int, free: int) -> Hardware:
    """The Hardware of the gpu profile on a described device (its name, total and free bytes): the profile
    mapping, precision, peak and emulation rules, without touching the device (pufferfish/lab/check_plans.py plans
    for GPUs it leaves to its jobs)."""
    on_cpu = device == "cpu"
    notes: list[str] = []
    profile = gpu_cfg.name
    prof = gpu_cfg
    if on_cpu:
        if profile not in ("auto", "cpu"):
            notes.append(f"no GPU here: planning for gpu={profile}, running on the CPU (slow, unemulated)")
        else:
            profile, prof = "cpu", load_profile("cpu")
    elif profile == "auto":
        profile = nearest_profile(device_name, total)
        prof = load_profile(profile)
        notes.append(f"gpu=auto: {device_name} ({total / GIB:.1f} GiB) maps to profile {profile}")
    precision, why = choose_precision(optimizations_cfg.precision, bool(prof.bf16), bool(prof.fast_fp16), on_cpu)

    if profile == "cpu":
        peak = cpu_matmul_flops()
        vram = int(float(prof.vram_gb) * GIB) or system_memory_bytes() // 4
        notes.append(f"cpu: measured fp32 matmul rate {peak / 1e9:.1f} GFLOP/s")
    else:
        peak = profile_peak_flops(prof, precision)
        vram = int(float(prof.vram_gb) * GIB)
    emulated = False
    if not on_cpu:
        if gpu_cfg.name == "auto":
            vram = free
        elif vram < total and bool(prof.get("emulate", True)):
            emulated = True
            notes.append(f"emulating {profile}: memory capped at {vram / GIB:.1f} GiB of {total / GIB:.1f} GiB; the "
                         f"card's path (precision, compile, attention kernel) at {device_name}'s speed, not the card's")
        elif vram > free:
            notes.append(f"profile {profile} has {vram / GIB:.1f} GiB but only {free / GIB:.1f} GiB is free")
            vram = free
    return Hardware(profile, device, device_name, vram, precision, peak, float(prof.mfu), emulated, notes,
                    float(prof.compute_capability), 1e9 * float(prof.get("bandwidth_gbs", 0) or 0), why,
                    bool(prof.get("mfu_assumed", False)))  # fmt: skip


def prefer_expandable_segments() -> None:
    """Let PyTorch's CUDA allocator grow its segments in place rather than cache fixed-size ones: far less
    memory reserved but unusable (an emulated 4 GiB plan once ran out with 240 MiB of it). Set before CUDA
    starts (the allocator reads it once), on Linux (elsewhere it is not supported), and never over the
    user's own PYTORCH_CUDA_ALLOC_CONF or PYTORCH_ALLOC_CONF."""
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"):
        return
    if sys.platform.startswith("linux") and not torch.cuda.is_initialized():
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def apply_memory_cap(hw: Hardware) -> None:
    """Cap PyTorch's allocator so an emulated profile's plan really has only that much memory."""
    if not hw.emulated:
        return
    index = torch.device(hw.device).index or 0
    total = torch.cuda.get_device_properties(index).total_memory
    allowed = max(hw.vram_bytes - CUDA_CONTEXT_BYTES, GIB // 4)  # the context lives outside the allocator
    torch.cuda.set_per_process_memory_fraction(min(1.0, allowed / total), index)
