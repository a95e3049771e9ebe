"""What a budget buys: the scaling law that ranks shapes, plans that grow with the hours, the best weights
handed over, and the early stop that fires on a run that overfits and not on one that keeps improving."""

from __future__ import annotations

import json
import math

import pytest
from conftest import compose, english_text
from test_resolver import fake_gpu

from pufferfish.api import mode_for_hours
from pufferfish.best import BestModel
from pufferfish.data.tokenizer import auto_vocab_size
from pufferfish.resolver import make_plan
from pufferfish.resolver.plan import MAX_EPOCHS
from pufferfish.resolver.scaling import R_D, effective_tokens, predicted_loss
from pufferfish.train import train


def test_repeated_tokens_are_worth_less_each_epoch_and_saturate():
    unique = 1e6
    assert effective_tokens(0.5e6, unique) == 0.5e6  # under one epoch: every token is fresh
    four, sixty = effective_tokens(4e6, unique), effective_tokens(60e6, unique)
    assert 3.5e6 < four < 4e6  # a few epochs are almost as good as fresh data (Muennighoff et al.)
    assert sixty < 0.3 * 60e6 and sixty < unique * (1 + R_D)  # many are not, and never past U (1 + R_D)
    # at a fixed compute (6 N D), little data makes the best model smaller and the epochs more
    sizes = [10 ** (4 + i / 20) for i in range(81)]
    best_unlimited = min(sizes, key=lambda n: predicted_loss(n, 2e14 / n))
    best_small_data = min(sizes, key=lambda n: predicted_loss(n, 2e14 / n, unique=2e6))
    assert best_small_data < 0.6 * best_unlimited


def test_vocabulary_is_sized_to_the_corpus():
    assert auto_vocab_size(60 * 1024) == 1024
    assert auto_vocab_size(1_115_394) == 4096  # tinyshakespeare
    assert auto_vocab_size(5_000_000) == auto_vocab_size(400_000_000) == 8192
    assert auto_vocab_size(1000) == 512


@pytest.mark.parametrize("corpus_tokens", [10**9, 10_000_000])
def test_gtx1060_plans_grow_with_the_hours(corpus_tokens):
    """Longer budgets never plan fewer tokens, and never a model trained on under a token per parameter."""
    hw, last = fake_gpu("gtx1060", "fp32"), None
    for hours in (0.005, 0.02, 0.1, 0.25, 0.5, 1.0, 1.5, 3.0, 6.0, 12.0):
        cfg = compose("gpu=gtx1060", f"mode={mode_for_hours(hours)}", f"mode.target_hours={hours}")
        plan = make_plan(cfg, hw, 8192, corpus_tokens)
        assert plan.train_tokens >= plan.params, (hours, plan.reasons["shape"])
        if last is not None:
            # at the data's useful epochs both plans stop there; they may differ by the rounding to whole steps
            slack = max(plan.batch_tokens, last.batch_tokens) if plan.limits["max_tokens"] <= plan.train_tokens * 1.01 else 0
            assert plan.train_tokens >= last.train_tokens - slack, (hours, plan.reasons["shape"], last.reasons["shape"])
        last = plan


@pytest.mark.parametrize("mode", ["quick_dev", "standard", "extended"])
def test_reasons_name_one_binding_limit(mode):
    for corpus_tokens in (10**9, 3_000_000):
        plan = make_plan(compose("gpu=gtx1060", f"mode={mode}"), fake_gpu("gtx1060", "fp32"), 8192, corpus_tokens)
        said = plan.reasons["hours_vs_data"]
        assert ("the data binds" in said) == (plan.binding_constraint == "data"), (plan.binding_constraint, said)
        assert ("the hours bind" in said) == (plan.binding_constraint != "data")
        assert plan.limits["unique_tokens"] == corpus_tokens
        if "outside_mode" in plan.reasons:  # outside the bounds only with a reason that says why
            assert "below them" in plan.reasons["outside_mode"] or "GiB" in plan.reasons["outside_mode"]


def test_small_corpus_plans_more_epochs_smaller_batches_and_ends_when_repeating_stops_paying():
    cfg, hw = compose("gpu=h200", "mode=quick_dev", "mode.target_hours=0.05"), fake_gpu("h200")
    big, small = make_plan(cfg, hw, 8192, 10**10), make_plan(cfg, hw, 8192, 1_500_000)
    assert small.epochs > 1 >= big.epochs and small.binding_constraint == "data"
    assert small.batch_tokens * 32 <= 1_500_000 < big.batch_tokens * 32  # >= 32 steps per epoch
    # planning 61 or 148 epochs overfits (best at a third of the run, last 55-78 % worse); past ~22 another epoch is worth under a quarter of fresh text
    assert small.epochs == pytest.approx(MAX_EPOCHS, rel=0.05) and "schedule complete" in small.reasons["steps"]


def _series(best: BestModel, losses, total_steps: int = 0, epochs: float = 10.0):
    """Feed evaluations every 10 steps of a run of `total_steps` (default: as many as the losses cover) over
    `epochs` passes of its data; the evaluation at which the run would stop, or None."""
    total_steps = total_steps or 10 * len(losses)
    for i, loss in enumerate(losses):
        best.update((i + 1) * 10, {"val_loss": loss}, snapshot=lambda: {})
        if best.stop((i + 1) * 10, total_steps, epoch=epochs * (i + 1) / len(losses)):
            return i + 1
    return None


