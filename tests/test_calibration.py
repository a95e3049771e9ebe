"""The calibration scripts: the check2 grid is new and fits its memory; the refit script re-predicts rows."""

import json
from dataclasses import asdict

import pytest

from pufferfish.lab import calibrate, fit_memory_model, fit_speed_model
from pufferfish.model import ModelConfig
from pufferfish.resolver import count_params, predict_peak_bytes, speed
from pufferfish.resolver.hardware import load_profile, profile_peak_flops
from tests.conftest import ROOT


def key(fields: dict, batch: int, t) -> tuple:
    return (fields["num_layers"], fields["num_dims"], batch, fields["seq_len"], t.ckpt, bool(t.compile))


def test_check2_grid_is_new_planner_like_and_fits_40_gib():
    rows = calibrate.grid("check2")
    old = {key(*r)[:4] for name in ("fit", "check") for r in calibrate.grid(name)}
    assert len(rows) == 24 and not old & {key(*r)[:4] for r in rows}
    assert sum(bool(t.compile) for _, _, t in rows) == 10  # compilation dominates the grid's time
    assert sum(t.precision == "fp32" for _, _, t in rows) == 2 and sum("use_moe" in f for f, _, _ in rows) == 2
    for fields, batch, t in rows:
        assert 2 <= fields["num_layers"] <= 30 and 256 <= fields["num_dims"] <= 1280
        assert 2 * 2048 <= batch * fields["seq_len"] <= 64 * 256 and 256 <= fields["seq_len"] <= 2048
        s = calibrate.shape_of(ModelConfig(**fields), batch, t)
        assert s.compiled == bool(t.compile) and predict_peak_bytes(s).total < 40 * 2**30


def test_fit_script_reprints_rows_the_model_predicts_exactly(tmp_path, capsys):
    prof = load_profile("h200")
    rows = []
    for fields, batch, t in calibrate.grid("check2")[:4]:
        s = calibrate.shape_of(ModelConfig(**fields), batch, t)
        tps = speed.predict_tokens_per_s(s, profile_peak_flops(prof, t.precision), prof.mfu, True)
        rows.append({**fields, "batch": batch, "technique": asdict(t), "measured_peak": predict_peak_bytes(s).total,
                     "measured_tps": tps})  # fmt: skip
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"rows": rows, "git": "test", "grid": "check2"}))
    assert fit_speed_model.main(["--fit", str(path), "--check", str(path), "--refit"]) == 0
    out = capsys.readouterr().out
    assert "check2 grid (held out)                        median  0.0%, worst  0.0% (4 rows)" in out
    assert "memory  fit and check2 grids together" in out and "refit on 4 fit-grid rows" in out
    assert "host_layer_s['eager'] = " in out and "not fitted: eager_gpu_factor = 1.7" in out
    assert speed.CONSTANTS == speed.SpeedConstants()  # the refit's constants were passed, not set in the model



