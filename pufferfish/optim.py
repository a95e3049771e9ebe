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


def newton_schulz(g: torch.Tensor, coefficients=MUON_NS_COEFFICIENTS, steps: int = MUON_NS_STEPS,
                  eps: float = MUON_EPS) -> torch.Tensor:  # fmt: skip
    """About U V^T of g = U S V^T, in bf16, by the quintic iteration (torch.optim.Muon's, step for step)."""
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T  # (short, long): the Gram matrix is the smaller one
    x.div_(x.norm().clamp(min=eps))  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


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
        lr, momentum = group["lr"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(_orthogonalised(update, group), alpha=-lr * muon_lr_factor(p.shape))


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
