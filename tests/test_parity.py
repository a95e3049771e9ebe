"""The `optimizations` group changes speed and memory only: losses and gradients stay the same."""

import pytest
import torch

from pufferfish.loss import lm_loss
from pufferfish.model import ModelConfig, build_model
from pufferfish.runlog import read_metrics
from pufferfish.train import train
from pufferfish.transforms import apply_activation_checkpointing, compile_step
from tests.conftest import compose, tiny_overrides


def _loss_and_grads(checkpointing: bool, chunked: bool):
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_layers=3, num_dims=64, num_heads=4, num_kv_heads=2, vocab_size=211, seq_len=32))
    if checkpointing:
        apply_activation_checkpointing(model)
    x, y = torch.randint(0, 211, (3, 32)), torch.randint(0, 211, (3, 32))
    loss = lm_loss(model, x, y, chunked=chunked, chunk_tokens=17)  # chunks that do not divide the batch
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing, chunked", [(True, False), (False, True), (True, True)])
def test_checkpointing_and_chunked_loss_keep_loss_and_gradients(checkpointing, chunked):
    ref_loss, ref_grads = _loss_and_grads(False, False)
    loss, grads = _loss_and_grads(checkpointing, chunked)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-4, atol=1e-7), name


def test_loss_fn_on_cpu_is_the_plain_loss():
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_layers=1, num_dims=64, num_heads=2, vocab_size=97, seq_len=16))
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    fn = compile_step(lambda x, y: lm_loss(model, x, y), compile=True, device="cpu")  # compile is GPU-only
    assert fn(x, y).item() == lm_loss(model, x, y).item()


def test_training_losses_match_across_optimizations(tmp_path, cache_dir):
    """A short run under each option: on CPU they all run fp32, so the curves agree to rounding."""
    curves = {}
    for option in ["baseline", "grad_ckpt", "lean", "all"]:
        run = tmp_path / option
        train(compose(*tiny_overrides(run, cache_dir, f"optimizations={option}", "train.max_steps=8",
                                      "train.log_interval=1", "train.sample_tokens=0", "train.batch_tokens=1024",
                                      "train.micro_batch=4")))  # the same batches for every option
        curves[option] = [r["train_loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    for option, curve in curves.items():
        assert curve[0] == pytest.approx(curves["baseline"][0], rel=1e-6), option  # the same first step
        # later steps differ by rounding only, which Adam's normalisation amplifies a little step by step
        assert curve == pytest.approx(curves["baseline"], rel=2e-3), option


def test_evaluation_in_chunks_is_the_full_loss_without_the_full_logits():
    """evaluate() takes the loss chunk by chunk (no recomputation under no_grad): the same number as the
    full-batch loss, while the largest float tensor it makes is one chunk's logits, not the batch's."""
    import contextlib

    from torch.utils._python_dispatch import TorchDispatchMode

    from pufferfish.evaluation import evaluate

    torch.manual_seed(0)
    model = build_model(ModelConfig(num_layers=2, num_dims=64, num_heads=4, num_kv_heads=2, vocab_size=211, seq_len=32))
    batches = [(torch.randint(0, 211, (4, 32)), torch.randint(0, 211, (4, 32))) for _ in range(3)]
    with torch.no_grad():
        full = sum(lm_loss(model, x, y).item() * y.numel() for x, y in batches) / sum(y.numel() for _, y in batches)

    class Largest(TorchDispatchMode):  # the largest float tensor of logits' width any operator returns
        most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape[-1:] == (211,):
                    Largest.most = max(Largest.most, t.numel())
            return out

    with Largest():
        result = evaluate(model, iter(batches), contextlib.nullcontext(), bytes_per_token=4.0, chunk_tokens=100)
    assert result["val_loss"] == pytest.approx(full, rel=1e-6)
    assert Largest.most == 100 * 211  # one chunk's logits; the batch's would be 4 * 32 * 211