def test_memory_fit_script_reprints_grid_and_plan_rows_the_model_predicts_exactly(tmp_path, capsys):
    from pufferfish.api import compose_config
    from pufferfish.resolver import memory_shape, model_dict
    from pufferfish.resolver.hardware import CUDA_CONTEXT_BYTES, GIB, hardware_on
    from pufferfish.resolver.plan import with_optimizer

    rows = []
    for fields, batch, t in calibrate.grid("check3")[:3]:
        s = calibrate.shape_of(ModelConfig(**fields), batch, t)
        rows.append({**fields, "batch": batch, "technique": asdict(t), "measured_peak": predict_peak_bytes(s).total})
    grid = tmp_path / "check3.json"
    grid.write_text(json.dumps({"rows": rows, "grid": "check3"}))
    cfg = compose_config(["gpu=rtx3060", "mode=standard", "optim.name=adamw"])  # one plan-check run, as planned
    total = int(140.4 * GIB)
    hw = hardware_on(cfg.gpu, cfg.optimizations, "cuda", "NVIDIA H200", total, total - CUDA_CONTEXT_BYTES)
    s = memory_shape(model_dict(cfg, 12, 512, 8192, 1024), cfg, hw, 8, False)
    run = {"profile": "rtx3060", "mode": "standard", "verdict": "ok", "num_layers": 12, "num_dims": 512,
           "seq_len": 1024, "micro_batch": 8, "grad_ckpt": False, "precision": hw.precision,
           "measured_peak_bytes": predict_peak_bytes(s).total}  # fmt: skip
    muon = memory_shape(model_dict(cfg, 12, 512, 8192, 1024), with_optimizer(cfg, "muon"), hw, 8, False)
    muon_run = {**run, "optimizer": "muon", "measured_peak_bytes": predict_peak_bytes(muon).total}
    assert muon_run["measured_peak_bytes"] != run["measured_peak_bytes"]  # one buffer a matrix, not two
    plans = tmp_path / "check_plans.json"
    plans.write_text(json.dumps({"rows": [run, muon_run]}))
    # each row is shaped with the optimizer it ran (a row without one: AdamW, before rows recorded it)
    assert [fit_memory_model.err(r) for r in fit_memory_model.plan_rows(str(plans))] == [0.0, 0.0]
    assert fit_memory_model.main(["--grids", str(grid), "--plans", str(plans), "--refit"]) == 0
    out = capsys.readouterr().out
    assert "| check3 | 0.0% | 0.0% | 3 |" in out
    assert "finished runs predicted +0.0% of measured at the least" in out
    # the rows are the committed model's own predictions: the search finds the committed compiled constants
    assert "refit (compiled rows: weighted worst 0.0%, median 0.0%): compiled_layer_factor = 1.3, " in out
    assert predict_peak_bytes(s).total == run["measured_peak_bytes"]  # and sets nothing in the model


def test_memory_fit_script_leaves_out_the_compiled_rows_of_eager_only_grids(tmp_path, capsys):
    """--eager-only: a grid whose compiled rows predate a change to the compiled step counts its eager rows
    alone (the compiled rows were re-measured on 2026-11-30, after ed2f2e9's graph-break fix)."""
    rows = []
    for fields, batch, t in calibrate.grid("check3"):
        s = calibrate.shape_of(ModelConfig(**fields), batch, t)
        rows.append({**fields, "batch": batch, "technique": asdict(t), "measured_peak": predict_peak_bytes(s).total})
    grid = tmp_path / "check3.json"
    grid.write_text(json.dumps({"rows": rows, "grid": "check3"}))
    compiled = sum(1 for r in rows if r["technique"]["compile"])
    assert 0 < compiled < len(rows)
    assert fit_memory_model.main(["--eager-only", str(grid)]) == 0
    assert f"| check3 | 0.0% | 0.0% | {len(rows) - compiled} |" in capsys.readouterr().out


def test_one_shape_instead_of_a_grid():
    """--shape: one row as plans run it (GQA as attention=gqa, the plan's techniques); a malformed one is
    refused with the expected form."""
    (fields, batch, t), = calibrate.parse_shape("12x512:512x512:lean:32000")
    assert (fields["num_layers"], fields["num_dims"], fields["num_heads"], fields["num_kv_heads"]) == (12, 512, 8, 2)
    assert (batch, fields["seq_len"], fields["vocab_size"]) == (512, 512, 32000)
    assert t == calibrate.plan_techniques()["lean"] and t.ckpt and t.chunked and t.compile == "step"
    assert calibrate.parse_shape("4x256:8x128")[0][2] == calibrate.plan_techniques()["all"]  # the defaults
    for bad in ("12x512", "12x512:512", "12x512:512x512:turbo", "12x512:512x512:all:8192:x"):
        with pytest.raises(SystemExit, match="LAYERSxDIMS:BATCHxSEQ"):
            calibrate.parse_shape(bad)


