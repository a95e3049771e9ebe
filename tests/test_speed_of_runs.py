"""The speed model against the committed GPU runs' steady speed (pufferfish.lab.speed_of_runs)."""

import pytest

from pufferfish.lab import speed_of_runs as sor
from pufferfish.lab.time_to_loss import ROOT

DEFAULT_CORPUS_RUNS = [ROOT / "docs" / "measurements" / "2026-12-06" / f"time_to_loss_h100_default_{name}.jsonl"
                       for name in ("nanogpt", "12x768", "candidates")]  # fmt: skip


def test_the_steady_speed_is_the_tokens_between_the_first_and_last_evaluations():
    # 100 steps of 1,000 tokens between 10 s and 30 s: 5,000 tokens a second, whatever came before the first
    assert sor.steady_tokens_per_s([[10.0, 5.0, 20], [20.0, 4.0, 70], [30.0, 3.5, 120]], 1000) == 5000
    with pytest.raises(ValueError, match="no steady stretch"):
        sor.steady_tokens_per_s([[10.0, 5.0, 20], [10.0, 4.0, 20]], 1000)


def test_the_h100_runs_outrun_the_assumed_share_by_the_documented_factor(capsys, monkeypatch):
    """The default-corpus runs (the current step: Muon stacked, compile weighed) against today's plans for them:
    each a compiled plan, Muon's steady speed within 5 % of AdamW's at the same shape (its step costs 1-3 %), and
    every run 1.15-1.30x the prediction at the profile's assumed 0.55, median 1.20 (docs/benchmarks.md)."""
    rows = [r for f in DEFAULT_CORPUS_RUNS for r in sor.rows_of(f, "h100")]
    assert len(rows) == 7 and all(r["compiled"] for r in rows)
    by = {(r["system"], r["shape"]): r for r in rows}
    for shape in ("6 x 384", "8 x 512"):
        assert by["muon", shape]["measured"] == pytest.approx(by["default", shape]["measured"], rel=0.05)
    assert all(1.15 < r["ratio"] < 1.30 for r in rows)
    monkeypatch.setattr("sys.argv", ["speed_of_runs", *map(str, DEFAULT_CORPUS_RUNS)])
    sor.main()
    out = capsys.readouterr().out
    assert "| time_to_loss_h100_default_12x768.jsonl | default | 12 x 768 | 229,376 | yes |" in out
    assert "median measured / predicted 1.20 over 7 runs: the profile's share 0.55 would be 0.66" in out
