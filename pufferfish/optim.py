"""The optimizer, one of OPTIMIZERS keyed by `optim.name`: AdamW with weight decay on matrices only (fused where
the device has the kernel), or Muon for the blocks' hidden matrices with AdamW for everything else.

Muon (Keller Jordan, 2024; torch.optim.Muon since torch 2.9) replaces each hidden matrix's update by the
orthogonalised momentum of its gradient (Newton-Schulz iterations), so every direction of the matrix moves
by about the same amount. It keeps one buffer per parameter where AdamW keeps two. Both run inside one
torch.optim.Optimizer, so the gradient scaler, clipping, state_dict, checkpoints and FSDP2's full-state
gathering see one optimizer as before.
"""

from __future__ import annotations

import contextlib
import inspect
import math

import torch

from .errors import ConfigError

# torch.optim.Muon's defaults (Keller Jordan's published values): momentum, Nesterov, the quintic iteration's
# coefficients, its steps and the norm's floor
MUON_MOMENTUM = 0.95
MUON_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
MUON_NS_STEPS = 5
# bytes a parameter of one shape's stacked matrices take while Muon's step runs its Newton-Schulz: the fp32 stack
# of updates (and, for Nesterov's, the momentum's stack beside it) and two iterates of 2 bytes (bf16), or of 4 on
# a card without bf16 matmuls (ns_dtype)
MUON_STACK_BYTES = 4
MUON_EPS = 1e-7
MUON_LR = 0.02  # Muon's own scale (modded-nanogpt's and the Muon repository's default), before the shape factor


def adamw_settings(settings, lr: float) -> dict:
    return dict(lr=lr, betas=(settings["beta1"], settings["beta2"]), eps=1e-8)


def decay_groups(params: list, weight_decay: float) -> list[dict]:
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},  # matrices, the tied embedding
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},  # norms: decaying them only hurts
    ]


def build_adamw(model, settings, lr: float, fused: bool) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = decay_groups(params, settings["weight_decay"])
    kwargs = adamw_settings(settings, lr)
    if fused and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        try:  # CUDA; CPU since torch 2.4. Fused also skips a non-finite step on the device (reliability.py)
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except RuntimeError:  # no fused kernel for this device or dtype
            pass
    return torch.optim.AdamW(groups, **kwargs)


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """A matrix Muon updates: the attention and MLP projections inside the blocks (a shared expert's too). The
    embedding (tied to the output head), the norms, the MoE router (its rows score experts, they are not a
    hidden transform) and the experts' 3-D weight stacks stay with AdamW."""
    return name.startswith("layers.") and p.dim() == 2 and not name.endswith(".gate.weight")


def ns_dtype_for(capability: float | None) -> torch.dtype:
    """The Newton-Schulz iteration's dtype on a GPU of this compute capability (None: the CPU): bf16 (torch.optim.
    Muon's) on the CPU and from 8.0; fp32 on older cards, which have no bf16 matmuls (a GTX 1060: none at all; a
    V100: no bf16 tensor cores). The memory model asks the same of a card's profile."""
    return torch.float32 if capability is not None and capability < 8.0 else torch.bfloat16


def ns_dtype(device: torch.device) -> torch.dtype:
    """ns_dtype_for the device the matrices are on."""
    if device.type != "cuda":
        return ns_dtype_for(None)
    major, minor = torch.cuda.get_device_capability(device)
    return ns_dtype_for(major + minor / 10)


def newton_schulz(g: torch.Tensor, coefficients=MUON_NS_COEFFICIENTS, steps: int = MUON_NS_STEPS,
                  eps: float = MUON_EPS) -> torch.Tensor:  # fmt: skip
    """About U V^T of g = U S V^T, in bf16 (ns_dtype), by the quintic iteration (torch.optim.Muon's, step for step).
    `g` is one matrix or a stack (count, rows, cols) of matrices of one shape, each orthogonalised on its own: one
    batched matmul for the stack instead of one per matrix (on a GPU, a few kernel launches instead of hundreds
    a step)."""
    a, b, c = coefficients
    x = g.to(ns_dtype(g.device))
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT  # (short, long): the Gram matrix is the smaller one
    stacked = x.dim() == 3
    x = x / (x.norm(dim=(-2, -1), keepdim=True) if stacked else x.norm()).clamp(min=eps)  # spectral norm <= 1
    mm = torch.baddbmm if stacked else torch.addmm
    for _ in range(steps):
        gram = x @ x.mT
        x = mm(x, mm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def muon_lr_factor(shape) -> float:
    """torch.optim.Muon's "original" adjustment: a tall matrix's orthogonal update has a smaller RMS per
    element, so its learning rate is scaled by sqrt(rows / cols) (Keller Jordan's Muon)."""
    rows, cols = shape[:2]
    return math.sqrt(max(1.0, rows / cols))


def _orthogonalised(update: torch.Tensor, group: dict) -> torch.Tensor:
    if hasattr(update, "full_tensor"):  # FSDP2: a shard of the matrix; orthogonalise the whole, keep this rank's part
        try:  # torch >= 2.5
            from torch.distributed.tensor import DTensor, Replicate
        except ImportError:
            from torch.distributed._tensor import DTensor, Replicate

        whole = newton_schulz(update.full_tensor(), group["ns_coefficients"], group["ns_steps"], group["eps"])
        replicated = DTensor.from_local(whole, update.device_mesh, [Replicate()], run_check=False)
        return replicated.redistribute(update.device_mesh, update.placements)
    return newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])


