"""The one training step (pufferfish/step.py): its update against a hand-written reference, its skipping of
non-finite steps, and that training, the measuring job and the benchmark all run it."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch

from pufferfish.lab.bench import Technique, make_train_step
from pufferfish.loss import lm_loss
from pufferfish.model import ModelConfig, build_model
from pufferfish.optim import build_optimizer
from pufferfish.resolver.plan import OPTIMIZER_DEFAULTS
from pufferfish.step import StepSpec, TrainStep

ROOT = Path(__file__).resolve().parents[1]
MC = ModelConfig(vocab_size=97, num_layers=2, num_dims=32, num_heads=4, num_kv_heads=2, seq_len=16)


def _batches(n: int, micro: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MC.vocab_size, (n * micro, MC.seq_len + 1), generator=g)
    return [(t[:, :-1], t[:, 1:]) for t in tokens.split(micro)]


def _model_and_optimizer(fused: bool = False):
    torch.manual_seed(0)
    model = build_model(MC, "cpu")
    return model, build_optimizer(model, OPTIMIZER_DEFAULTS, 1e-2, fused)


def test_two_accumulated_micro_batches_match_a_reference_step_on_the_whole_batch():
    """Forward, loss, backward, clipping and AdamW by hand on 4 sequences at once, against the step's
    2 micro-batches of 2: the same weights after two steps (only the summation order differs)."""
    model, optimizer = _model_and_optimizer()
    reference, ref_optimizer = copy.deepcopy(model), None
    ref_optimizer = build_optimizer(reference, OPTIMIZER_DEFAULTS, 1e-2, False)
    step = TrainStep(model, optimizer, StepSpec(grad_accum=2, grad_clip=0.5, chunked_loss=True, loss_chunk_tokens=8),
                     "cpu")  # fmt: skip
    for k in range(2):
        micro = _batches(2, 2, seed=k)
        batches = iter(micro)
        loss, grad_norm, ok = step(lambda: next(batches))  # noqa: B023  (consumed within the call)

        x, y = torch.cat([b[0] for b in micro]), torch.cat([b[1] for b in micro])
        ref_loss = lm_loss(reference, x, y)
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        ref_optimizer.step()
        ref_optimizer.zero_grad(set_to_none=True)
        assert bool(ok) and loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
        assert grad_norm.item() == pytest.approx(ref_norm.item(), rel=1e-4)
        assert ref_norm.item() > 0.5  # the clipping was exercised
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("fused", [False, True], ids=["host decides", "fused AdamW skips on the device"])
def test_a_non_finite_step_makes_no_update(fused):
    model, optimizer = _model_and_optimizer(fused)
    step = TrainStep(model, optimizer, StepSpec(), "cpu")
    assert step.on_device == fused
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batches(1, 2)[0]
    step.micro_loss = lambda x, y: step.eager_loss(x, y) * float("nan")
    loss, _, ok = step(lambda: (x, y))
    assert not bool(ok) and not torch.isfinite(loss)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())  # the next step starts clean
    step.to_eager()
    loss, _, ok = step(lambda: (x, y))
    assert bool(ok) and any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_benchmark_runs_the_training_step():
    """make_train_step (calibration, the throughput benchmark) builds a TrainStep: its update equals one
    built directly with the same settings."""
    bench_step, params = make_train_step(MC, 2, "cpu", Technique("fp32", chunked=True))
    assert params == sum(p.numel() for p in build_model(MC, "cpu").parameters())
    cell = bench_step.__closure__
    (train_step,) = [c.cell_contents for c in cell if isinstance(c.cell_contents, TrainStep)]
    assert train_step.spec == StepSpec(precision="fp32", chunked_loss=True)
    first = [p.detach().clone() for p in train_step.model.parameters()]
    bench_step()
    assert any(not torch.equal(a, b) for a, b in zip(first, train_step.model.parameters()))


def _calls(path: Path, names: set[str]) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.func.attr}(")
    return found


def test_only_the_step_module_runs_backward_and_clipping():
    """One step: no other module of the package (but the peer model's own step in the lab's throughput
    benchmark, and the noise-scale probe's gradients, which update nothing), nor a script, calls backward or
    clips gradients."""
    allowed = {ROOT / "pufferfish" / "step.py", ROOT / "pufferfish" / "lab" / "bench_throughput.py",
               ROOT / "pufferfish" / "lab" / "noise_scale.py"}  # fmt: skip
    files = [*ROOT.joinpath("pufferfish").rglob("*.py"), *ROOT.joinpath("scripts").rglob("*.py")]
    offenders = [c for f in files if f not in allowed for c in _calls(f, {"backward", "clip_grad_norm_"})]
    assert offenders == []
    assert _calls(ROOT / "pufferfish" / "step.py", {"backward", "clip_grad_norm_"})  # the test sees calls
    # the probe's backward only measures: it neither clips nor steps an optimizer
    assert not _calls(ROOT / "pufferfish" / "lab" / "noise_scale.py", {"clip_grad_norm_", "step"})
