"""The training step, built once from the plan: forward and loss (compiled as one graph where the card can),
backward through the gradient scaler, clipping, the optimizer step. Training, the measuring job of sweeps, the
throughput benchmark and the memory/speed calibration all run this step, so what is measured is what runs.

A step returns its loss, gradient norm and whether it updated, all left on the device: the host reads them
at log intervals (reliability.PendingSteps), so the GPU never waits for it. A non-finite step makes no update:
fused AdamW skips it on the device (`found_inf`); otherwise the host decides, one sync a step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .distributed import gradient_sync, mean_across
from .loss import lm_loss
from .model.moe import moe_aux_loss, update_moe_biases
from .reliability import finite_on_device, reset_moe_counts, skip_on_device
from .sharding import grad_scaler as sharded_grad_scaler
from .sharding import plain
from .transforms import autocast, compile_step, grad_scaler, sdpa_backend

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs


@dataclass(frozen=True)
class StepSpec:
    """What a step needs to know; `from_plan` reads it off a plan, benchmarks set it field by field."""

    precision: str = "fp32"  # fp32 | bf16 | fp16 (with a gradient scaler)
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping, the norm is still measured)
    chunked_loss: bool = True  # cross-entropy in chunks of loss_chunk_tokens: no full logits tensor
    loss_chunk_tokens: int = 4096
    compile: bool = False  # forward and loss as one compiled graph (never Inductor on a CPU)
    compile_backend: str = "inductor"
    compile_mode: str | None = None  # torch.compile's mode, e.g. max-autotune-no-cudagraphs
    attention_kernel: str = "auto"  # the SDPA kernel: auto | flash | efficient | cudnn | math

    @classmethod
    def from_plan(cls, plan) -> StepSpec:
        return cls(precision=plan.precision, grad_accum=plan.grad_accum, grad_clip=plan.grad_clip,
                   chunked_loss=plan.chunked_loss, loss_chunk_tokens=plan.loss_chunk_tokens, compile=plan.compile,
                   compile_backend=plan.compile_backend, attention_kernel=plan.attention_kernel)  # fmt: skip


def use_tf32(device: str, enabled: bool) -> None:
    """TF32 matmuls and convolutions on a CUDA device: the card's choice (an emulated pre-Ampere card has none)."""
    if str(device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


class TrainStep:
    """One optimizer step over `spec.grad_accum` micro-batches.

    `model` is the pure model (its parameters are clipped, its MoE biases updated); `parallel` what runs the
    forward (DDP or FSDP2 wrapping it, or the model itself); `world` the data-parallel ranks, whose losses
    are averaged so that every rank skips the same steps.
    """

    def __init__(self, model, optimizer, spec: StepSpec, device: str, parallel=None, world=None,
                 sharded: bool = False):  # fmt: skip
        self.model, self.optimizer, self.spec, self.device = model, optimizer, spec, device
        self.parallel, self.world = parallel if parallel is not None else model, world
        self.autocast = autocast(spec.precision, device)
        self.scaler = (sharded_grad_scaler if sharded else grad_scaler)(spec.precision, device)
        self.on_device = skip_on_device(optimizer) and not self.scaler.is_enabled()  # fp16: the scaler decides
        self.eager_loss = self._micro_loss
        # FSDP2 compiles block by block, before sharding (transforms.apply_speed_transforms), never the step
        compiled = spec.compile and not sharded
        self.micro_loss = compile_step(self.eager_loss, compiled, device, spec.compile_backend, spec.compile_mode)
        self.graphs = self.compiled and spec.compile_mode in CUDA_GRAPH_MODES

    @property
    def compiled(self) -> bool:
        return self.micro_loss is not self.eager_loss

    def to_eager(self) -> None:
        """Run the step eager from now on (compilation failed on the device)."""
        self.micro_loss, self.graphs = self.eager_loss, False

    def follow(self, plan) -> None:
        """Take a revised plan's micro-batch, accumulation and loss settings (the same model and optimizer)."""
        self.spec = StepSpec.from_plan(plan)

    def set_lr(self, lr: float) -> None:
        """The schedule's learning rate; a group on a scale of its own (Muon's) keeps its ratio to it."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def _micro_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and loss of one micro-batch: one graph when compiled (1.4x faster than block by block)."""
        with self.autocast:
            loss = lm_loss(self.parallel, x, y, self.spec.chunked_loss, self.spec.loss_chunk_tokens)
            return loss + moe_aux_loss(self.model)

    def forward_backward(self, next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The step's micro-batches; gradients land in .grad. Returns the step's mean loss (on the device)."""
        accum = self.spec.grad_accum
        total = torch.zeros((), device=self.device)
        with sdpa_backend(self.spec.attention_kernel):  # compiled: the kernel is chosen when the graph is traced
            for i in range(accum):
                x, y = next_batch()
                if self.graphs:  # the last step's graph outputs are dead: their memory may be reused
                    torch.compiler.cudagraph_mark_step_begin()
                with gradient_sync(self.parallel, i == accum - 1):  # DDP: once a step; FSDP2: every micro-batch
                    loss = self.micro_loss(x, y)
                    self.scaler.scale(loss / accum).backward()
                total += loss.detach()
        return total / accum

    def update(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip, then step the optimizer unless the step is non-finite. Returns (grad norm, updated), on the device."""
        self.scaler.unscale_(self.optimizer)
        clip = self.spec.grad_clip if self.spec.grad_clip > 0 else float("inf")
        grad_norm = plain(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))  # FSDP2: a DTensor
        ok = finite_on_device(loss, grad_norm, self.scaler.is_enabled())
        if self.on_device:  # a non-finite step makes no update, decided on the device
            self.optimizer.found_inf = (~ok).float()
            self.optimizer.step()
            update_moe_biases(self.model, ok)
        elif ok.item():  # the host decides: one sync
            self.scaler.step(self.optimizer)  # skips the step by itself when fp16 gradients overflowed
            update_moe_biases(self.model)
        else:
            reset_moe_counts(self.model)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, ok

    def __call__(self, next_batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step: (mean loss, gradient norm, updated), on the device."""
        loss = self.forward_backward(next_batch)
        if self.world is not None:
            loss = mean_across(self.world, loss)  # every rank sees the same loss, so all skip or none
        grad_norm, ok = self.update(loss)
        return loss, grad_norm, ok
