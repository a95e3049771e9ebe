"""What a card can run, decided once per plan: precision, compilation, the attention kernel, fused AdamW, TF32.

Decided from the gpu profile (for `gpu=auto`, the profile the device maps to), never from the GPU the process
happens to run on: `gpu=gtx1060` emulated on an H200 runs the 1060's path (eager, fp32, no flash kernel), so
the plan check measures the memory of the step a real 1060 runs. The loop reads these decisions from the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..errors import ConfigError
from .speed import CONSTANTS

# On compute capability 6.1 (GTX 10 series) 16-bit floating-point arithmetic runs at 2 results per clock per SM
# against 128 for 32-bit (CUDA C++ Programming Guide, "Arithmetic Instructions" throughput table): fp16 there
# saves activation memory, never time
PASCAL_FP16_RATE = 1 / 64


@dataclass(frozen=True)
class Architecture:
    name: str
    min_capability: float  # the lowest compute capability of the family
    inductor: bool  # torch.compile's Inductor backend (Triton kernels) is trusted here
    flash: bool  # PyTorch's FlashAttention-2 kernel runs here (16-bit inputs only)
    tf32: bool  # fp32 matmuls may run on tensor cores as TF32
    why_eager: str = ""  # the reason when Inductor is not trusted


# One row per family, newest first: a card takes the first row at or below its compute capability.
# The efficient (memory-efficient) SDPA kernel runs from sm50 up in any precision; flash needs sm80 and 16 bits.
TRITON_FLOOR = "Inductor's Triton kernels need compute capability 7.0+ (torch raises GPUTooOldForTriton below)"
TURING = ("Triton supports compute capability 8.0+ officially and some of its kernels fail on 7.x "
          "(triton-lang/triton#7263): eager until measured otherwise")  # fmt: skip
ARCHITECTURES = [
    Architecture("Hopper", 9.0, inductor=True, flash=True, tf32=True),
    Architecture("Ada Lovelace", 8.9, inductor=True, flash=True, tf32=True),
    Architecture("Ampere", 8.0, inductor=True, flash=True, tf32=True),
    Architecture("Turing", 7.5, inductor=False, flash=False, tf32=False, why_eager=TURING),
    Architecture("Volta", 7.0, inductor=False, flash=False, tf32=False, why_eager=TURING),
    Architecture("Pascal", 6.0, inductor=False, flash=False, tf32=False, why_eager=TRITON_FLOOR),
    Architecture("Maxwell", 5.0, inductor=False, flash=False, tf32=False, why_eager=TRITON_FLOOR),
]
# SDPA kernels, most preferred first; a plan's kernel allows itself and those after it (transforms.sdpa_backend):
# flash allows them all, as torch's own choice does on the cards the speed model was fitted on
ATTENTION_KERNELS = ("flash", "cudnn", "efficient", "math")


def architecture(capability: float) -> Architecture:
    for arch in ARCHITECTURES:
        if capability >= arch.min_capability:
            return arch
    raise ConfigError(f"compute capability {capability} is below {ARCHITECTURES[-1].min_capability}, the oldest "
                      f"PyTorch's CUDA builds support ({ARCHITECTURES[-1].name}); use gpu=cpu")  # fmt: skip


def choose_precision(requested: str, bf16: bool, fast_fp16: bool, on_cpu: bool) -> tuple[str, str]:
    """(precision, why): bf16 where the card has it, fp16 with a gradient scaler where fp16 is fast, else fp32."""
    allowed = ("fp32", "auto", "bf16", "fp16")
    if requested not in allowed:
        raise ConfigError(f"optimizations.precision={requested!r}; allowed: {', '.join(allowed)}")
    if on_cpu:
        return "fp32", "fp32: the CPU" + (f" (mixed precision is GPU-only here; {requested} asked for)"
                                          if requested not in ("fp32", "auto") else "")  # fmt: skip
    if requested == "fp32":
        return "fp32", "fp32: asked for (optimizations.precision=fp32)"
    if requested == "bf16" and not bf16:
        raise ConfigError("optimizations.precision=bf16 needs compute capability 8.0+; use auto or fp16")
    slow_fp16 = (f"this card has no fast fp16 (its fp16 arithmetic runs at 1/{round(1 / PASCAL_FP16_RATE)} of "
                 f"fp32 on compute capability 6.x)")  # fmt: skip
    if requested == "fp16":
        why = "fp16 autocast with a gradient scaler: asked for"
        return "fp16", why + ("" if fast_fp16 else f"; {slow_fp16}: it saves activation memory but costs speed")
    if requested == "bf16" or bf16:
        return "bf16", "bf16 autocast: supported on this card (compute capability 8.0+), no loss scaling needed"
    if fast_fp16:
        return "fp16", "fp16 autocast with a gradient scaler: no bf16 before compute capability 8.0, and fp16 is fast here"
    return "fp32", f"fp32: {slow_fp16}; optimizations.precision=fp16 would save activation memory at that cost"


@dataclass
class CardPath:
    """The step a plan runs on its card; `reasons` holds one line per decision for plan.reasons."""

    precision: str
    compile: bool  # torch.compile the forward and loss (train.py's compile_step)
    compile_backend: str
    attention_kernel: str  # auto (torch chooses: the CPU) | cudnn | flash | efficient | math
    fused_adamw: bool
    tf32: bool
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def inductor(self) -> bool:
        """A step compiled by Inductor: what the memory and speed models count as compiled (fused kernels)."""
        return self.compile and self.compile_backend == "inductor"

    def eager(self, why: str) -> CardPath:
        """The same step run eagerly, `why` its compile reason."""
        return replace(self, compile=False, reasons={**self.reasons, "compile": why})


def _compile(opt, hw, arch: Architecture | None) -> tuple[bool, str]:
    backend = str(getattr(opt, "compile_backend", "inductor"))
    if not opt.compile:
        return False, f"eager: optimizations={getattr(opt, 'name', '')} leaves compile off"
    if backend != "inductor":
        known = torch._dynamo.list_backends(exclude_tags=())
        if backend not in known:
            raise ConfigError(f"optimizations.compile_backend={backend!r} is not a torch.compile backend here; "
                              f"known: {', '.join(known)}")  # fmt: skip
        return True, f"compiled by torch.compile's {backend} backend (asked for): no Triton needed, counted as eager"
    if arch is None:
        return False, "eager: the CPU (Inductor's C++ build costs minutes of compilation for little gain)"
    if not arch.inductor:
        return False, f"eager: {arch.name} (compute capability {hw.compute_capability}): {arch.why_eager}"
    return True, f"compiled (forward + loss, Inductor): {arch.name}, compute capability {hw.compute_capability}"


def _attention(requested: str, precision: str, arch: Architecture | None) -> tuple[str, str]:
    if arch is None:
        return ("auto", "torch's CPU kernel") if requested == "auto" else (requested, "asked for (attention.sdpa_backend)")
    flash_why = ("" if arch.flash and precision != "fp32" else
                 f"flash needs compute capability 8.0+ ({arch.name} is older)" if not arch.flash else
                 "flash takes 16-bit inputs only (fp32 here)")  # fmt: skip
    if requested in ("auto", "flash") and not flash_why:
        return "flash", "flash (FlashAttention-2): 16-bit on compute capability 8.0+" + (
            ", asked for" if requested == "flash" else "")
    if requested in ("auto", "flash"):  # the best kernel the card has: never a crash for a missing one
        return "efficient", f"memory-efficient: {flash_why}" + (" (attention.sdpa_backend=flash asked for)"
                                                                   if requested == "flash" else "")  # fmt: skip
    if requested == "cudnn" and arch.min_capability < 8.0:
        return "efficient", "memory-efficient: cuDNN attention needs compute capability 8.0+ (cudnn asked for)"
    return requested, f"{requested}: asked for (attention.sdpa_backend)"


def card_path(cfg, hw) -> CardPath:
    """The step the plan's card runs, with a reason for each decision. `hw.device == "cpu"`: this process runs
    on the CPU, which takes the CPU's path whatever profile it plans for."""
    opt = cfg.optimizations
    on_gpu = not hw.device.startswith("cpu")
    arch = architecture(hw.compute_capability) if on_gpu and hw.profile != "cpu" else None
    compiled, compile_why = _compile(opt, hw, arch)
    kernel, kernel_why = _attention(cfg.attention.sdpa_backend, hw.precision, arch)
    fused = bool(getattr(opt, "fused_adamw", False))  # the calibration's bare namespaces leave it out
    fused_why = (f"off: optimizations={getattr(opt, 'name', '')} leaves it off" if not fused else
                 "fused AdamW: one kernel for every parameter (CUDA: every card; CPU: torch 2.4+)")  # fmt: skip
    if fused and getattr(getattr(cfg, "optim", None), "name", "adamw") == "muon":
        fused, fused_why = False, ("off: optim.name=muon runs Muon and AdamW as one optimizer, not fused; the host "
                                   "decides whether a non-finite step updates")  # fmt: skip
    tf32 = arch is not None and arch.tf32
    reasons = {"precision": getattr(hw, "precision_reason", "") or hw.precision, "compile": compile_why,
               "attention": kernel_why, "fused_adamw": fused_why}  # fmt: skip
    if arch is not None:
        reasons["tf32"] = ("fp32 matmuls as TF32 on tensor cores (compute capability 8.0+)" if tf32 else
                           f"off: {arch.name} has no TF32; fp32 matmuls run in full fp32")  # fmt: skip
    share = "assumed: not measured on this card" if getattr(hw, "mfu_assumed", False) else "measured"
    reasons["speed"] = f"{hw.peak_flops / 1e12:.2f} TFLOP/s peak x {hw.mfu:.2f} share of it ({share})"
    if hw.profile == "cpu":
        reasons["speed"] = (f"{hw.peak_flops / 1e12:.2f} TFLOP/s (fp32 matmuls probed on this CPU) x {hw.mfu:.2f} x "
                            f"d / (d + {CONSTANTS.cpu_half_share_dims:g}) of it at width d (a share measured on another "
                            "CPU by python -m pufferfish.lab.cpu_speed)")  # fmt: skip
    if hw.emulated:
        reasons["speed"] += f"; emulated, this run goes at {hw.device_name}'s speed, not the card's"
    return CardPath(hw.precision, compiled, str(getattr(opt, "compile_backend", "inductor")), kernel, fused, tf32,
                    reasons)
