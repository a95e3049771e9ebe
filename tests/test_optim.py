"""optim.name=muon: Muon's update is torch.optim.Muon's, one optimizer carries both parts through the step,
checkpoints and resume, and the memory model counts its one buffer per matrix parameter."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pufferfish import optim
from pufferfish.model import ModelConfig, build_model
from pufferfish.optim import MUON_LR, MuonWithAdamW, build_optimizer, is_hidden_matrix, newton_schulz
from pufferfish.reliability import skip_on_device
from pufferfish.resolver import detect_hardware, make_plan
from pufferfish.resolver.memory import count_params, optimizer_bytes
from pufferfish.resolver.shapes import memory_shape
from pufferfish.runlog import read_metrics
from pufferfish.step import StepSpec, TrainStep
from pufferfish.train import train
from tests.conftest import ROOT, compose, tiny_overrides

SETTINGS = {"name": "muon", "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "muon_lr": 0.02}
LR = 1e-3
MC = ModelConfig(num_layers=2, num_dims=64, num_heads=4, num_kv_heads=2, vocab_size=100, seq_len=16)


def backward(model, seed: int) -> None:
    x = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(seed))
    model.zero_grad(set_to_none=True)
    model(x).logsumexp(-1).mean().backward()


@pytest.mark.parametrize("qk_norm", [False, True])
def test_muon_and_adamw_parts_step_as_torch_muon_and_adamw_do(qk_norm):
    """Five steps of the one optimizer against torch.optim.Muon on the hidden matrices and torch.optim.AdamW on
    the rest, from the same weights and the same batches: the weights agree to 1e-6. A torch without Muon
    (before 2.9) checks the AdamW part, and that Muon's moved its matrices."""
    mc = ModelConfig(**{**MC.to_dict(), "qk_norm": qk_norm})
    torch.manual_seed(0)
    ours, ref = build_model(mc), build_model(mc)
    ref.load_state_dict(ours.state_dict())
    optimizer = build_optimizer(ours, SETTINGS, LR, fused=False)
    hidden = [p for n, p in ref.named_parameters() if n.startswith("layers.") and p.dim() == 2]
    rest = [p for n, p in ref.named_parameters() if not (n.startswith("layers.") and p.dim() == 2)]
    # Muon's decay is scaled so that a step shrinks the matrices by LR x weight_decay, as AdamW's does
    muon = torch.optim.Muon(hidden, lr=0.02, weight_decay=SETTINGS["weight_decay"] * LR / 0.02, momentum=0.95,
                            nesterov=True) if hasattr(torch.optim, "Muon") else None  # fmt: skip
    adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": 0.1},
                               {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
                              lr=LR, betas=(0.9, 0.95), eps=1e-8)  # fmt: skip
    for step in range(5):
        for model in (ours, ref):
            backward(model, step)
        optimizer.step()
        adamw.step()
        if muon is not None:
            muon.step()
    torch.manual_seed(0)
    start = dict(build_model(mc).named_parameters())
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert (p - start[name]).abs().max() > 1e-4, name  # every weight moved
        if muon is not None or not is_hidden_matrix(name, p):
            assert torch.allclose(p, q, rtol=0, atol=1e-6), name


def test_newton_schulz_orthogonalises():
    """The quintic iteration's singular values land in about (0.5, 1.5) (Keller Jordan's note), tall or wide."""
    g = torch.randn(96, 32, generator=torch.Generator().manual_seed(1))
    for m in (g, g.T):
        s = torch.linalg.svdvals(newton_schulz(m).float())
        assert newton_schulz(m).shape == m.shape
        assert 0.5 < s.min() and s.max() < 1.5, s


