"""python -m pufferfish.lab.isoflop: every width spends the same training compute, and the fit places the
compute-optimal size where a parabola through the losses has its minimum; the planner's law's optimum agrees
with Chinchilla's closed form."""

import json
import math
import subprocess
import sys

import pytest

from pufferfish.lab.isoflop import law_optimum, optimum
from pufferfish.resolver import plan_flops_per_token
from pufferfish.resolver.scaling import ALPHA, BETA, A, B
from tests.conftest import ROOT, english_file


def test_the_fit_finds_the_minimum_of_a_parabola_in_log_params():
    n_star, flops = 2.0e5, 1e12  # loss = 3 + 0.5 (ln N - ln N*)^2
    rows = [{"params": n, "val_loss": 3 + 0.5 * math.log(n / n_star) ** 2, "flops": flops}
            for n in (5e4, 1e5, 4e5, 8e5)]  # fmt: skip
    best = optimum(rows)
    assert best["params"] == pytest.approx(n_star, rel=1e-6) and best["loss"] == pytest.approx(3.0)
    assert best["tokens_per_param"] == pytest.approx(flops / 6 / n_star**2)
    assert optimum(rows[:2]) is None  # two points fit no parabola
    assert optimum([{**r, "val_loss": -r["val_loss"]} for r in rows]) is None  # a maximum is no optimum
    falling = [{**r, "val_loss": 5 - 0.1 * math.log(r["params"]) + 1e-3 * math.log(r["params"]) ** 2} for r in rows]
    assert optimum(falling) is None  # its minimum lies beyond the widest model: not bracketed


def test_the_laws_optimum_is_chinchillas_closed_form():
    # L = E + A / N^a + B / D^b with D = C / 6N is least at N = G (C/6)^(b/(a+b)), G = (a A / (b B))^(1/(a+b))
    for flops in (1e15, 1e19):
        g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
        closed = g * (flops / 6) ** (BETA / (ALPHA + BETA))
        assert law_optimum(flops)["params"] == pytest.approx(closed, rel=0.01)


def test_every_width_spends_the_same_compute(tmp_path, cache_dir):
    flops = 3e10
    proc = subprocess.run([sys.executable, "-m", "pufferfish.lab.isoflop", "--out", str(tmp_path), "--flops", str(flops),
                           "--dims", "32,48,64", "--layers", "1", "--seq-len", "64", "--batch-tokens", "512",
                           "--optimizers", "adamw", "--corpus", str(english_file()), "--set", "data.vocab_size=512",
                           "data.tokenizer_train_mb=1", f"data.cache_dir='{cache_dir}'"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["dims"] for r in rows] == [32, 48, 64]
    for r in rows:
        plan = json.loads((tmp_path / "runs" / f"adamw_d{r['dims']}" / "plan.json").read_text())
        spent = r["tokens"] * plan_flops_per_token(plan)
        assert abs(spent - flops) <= 0.5 * plan_flops_per_token(plan) * plan["batch_tokens"], (r, spent)  # to a step
        assert math.isfinite(r["val_loss"]) and r["steps"] * 512 == r["tokens"]
    assert rows[0]["tokens"] > rows[1]["tokens"] > rows[2]["tokens"]  # the narrower, the more tokens
    assert "| adamw | 32 |" in proc.stdout and "Chinchilla's fit" in (tmp_path / "isoflop.md").read_text()
