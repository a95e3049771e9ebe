"""The gradient noise scale (pufferfish.lab.noise_scale): its estimators against gradients of known noise, and
the measurement on a real run's checkpoints."""

import json
import math

import numpy as np
import pytest

from pufferfish.errors import ConfigError
from pufferfish.lab.noise_scale import estimate, noise_scales
from pufferfish.train import train
from tests.conftest import compose, run_cli, tiny_overrides


def test_the_estimators_recover_a_known_gradient_and_noise():
    """Micro-batch gradients G_i = mu + noise of per-token covariance sigma^2 I over b tokens: the estimates give
    |mu|^2, tr(Sigma) = d sigma^2 and B_noise = tr(Sigma) / |mu|^2 within a few per cent over many groups."""
    rng = np.random.default_rng(0)
    d, sigma, b, k, groups = 500, 0.5, 16, 8, 400
    mu = rng.normal(size=d)
    mu *= 1.0 / np.linalg.norm(mu)  # |mu|^2 = 1, tr(Sigma) = 125: B_noise = 125 tokens
    small_sq, big_sq = [], []
    for _ in range(groups):
        g = mu + rng.normal(scale=sigma / math.sqrt(b), size=(k, d))  # each the mean of b tokens' gradients
        small_sq.append(float(np.mean(np.sum(g**2, axis=1))))
        big_sq.append(float(np.sum(g.mean(axis=0) ** 2)))
    grad_sq, trace, tokens = estimate(small_sq, big_sq, b, k * b)
    assert grad_sq == pytest.approx(1.0, rel=0.05)
    assert trace == pytest.approx(d * sigma**2, rel=0.05)
    assert tokens == pytest.approx(d * sigma**2, rel=0.08)
    # the naive reading, |G_i|^2 of one micro-batch as the gradient, is off by tr(Sigma)/b: the estimator is not it
    assert np.mean(small_sq) == pytest.approx(1.0 + d * sigma**2 / b, rel=0.05)


def test_the_estimators_refuse_what_they_cannot_compare():
    with pytest.raises(ValueError, match="b_big > b_small"):
        estimate([1.0], [1.0], 16, 16)
    with pytest.raises(ValueError, match="one small and one big norm per group"):
        estimate([1.0, 2.0], [1.0], 16, 64)


def test_the_noise_scale_of_a_real_run_at_each_checkpoint(tmp_path, cache_dir):
    """A short CPU run on English text: every checkpoint gets a finite, positive noise scale, the same when
    measured again (fixed micro-batches), and the command line prints it beside the plan's batch."""
    run = tmp_path / "run"
    assert train(compose(*tiny_overrides(run, cache_dir, "train.max_steps=12")))["finished"]
    steps = sorted(int(p.stem.split("_")[1]) for p in (run / "checkpoints").glob("step_*.pt"))
    assert len(steps) >= 2
    rows, plan = noise_scales(run, sequences=2, micro_batches=4, groups=2, device="cpu")
    assert [r.step for r in rows] == steps
    for r in rows:
        assert math.isfinite(r.loss) and r.grad_sq > 0 and r.trace > 0 and 0 < r.tokens < math.inf
    # training lowered the loss the measurement sees
    assert rows[-1].loss < rows[0].loss
    again, _ = noise_scales(run, steps=str(steps[-1]), sequences=2, micro_batches=4, groups=2, device="cpu")
    assert again[0].tokens == pytest.approx(rows[-1].tokens, rel=1e-4)
    assert plan["batch_tokens"] > 0
    with pytest.raises(ConfigError, match=r"--steps has \[99999\]"):
        noise_scales(run, steps="99999")
    with pytest.raises(ConfigError, match="--steps='ten'; allowed: all, last"):
        noise_scales(run, steps="ten")

    out = tmp_path / "noise.json"
    done = run_cli("pufferfish.lab.noise_scale", str(run), "--steps", "last", "--sequences", "2", "--micro-batches",
                   "4", "--groups", "2", "--device", "cpu", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"the plan's batch {plan['batch_tokens']:,} tokens a step" in done.stdout
    saved = json.loads(out.read_text())
    assert [r["step"] for r in saved["rows"]] == [steps[-1]]
    assert saved["rows"][0]["tokens"] == pytest.approx(rows[-1].tokens, rel=1e-4)


def test_bad_input_names_the_value(tmp_path):
    with pytest.raises(ConfigError, match="has no config.yaml"):
        noise_scales(tmp_path)
    with pytest.raises(ConfigError, match="--micro-batches=1"):
        noise_scales(tmp_path, micro_batches=1)
    done = run_cli("pufferfish.lab.noise_scale", str(tmp_path))
    assert done.returncode == 2 and "has no config.yaml" in done.stderr and "Traceback" not in done.stderr
    for needed in ("config.yaml", "plan.json", "tokenizer.model"):
        (tmp_path / needed).write_text("{}")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match="holds no step_"):
        noise_scales(tmp_path)