def test_newton_schulz_runs_in_fp32_on_a_card_without_bf16_and_orthogonalises_the_same(monkeypatch):
    """A GTX 1060 (compute capability 6.1) has no bf16 matmuls: the iteration runs in fp32 there, bf16 from 8.0
    and on the CPU; in fp32 it lands where bf16 does, within bf16's rounding."""
    for capability, dtype in (((6, 1), torch.float32), ((7, 5), torch.float32), ((8, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert optim.ns_dtype(torch.device("cuda", 0)) == dtype
    assert optim.ns_dtype(torch.device("cpu")) == torch.bfloat16
    g = torch.randn(3, 96, 32, generator=torch.Generator().manual_seed(3))
    bf16 = newton_schulz(g)
    monkeypatch.setattr(optim, "ns_dtype", lambda device: torch.float32)
    fp32 = newton_schulz(g)
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    s = torch.linalg.svdvals(fp32)
    assert 0.5 < s.min() and s.max() < 1.5, s
    torch.testing.assert_close(fp32, bf16.float(), rtol=0, atol=2**-5)


def test_newton_schulz_of_a_stack_is_each_matrix_on_its_own():
    """One batched iteration for matrices of one shape gives what each would alone (to a bf16 step)."""
    g = torch.randn(5, 96, 32, generator=torch.Generator().manual_seed(2))
    for stack in (g, g.mT):  # tall and wide
        alone = torch.stack([newton_schulz(m) for m in stack])
        together = newton_schulz(stack)
        assert together.shape == stack.shape and together.dtype == torch.bfloat16
        torch.testing.assert_close(together.float(), alone.float(), rtol=0, atol=2**-7)


def test_the_muon_step_dispatches_a_few_operators_per_matrix_not_an_iteration_each():
    """Muon's step runs one stacked Newton-Schulz per shape of matrix: doubling the layers adds the
    element-wise work of the new matrices (foreach kernels; on a CPU a loop of a few operators a matrix), not
    their own 5-step iterations (16 operators a matrix and more). The operators counted are those
    torch.profiler sees at the top level of one step (pufferfish.lab.bench_optimizer's count)."""
    from pufferfish.lab.bench_optimizer import model_for, operators

    count = {}
    for shape in ("2x64", "4x64"):
        model = model_for(shape, "cpu")
        optimizer = build_optimizer(model, SETTINGS, LR, fused=False)
        optimizer.step()  # the momentum buffers exist from here on
        count[shape] = operators(optimizer, "cpu"), sum(len(g["params"]) for g in optimizer.param_groups if g["muon"])
    added_ops, added_matrices = count["4x64"][0] - count["2x64"][0], count["4x64"][1] - count["2x64"][1]
    assert added_matrices == 14  # 7 matrices a layer: q, k, v, o and the MLP's three
    assert added_ops / added_matrices < 10, count


def test_the_optimizer_benchmark_times_and_counts_both_optimizers(tmp_path):
    out = tmp_path / "optimizer.json"
    done = subprocess.run([sys.executable, "-m", "pufferfish.lab.bench_optimizer", "--shapes", "2x64,3x128", "--steps",
                           "2", "--device", "cpu", "--out", str(out)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["optimizer"], r["muon_matrices"]) for r in rows] == [
        ("2x64", "adamw", 0), ("2x64", "muon", 14), ("3x128", "adamw", 0), ("3x128", "muon", 21)]
    assert all(r["ms"] > 0 and r["operators"] > 0 for r in rows)
    assert "| 3x128 | " in done.stdout and "operators a step" in done.stdout


MEASURE_STEP = """
import json, sys, torch
from pufferfish.lab.bench_optimizer import model_for
from pufferfish.optim import build_optimizer

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

model = model_for(sys.argv[1], "cpu")
optimizer = build_optimizer(model, {**json.loads(sys.argv[2])}, 1e-3, fused=False)
optimizer.step()  # the momentum buffers exist from here on
peaks = []
for _ in range(2):
    open("/proc/self/clear_refs", "w").write("5")  # the high-water mark starts again from the resident memory now
    before = status("VmRSS")
    optimizer.step()
    peaks.append(status("VmHWM") - before)
print(min(peaks))
"""


def test_the_memory_model_counts_what_muons_stacked_step_holds_on_top_of_the_state():
    """The bytes one Muon step holds beyond the weights, gradients and momentum, measured as the process's
    resident high-water mark over one step (glibc made to map every large block afresh and give it back, so
    the mark is the step's own), against resolver.memory.muon_step_bytes: the stack of the largest shape's
    matrices (the MLP's up and gate projections) in fp32, its bf16 iterates and their Gram matrices."""
    from pufferfish.lab.bench_optimizer import model_for
    from pufferfish.resolver.memory import Shape, muon_step_bytes

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    for shape in ("6x384", "8x512"):
        c = model_for(shape, "cpu").config
        done = subprocess.run([sys.executable, "-c", MEASURE_STEP, shape, json.dumps(SETTINGS)], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        measured = int(done.stdout.split()[-1])
        predicted = muon_step_bytes(Shape(c.num_layers, c.num_dims, c.num_heads, c.num_kv_heads, c.ffn_dims,
                                          c.vocab_size, c.seq_len, optimizer="muon"))  # fmt: skip
        assert 0.95 < measured / predicted < 1.15, (shape, measured, predicted)


def test_the_memory_model_counts_fp32_iterates_on_a_card_without_bf16():
    """Where Newton-Schulz runs in fp32 (a card before compute capability 8.0), its two iterates and Gram
    matrices take 4 bytes an element instead of 2; the stack of updates is fp32 either way. The plan for such a
    card counts it, the CPU's and an H100's do not."""
    from dataclasses import replace

    from pufferfish.resolver.hardware import own_card
    from pufferfish.resolver.memory import Shape, muon_matrices, muon_step_bytes

    s = Shape(2, 64, 4, 2, 192, 100, 16, optimizer="muon")
    for ns_fp32, element in ((False, 2), (True, 4)):
        expected = max(rows * cols * count * (4 + 2 * element * (1 + min(rows, cols) / max(rows, cols)))
                       for (rows, cols), count in muon_matrices(s).items())  # fmt: skip
        assert muon_step_bytes(replace(s, ns_fp32=ns_fp32)) == int(expected)
    mc = MC.to_dict()
    for profile, ns_fp32 in (("gtx1060", True), ("rtx2060", True), ("rtx3060", False), ("h100", False), ("cpu", False)):
        cfg = compose(f"gpu={profile}", "optim.name=muon")
        hw = own_card(cfg) if profile != "cpu" else detect_hardware(cfg.gpu, cfg.optimizations, "cpu")
        assert memory_shape(mc, cfg, hw, 2, False).ns_fp32 is ns_fp32, profile


def test_the_peak_is_muons_step_where_the_activations_are_smaller_than_its_stack():
    from pufferfish.resolver.memory import Shape, muon_step_bytes, predict_peak_bytes

    small = Shape(4, 512, 8, 2, 1408, 256, 16, micro_batch=1, optimizer="muon", grads_in_forward=False)
    b = predict_peak_bytes(small)
    core = b.total - b.overhead
    params = count_params(small)
    assert core == b.weights + 4 * params + optimizer_bytes(small) + muon_step_bytes(small)
    assert b.optimizer == optimizer_bytes(small) + core - (b.weights + b.gradients + optimizer_bytes(small)
                                                          + b.autocast_copies + b.activations + b.logits)  # fmt: skip
    large = Shape(4, 512, 8, 2, 1408, 256, 512, micro_batch=32, optimizer="muon", grads_in_forward=False)
    assert predict_peak_bytes(large).optimizer == optimizer_bytes(large)  # the backward's peak is the higher
    assert muon_step_bytes(Shape(4, 512, 8, 2, 1408, 256, 16)) == 0  # AdamW


def test_the_hidden_matrices_go_to_muon_and_the_rest_to_adamw():
    moe = ModelConfig(num_layers=2, num_dims=64, num_heads=4, vocab_size=100, seq_len=16, use_moe=True,
                      moe_num_experts=4, moe_shared_expert=True, qk_norm=True)  # fmt: skip
    for mc in (MC, moe):
        model = build_model(mc)
        optimizer = build_optimizer(model, SETTINGS, LR, fused=True)  # fused asked for: the host decides anyway
        names = {id(p): n for n, p in model.named_parameters()}
        muon = [names[id(p)] for g in optimizer.param_groups if g["muon"] for p in g["params"]]
        adamw = [names[id(p)] for g in optimizer.param_groups if not g["muon"] for p in g["params"]]
        assert sorted(muon + adamw) == sorted(names.values())  # every parameter once
        assert all(n.split(".")[-2] in ("wq", "wk", "wv", "wo", "w1", "w2", "w3") for n in muon), muon
        assert "tok_embeddings.weight" in adamw and "norm.weight" in adamw
        assert not any(n.endswith(("gate.weight", "norm.weight")) for n in muon)
        assert isinstance(optimizer, MuonWithAdamW) and not skip_on_device(optimizer)
    assert any(n.endswith("feed_forward.w1") for n in adamw)  # the experts' 3-D stacks stay with AdamW
    assert any("shared_expert" in n for n in muon)


def test_the_schedule_keeps_muons_ratio_to_adamws_learning_rate():
    model = build_model(MC)
    step = TrainStep(model, build_optimizer(model, SETTINGS, LR, False), StepSpec(), "cpu")
    step.set_lr(LR / 4)  # a point of the schedule a quarter of the way down
    lrs = {g["muon"]: g["lr"] for g in step.optimizer.param_groups}
    assert lrs == {False: LR / 4, True: pytest.approx(0.02 / 4)}


def test_memory_model_counts_one_buffer_per_muon_parameter():
    """The predicted optimizer state drops by 4 bytes for each parameter Muon updates, and those are exactly the
    parameters the optimizer puts in its Muon group; the real state after a step agrees."""
    hw = detect_hardware(compose("gpu=cpu").gpu, compose("gpu=cpu").optimizations, "cpu")
    adamw_cfg, muon_cfg = compose("gpu=cpu", "optim.name=adamw"), compose("gpu=cpu", "optim.name=muon")
    mc = MC.to_dict()
    adamw, muon = memory_shape(mc, adamw_cfg, hw, 2, False), memory_shape(mc, muon_cfg, hw, 2, False)
    model = build_model(MC)
    optimizer = build_optimizer(model, SETTINGS, LR, False)
    in_muon = sum(p.numel() for g in optimizer.param_groups if g["muon"] for p in g["params"])
    assert in_muon == sum(p.numel() for n, p in model.named_parameters() if is_hidden_matrix(n, p)) > 0
    assert optimizer_bytes(adamw) == 8 * count_params(adamw) == 8 * sum(p.numel() for p in model.parameters())
    assert optimizer_bytes(adamw) - optimizer_bytes(muon) == 4 * in_muon
    backward(model, 0)
    optimizer.step()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    assert state == optimizer_bytes(muon)  # AdamW's scalar step counters aside
    plans = [make_plan(cfg, hw, 512, 10**6) for cfg in (compose("gpu=cpu", "model.num_layers=2", "model.num_dims=128",
                                                                "train.batch_tokens=1024", f"optim.name={name}")
                                                        for name in ("adamw", "muon"))]  # fmt: skip
    assert plans[0].model == plans[1].model and plans[0].micro_batch == plans[1].micro_batch
    drop = plans[0].memory_breakdown["optimizer"] - plans[1].memory_breakdown["optimizer"]
    m = plans[1].model
    kv_dims = m["num_kv_heads"] * 128 // m["num_heads"]
    assert drop == 4 * 2 * (2 * 128 * 128 + 2 * 128 * kv_dims + 3 * 128 * m["ffn_dims"])  # 2 layers' matrices
    assert plans[0].predicted_peak_bytes > plans[1].predicted_peak_bytes
    assert plans[1].optimizer["muon_lr"] == MUON_LR and plans[1].reasons["optimizer"].startswith("Muon for ")


def test_a_muon_run_learns_english(tmp_path, cache_dir):
    run = tmp_path / "run"
    train(compose(*tiny_overrides(run, cache_dir, "train.max_steps=40", "model.num_layers=2", "model.num_dims=64",
                                  "train.batch_tokens=2048", "train.eval_interval=2", "optim.name=muon",
                                  "train.sample_tokens=0")))  # fmt: skip
    evals = [r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[0] > 5.5 and evals[-1] < evals[0] - 1.0, evals  # 512 pieces: ln(512) = 6.24 untrained
    assert all(b < a for a, b in zip(evals[:-2], evals[1:-1])), evals  # falling at every evaluation
    plan = json.loads((run / "plan.json").read_text())
    assert plan["optimizer"]["name"] == "muon" and plan["optimizer"]["muon_lr"] == MUON_LR
    assert not plan["fused_adamw"] and "optim.name=muon" in plan["reasons"]["fused_adamw"]


def test_an_interrupted_muon_run_resumes_with_the_same_losses(tmp_path, cache_dir):
    common = ("train.max_steps=12", "train.log_interval=1", "train.eval_interval=4", "train.batch_tokens=512",
              "train.micro_batch=2", "train.sample_tokens=0", "optim.name=muon")  # two micro-steps a step  # fmt: skip

    def losses(run):
        return [(r["kind"], r["step"], r.get("train_loss"), r.get("val_loss"))
                for r in read_metrics(run / "metrics.jsonl") if r["kind"] in ("train", "eval")]  # fmt: skip

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train(compose(*tiny_overrides(straight, cache_dir, *common)))
    assert not train(compose(*tiny_overrides(broken, cache_dir, *common, "train.stop_at_step=5")))["finished"]
    assert train(compose(*tiny_overrides(broken, cache_dir, *common)))["finished"]
    assert losses(straight) == losses(broken)  # Muon's momentum and the groups' learning rates came back


def test_an_unknown_optimizer_names_the_allowed_ones():
    from pufferfish.errors import ConfigError
    from pufferfish.validate import validate

    with pytest.raises(ConfigError, match="optim.name='sgd' is out of range; allowed: one of auto, adamw, muon"):
        validate(compose("optim.name=sgd"))