def test_early_stop_fires_on_a_rising_loss_and_not_on_noise(tmp_path):
    healthy = [5.0 * math.exp(-0.1 * i) + 2.0 + 0.02 * (-1) ** i for i in range(20)]  # falling, with noise
    plateau = [3.0, 2.8, 2.7, 2.69, 2.70, 2.695, 2.70, 2.698, 2.701, 2.699, 2.70]  # flat within 1 %
    overfit = [5.0, 4.0, 3.5, 3.4, 3.5, 3.6, 3.8, 4.0, 4.3]
    assert _series(BestModel(tmp_path, {}, stop_after=3), healthy) is None
    assert _series(BestModel(tmp_path, {}, stop_after=3), plateau) is None
    b = BestModel(tmp_path, {}, stop_after=3)
    assert _series(b, overfit) == 7 and b.step == 40 and b.loss == 3.4  # three evaluations above 3.4 x 1.01
    assert _series(BestModel(tmp_path, {}, stop_after=0), overfit) is None  # off with train.max_steps
    # a noisy start (warm-up, the first epochs) sits above an early best for a few evaluations: not a stop
    noisy_start = [6.0, 6.3, 6.4, 6.5, 6.2, 5.9, 5.5] + [5.4 - 0.05 * i for i in range(40)]
    assert _series(BestModel(tmp_path, {}, stop_after=3), noisy_start) is None
    # the same rise in the first fifth of a longer run (and spanning under a tenth of it): not yet
    assert _series(BestModel(tmp_path, {}, stop_after=3), overfit, total_steps=1000) is None
    # the same rise within the first pass over the data: instability, not overfitting
    assert _series(BestModel(tmp_path, {}, stop_after=3), overfit, epochs=0.9) is None


def overfit_overrides(tmp_path, cache, *extra):
    """2 layers x 128 dims on 60 KB of English: it overfits within a minute on two CPU cores."""
    train_file = english_text(tmp_path / "train.txt", 60)
    val_file = english_text(tmp_path / "val.txt", 12, skip_kb=200)
    return ["gpu=cpu", "mode=ultra_fast", "data=text_files", f"data.paths=['{train_file}']",
            f"data.val_paths=['{val_file}']", "data.vocab_size=1024", "data.tokenizer_train_mb=1",
            f"data.cache_dir='{cache}'", "model.num_layers=2", "model.num_dims=128", "model.seq_len=128",
            "train.micro_batch=16", "train.batch_tokens=2048", "train.eval_interval=20", "train.eval_tokens=4096",
            "train.progress=false", "train.sample_tokens=8", "optim.lr=3e-3", f"run_dir='{tmp_path / 'run'}'",
            *extra]  # fmt: skip


def test_an_overfitting_run_hands_over_its_best_weights(tmp_path, cache_dir):
    result = train(compose(*overfit_overrides(tmp_path, cache_dir, "train.max_steps=300", "mode.target_hours=1")))
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line and '"final"' not in line]  # fmt: skip
    best = min(evals, key=lambda e: e["val_loss"])
    assert result["stopped_by"] == "schedule" and result["step"] == 300  # max_steps: no early stop
    assert evals[-1]["val_loss"] > 1.05 * best["val_loss"]  # it did overfit
    assert result["handed_over"] == "best" and result["handed_over_step"] == best["step"] < 300
    # the handed-over weights are the best ones (every evaluation reads the same 4,096 validation tokens)
    assert result["val_loss"] == pytest.approx(best["val_loss"], rel=0.01)
    assert result["last_val_loss"] == pytest.approx(evals[-1]["val_loss"])
    from pufferfish.checkpoint import resolve_checkpoint_path

    ckpts = tmp_path / "run" / "checkpoints"
    assert resolve_checkpoint_path(tmp_path / "run").name == "best.pt"  # generate, export and the API
    assert resolve_checkpoint_path(ckpts / "latest").name == "step_00000300.pt"  # the last stays reachable
    import torch

    assert torch.load(ckpts / "best.pt", weights_only=False)["step"] == best["step"]


@pytest.mark.slow  # minutes: a budgeted run must overfit on its own clock
def test_a_budgeted_run_that_overfits_stops_early_and_one_that_improves_does_not(tmp_path, cache_dir):
    # the plan itself stops at the data's useful epochs with its learning rate decayed, which keeps this corpus
    # from overfitting; a user's larger model at a constant learning rate does overfit, and must be stopped
    big = ("model.num_layers=4", "model.num_dims=256", "optim.schedule=constant", "train.eval_interval=10")
    over = train(compose(*overfit_overrides(tmp_path, cache_dir, "mode.target_hours=0.05", *big)))
    assert over["stopped_by"] == "early stop" and over["elapsed_s"] < 0.8 * 180
    assert over["handed_over"] == "best" and over["val_loss"] <= over["last_val_loss"]
    healthy = train(compose(*overfit_overrides(tmp_path, cache_dir, "mode.target_hours=0.004", "train.eval_interval=5",
                                               "model.num_layers=1", "model.num_dims=64", "optim.lr=1e-3",
                                               f"run_dir='{tmp_path / 'healthy'}'")))  # fmt: skip
    assert healthy["stopped_by"] != "early stop" and healthy["handed_over"] == "last"