class MuonWithAdamW(torch.optim.AdamW):
    """One optimizer: param groups with `muon=True` take Muon's update (torch.optim.Muon's maths), the others
    AdamW's. Each group's learning rate is `lr_scale` times the schedule's (TrainStep.set_lr), so Muon's
    scale rides on the same schedule as AdamW's."""

    def __init__(self, adamw_groups: list[dict], muon_params: list, lr: float, muon_lr: float, settings):
        # Muon's decoupled decay shrinks by lr x weight_decay per step, as AdamW's does: scaled so that
        # optim.weight_decay means the same shrink per step under both learning rates
        muon = {"params": muon_params, "muon": True, "lr": muon_lr, "lr_scale": muon_lr / lr,
                "weight_decay": settings["weight_decay"] * lr / muon_lr, "momentum": MUON_MOMENTUM, "nesterov": True,
                "ns_coefficients": MUON_NS_COEFFICIENTS, "ns_steps": MUON_NS_STEPS, "eps": MUON_EPS}  # fmt: skip
        groups = [{**g, "muon": False, "lr_scale": 1.0} for g in adamw_groups] + ([muon] if muon_params else [])
        super().__init__(groups, **adamw_settings(settings, lr))  # never fused: the host decides a skipped step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._adamw_groups():  # AdamW's own step over its groups: its maths and foreach kernels, as torch has them
            super().step()
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
        return loss

    def __setstate__(self, state):  # load_state_dict: AdamW's checks of its state (a "step") see its groups alone
        groups = state["param_groups"]
        super().__setstate__({**state, "param_groups": [g for g in groups if not g.get("muon")]})
        self.param_groups = groups

    @contextlib.contextmanager
    def _adamw_groups(self):
        groups = self.param_groups
        self.param_groups = [g for g in groups if not g.get("muon")]
        try:
            yield
        finally:
            self.param_groups = groups

    def _muon_step(self, group: dict) -> None:
        """Momentum, decay and the orthogonalised update, as torch.optim.Muon's, over all the group's matrices
        at once: foreach kernels for the element-wise parts and, per shape of matrix, one stacked Newton-Schulz
        (resolver/memory.py's muon_step_bytes: what it holds while it runs)."""
        lr, momentum = group["lr"], group["momentum"]
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        grads, bufs = [p.grad for p in params], [self.state[p]["momentum_buffer"] for p in params]
        if any(hasattr(p, "full_tensor") for p in params):  # FSDP2 shards: each matrix whole, one at a time
            for p, grad, buf in zip(params, grads, bufs):
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(_orthogonalised(update, group), alpha=-lr * muon_lr_factor(p.shape))
            return
        if not params:
            return
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        by_shape: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            by_shape.setdefault(tuple(p.shape), []).append(i)
        for shape, index in by_shape.items():
            stack = torch.stack([bufs[i] for i in index])
            if group["nesterov"]:  # the gradient moved towards the momentum: grad.lerp(buf, momentum), stacked
                stack = torch.stack([grads[i] for i in index]).lerp_(stack, momentum)
            ortho = newton_schulz(stack, group["ns_coefficients"], group["ns_steps"], group["eps"])
            del stack  # the update in the weights' dtype (6 bytes a parameter, under the iteration's 8 and more):
            # one foreach kernel, where a bf16 update added to fp32 weights falls back to one add a matrix
            update = ortho.to(params[index[0]].dtype).unbind(0)
            torch._foreach_add_([params[i] for i in index], list(update), alpha=-lr * muon_lr_factor(shape))
            del ortho, update  # before the next shape's stack: held, they would add 6 bytes a parameter to its peak


def build_muon(model, settings, lr: float, fused: bool) -> MuonWithAdamW:
    """Muon for the hidden matrices at `settings["muon_lr"]` (MUON_LR when unset), AdamW at `lr` for the rest."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if is_hidden_matrix(n, p)]
    rest = [p for n, p in named if not is_hidden_matrix(n, p)]
    muon_lr = settings.get("muon_lr") or MUON_LR
    return MuonWithAdamW(decay_groups(rest, settings["weight_decay"]), hidden, lr, muon_lr, settings)


OPTIMIZERS = {"adamw": build_adamw, "muon": build_muon}


def build_optimizer(model, settings, lr: float, fused: bool) -> torch.optim.Optimizer:
    """`settings`: name, weight_decay, beta1, beta2 and muon_lr (the plan's `optimizer`, or the optim config
    group); a plan written before `name` was kept is AdamW."""
    name = settings.get("name") or "adamw"
    if name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={name!r} is not an optimizer; allowed: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](model, settings, lr, fused)