def test_cpu_speed_measures_the_step_and_sets_it_against_the_probe():
    """A real measurement of one small shape: the share is tokens/s x the FLOPs the speed model counts for the
    built model over the probe, and the table's prediction is what the cpu profile would plan."""
    from pufferfish.lab import cpu_speed

    result = cpu_speed.measure(steps=2, grid=[(1, 64, 2, 64)], probe_seconds=0.05)
    (row,) = result["rows"]
    assert (row["num_layers"], row["num_dims"], row["batch"], row["seq_len"]) == (1, 64, 2, 64)
    mc = ModelConfig(num_layers=1, num_dims=64, num_heads=1, num_kv_heads=1, vocab_size=cpu_speed.VOCAB, seq_len=64)
    assert row["params"] == count_params(calibrate.shape_of(mc, 2, calibrate.plan_techniques()["fp32"]))
    assert row["flops_per_token"] == speed.model_flops_per_token(row["params"], 1, 64, 64)
    assert row["tokens_per_s"] > 0 and result["probe_flops"] > 0
    assert row["share"] == pytest.approx(row["tokens_per_s"] * row["flops_per_token"] / result["probe_flops"])
    text = cpu_speed.table(result, mfu=0.5, half=64)
    predicted = result["probe_flops"] * 0.5 * 64 / (64 + 64) / row["flops_per_token"]
    assert f"| 1 x 64 | 1 | 2 x 64 | {row['params'] / 1e6:.2f}M | {row['tokens_per_s']:,.0f} | {row['share']:.3f} | " \
           f"{predicted:,.0f} | {predicted / row['tokens_per_s'] - 1:+.0%} |" in text  # fmt: skip


def test_cpu_speed_fit_recovers_the_share_law_it_fits():
    from pufferfish.lab import cpu_speed

    rows = [{"num_dims": d, "share": 0.9 * d / (d + 180)} for d in (64, 128, 256, 384, 768)]
    mfu, half = cpu_speed.fit(rows)
    assert (mfu, half) == (pytest.approx(0.9), 180)
    above = [{**r, "share": r["share"] * 1.2} for r in rows]  # an asymptote above the probe: mfu held at 1
    mfu, half = cpu_speed.fit(above)
    assert mfu == 1.0 and half < 180
    committed = json.loads((ROOT / "docs" / "measurements" / "2026-12-05" / "cpu_speed.json").read_text())
    mfu, half = cpu_speed.fit(committed["rows"])  # the profile's constants are the committed measurement's fit
    assert (round(mfu, 2), half) == (float(load_profile("cpu").mfu), speed.CONSTANTS.cpu_half_share_dims)
    noisy = [{**r, "share": r["share"] * f} for r, f in zip(rows, (1.05, 0.95, 1.02, 0.98, 1.0))]
    mfu, half = cpu_speed.fit(noisy)
    assert 150 <= half <= 210 and 0.8 <= mfu <= 1.0


def test_the_cpu_speed_model_gives_narrow_layers_a_smaller_share_of_the_probe():
    """The cpu profile's prediction: FLOPs at the probed rate x mfu x d / (d + cpu_half_share_dims)."""
    prof = load_profile("cpu")
    rates = []
    for d in (64, 768):
        mc = ModelConfig(num_layers=4, num_dims=d, num_heads=max(1, d // 64), num_kv_heads=1, vocab_size=8192,
                         seq_len=512)  # fmt: skip
        s = calibrate.shape_of(mc, 4, calibrate.plan_techniques()["fp32"])
        tps = speed.predict_tokens_per_s(s, 1e11, float(prof.mfu), on_gpu=False)
        share = float(prof.mfu) * d / (d + speed.CONSTANTS.cpu_half_share_dims)
        assert tps == pytest.approx(1e11 * share / speed.flops_per_token(s))
        rates.append(share)
    assert rates[0] < 0.5 * rates[1]
