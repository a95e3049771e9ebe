"""Every gpu profile plans the step its card can run, emulation runs that step, and a compilation that fails on
the device falls back to eager and the run goes on."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pufferfish.errors import ConfigError
from pufferfish.resolver import (
    format_plan,
    make_plan,
    memory_budget,
    memory_shape,
    model_dict,
    predict_peak_bytes,
)
from pufferfish.resolver.capabilities import ARCHITECTURES, architecture, card_path
from pufferfish.resolver.hardware import GIB, hardware_on, own_card
from pufferfish.resolver.plan import OVERHEAD_SHARE, planned_config
from pufferfish.resolver.replan import plan_eager_step
from pufferfish.resolver.speed import CONSTANTS, compile_seconds
from pufferfish.runlog import read_metrics
from pufferfish.train import train
from pufferfish.transforms import sdpa_backend
from tests.conftest import compose, run_cli

ROOT = Path(__file__).resolve().parents[1]
H200 = ("NVIDIA H200", int(140.4 * GIB))
# (compile, precision, attention kernel, fused AdamW, TF32) under optimizations=all, the default
PASCAL, TURING, AMPERE_UP = (False, "fp32", "efficient", True, False), (False, "fp16", "efficient", True, False), \
    (True, "bf16", "flash", True, True)  # fmt: skip
EXPECTED = {"gtx1060": PASCAL, "gtx1650": TURING, "rtx2060": TURING, "rtx3060": AMPERE_UP, "rtx4060": AMPERE_UP,
            "rtx3090": AMPERE_UP, "rtx4090": AMPERE_UP, "a100_40gb": AMPERE_UP, "a100_80gb": AMPERE_UP,
            "h100": AMPERE_UP, "h200": AMPERE_UP}  # fmt: skip


def on_card(cfg, card: str = "own"):
    """The profile's Hardware on its own card, or emulated on an H200, described without a GPU here."""
    if card == "own":
        return own_card(cfg)
    name, total = H200
    return hardware_on(cfg.gpu, cfg.optimizations, "cuda:0", name, total, total)


def test_every_gpu_profile_has_an_expected_path():
    from pufferfish.resolver.hardware import known_profiles

    assert set(known_profiles()) - {"auto", "cpu"} == set(EXPECTED)


@pytest.mark.parametrize("card", ["own", "h200"])
@pytest.mark.parametrize("profile", sorted(EXPECTED))
def test_the_plan_takes_the_cards_path_on_the_card_and_emulated(profile, card):
    cfg = compose(f"gpu={profile}", "mode=quick_dev", "optim.name=adamw")  # AdamW: the fused kernel is the card's
    hw = on_card(cfg, card)
    plan = make_plan(cfg, hw, 8192, 10**9)
    assert (plan.compile, plan.precision, plan.attention_kernel, plan.fused_adamw, plan.tf32) == EXPECTED[profile]
    saved = json.loads(json.dumps(plan.to_dict()))  # plan.json
    assert (saved["compile"], saved["precision"], saved["attention_kernel"]) == EXPECTED[profile][:3]
    for key in ("precision", "compile", "attention", "fused_adamw", "tf32", "speed"):
        assert plan.reasons[key], key
    arch = architecture(float(cfg.gpu.compute_capability))
    assert arch.name in plan.reasons["compile"]
    assert ("1/64" in plan.reasons["precision"]) == (profile == "gtx1060")  # fp16 is no speed path on Pascal
    assert ("assumed" in plan.reasons["speed"]) == (profile != "h200")  # the H200's share is checked on it
    printed = format_plan(plan)
    assert f"{'compiled' if plan.compile else 'eager'}, attention {plan.attention_kernel}" in printed
    assert hw.emulated == (card == "h200")  # the h200 profile too: 139 of the card's 140.4 GiB
    if hw.emulated:  # memory is the card's; the speed is the H200's, and the plan says so
        assert "NVIDIA H200's speed" in printed and "card's path" in " ".join(hw.notes)


def test_the_memory_and_speed_models_count_the_step_the_card_runs():
    """The same model and micro-batch: the 1060's eager fp32 step keeps more than the 3060's compiled bf16 one."""
    pascal, ampere = compose("gpu=gtx1060", "optim.name=muon"), compose("gpu=rtx3060", "optim.name=muon")
    mc = model_dict(pascal, 8, 512, 8192, 512)
    eager = memory_shape(mc, pascal, on_card(pascal), 8, False)
    compiled = memory_shape(mc, ampere, on_card(ampere), 8, False)
    assert not eager.compiled and eager.precision == "fp32" and eager.repeated_kv
    assert compiled.compiled and compiled.precision == "bf16" and not compiled.repeated_kv
    assert predict_peak_bytes(eager).activations > predict_peak_bytes(compiled).activations
    baseline = compose("gpu=rtx3060", "optimizations=baseline", "optim.name=muon")  # compile off: eager there too
    assert not memory_shape(mc, baseline, on_card(baseline), 8, False).compiled


def test_flash_needs_sixteen_bits_and_compute_capability_8():
    fp32 = compose("gpu=rtx3090", "optimizations.precision=fp32")
    plan = make_plan(fp32, on_card(fp32), 8192, 10**9)
    assert plan.attention_kernel == "efficient" and "16-bit" in plan.reasons["attention"] and plan.tf32
    asked = compose("gpu=gtx1060", "attention.sdpa_backend=flash")  # never a crash for a missing kernel
    plan = make_plan(asked, on_card(asked), 8192, 10**9)
    assert plan.attention_kernel == "efficient" and "8.0+" in plan.reasons["attention"]
    math = compose("gpu=rtx3060", "attention.sdpa_backend=math")
    assert make_plan(math, on_card(math), 8192, 10**9).attention_kernel == "math"


def test_pascal_runs_fp16_only_when_asked_and_the_plan_says_what_it_costs():
    cfg = compose("gpu=gtx1060", "optimizations.precision=fp16")
    plan = make_plan(cfg, on_card(cfg), 8192, 10**9)
    assert plan.precision == "fp16" and "costs speed" in plan.reasons["precision"]
    assert plan.attention_kernel == "efficient" and not plan.compile


def test_the_plans_kernel_keeps_flash_off_on_an_emulating_gpu():
    before = torch.backends.cuda.flash_sdp_enabled()
    with sdpa_backend("efficient"):  # a pre-Ampere card's plan on an H200: no flash kernel
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled() == before


def test_architectures_are_ordered_newest_first_and_old_cards_are_refused_by_name():
    floors = [a.min_capability for a in ARCHITECTURES]
    assert floors == sorted(floors, reverse=True)
    assert architecture(6.1).name == "Pascal" and architecture(7.5).name == "Turing"
    assert architecture(8.6).name == "Ampere" and architecture(8.9).name == "Ada Lovelace"
    with pytest.raises(ConfigError, match="compute capability 3.7"):
        architecture(3.7)


def test_an_unknown_compile_backend_names_the_known_ones():
    cfg = compose("gpu=rtx3060", "optimizations.compile_backend=not_a_backend")
    with pytest.raises(ConfigError, match="compile_backend='not_a_backend'.*known: .*aot_eager"):
        make_plan(cfg, on_card(cfg), 8192, 10**9)


def test_the_eager_step_is_planned_again_and_keeps_the_batch():
    cfg = compose("gpu=rtx3060", "mode=standard")
    hw = on_card(cfg)
    plan = make_plan(cfg, hw, 8192, 10**9)
    assert plan.compile
    batch, compiled_micro = plan.batch_tokens, plan.micro_batch
    record = plan_eager_step(plan, cfg, 7, "RuntimeError: no Triton")
    assert not plan.compile and "eager from step 7" in plan.reasons["compile"] and "no Triton" in plan.reasons["compile"]
    assert plan.micro_batch < compiled_micro  # the eager step keeps more: the compiled micro-batch no longer fits
    assert plan.micro_batch * plan.seq_len * plan.grad_accum == batch
    assert plan.predicted_peak_bytes <= memory_budget(hw)
    assert record == {"kind": "compile_fallback", "step": 7, "error": "RuntimeError: no Triton",
                      "why": plan.reasons["compile"], "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum,
                      "predicted_peak_bytes": plan.predicted_peak_bytes}  # fmt: skip
    assert plan.revisions == [record]  # recorded in the plan: plan.json keeps it
    # optim.name=auto chose Muon: the eager step is sized with Muon's one buffer a matrix, not AdamW's two
    assert plan.optimizer["name"] == "muon" and cfg.optim.name == "auto"
    named = compose("gpu=rtx3060", "mode=standard", "optim.name=muon")
    muon = make_plan(named, hw, 8192, 10**9)
    plan_eager_step(muon, named, 7, "no Triton")
    assert plan.memory_breakdown == muon.memory_breakdown


@torch._dynamo.register_backend(name="refuses_every_graph")
def refuses_every_graph(graph_module, example_inputs):
    raise RuntimeError("refused on purpose")  # as Inductor does on a card it cannot compile for


def test_a_compilation_that_fails_falls_back_to_eager_with_one_line_and_the_run_finishes(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = compose("gpu=cpu", "mode=ultra_fast", "data=text_files", f"data.paths=['{ROOT / 'pufferfish'}']",
                  "data.vocab_size=512", "data.tokenizer_train_mb=1", f"data.cache_dir='{tmp_path / 'cache'}'",
                  f"run_dir='{run}'", "train.progress=false", "train.sample_tokens=0", "train.eval_tokens=2048",
                  "train.max_steps=4", "model.num_layers=2", "model.num_dims=64",
                  "optimizations.compile=true", "optimizations.compile_backend=refuses_every_graph")  # fmt: skip
    result = train(cfg)
    assert result["finished"] and result["step"] == 4 and math.isfinite(result["val_loss"])
    said = [line for line in capsys.readouterr().err.splitlines() if "compilation failed" in line]
    assert said == [f"pufferfish: eager from step 1: compilation failed on this device (RuntimeError: refused on "
                    f"purpose); micro-batch {json.loads((run / 'plan.json').read_text())['micro_batch']}"]
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics if m["kind"] == "compile_fallback"] == [1]
    assert [m["step"] for m in metrics if m["kind"] == "train"][-1] == 4
    plan = json.loads((run / "plan.json").read_text())
    assert not plan["compile"] and "refused on purpose" in plan["reasons"]["compile"]


def test_the_readmes_card_table_comes_from_the_plans():
    done = run_cli("pufferfish.lab.card_table", "--profiles", "gtx1060", "rtx3060", "--modes", "quick_dev")
    assert done.returncode == 0, done.stderr
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines()[2:]}
    assert "| Pascal 6.1 | fp32 | eager | efficient |" in rows["gtx1060"]
    assert "| Ampere 8.6 | bf16 | compiled | flash |" in rows["rtx3060"]



def test_a_published_nanogpt_mfu_converts_to_tokens_per_second_and_sets_the_consumer_share():
    from pufferfish.lab import published_throughput as pub
    from pufferfish.resolver import flops_per_token

    # nanoGPT's GPT-2 124M: 6 x 123,689,472 (no position embeddings, tied head once) + 12 x 12 x 768 x 1024
    assert flops_per_token(pub.gpt2_small(12)) == pytest.approx(6 * 123_689_472 + 12 * 12 * 768 * 1024, rel=2e-3)
    assert pub.from_nanogpt_mfu(0.29, 12) == pytest.approx(0.29 * 312e12 / 855.4e6, rel=2e-3)  # ~105.8k tokens/s
    rows = {r["profile"]: r for r in pub.rows()}
    assert rows["h200"]["anchor"] and rows["h200"]["implied_mfu"] == rows["h200"]["mfu"]
    # the RTX 4090 profile's share is the one at which its prediction stands to the report as the H200's does
    assert rows["rtx4090"]["implied_mfu"] == pytest.approx(rows["rtx4090"]["mfu"], rel=0.02)
    assert rows["rtx4090"]["ratio"] == pytest.approx(rows["h200"]["ratio"], rel=0.02)


def test_a_budget_too_short_for_compiling_plans_the_eager_step_and_says_why():
    """Compiling costs seconds before the first step (speed.compile_seconds); where the eager step trains more
    tokens in what is left of the budget, the plan runs eager, its memory and speed counted for that step."""
    short = compose("gpu=h100", "mode=ultra_fast", "mode.target_hours=0.004")  # 14 s
    plan = make_plan(short, own_card(short), 8192, 10**8)
    assert not plan.compile and plan.reasons["compile"].startswith("eager: in a 14 s budget compiling does not pay")
    assert "of compiling (a cold cache)" in plan.reasons["compile"]
    eager = memory_shape(plan.model, planned_config(short, plan.optimizer), own_card(short), plan.micro_batch,
                         plan.grad_ckpt, path=card_path(compose("gpu=h100", "optimizations.compile=false"), own_card(short)))
    assert not eager.compiled and plan.grad_accum == 1  # one micro-batch: no gradients alive in its forward
    assert plan.predicted_peak_bytes == predict_peak_bytes(replace(eager, grads_in_forward=False)).total
    assert "of compiling" not in plan.reasons["steps"]  # the eager steps start at once

    longer = compose("gpu=h100", "mode=ultra_fast")  # 36 s: the compiled 1 x 64 trains more
    plan = make_plan(longer, own_card(longer), 8192, 10**8)
    assert plan.compile and "; it pays in the 36 s budget: 1 x 64 trains" in plan.reasons["compile"]
    took = compile_seconds(1)
    assert plan.reasons["steps"].endswith(f"after about {took:.0f} s of compiling")
    assert plan.steps * plan.batch_tokens <= plan.predicted_tokens_per_s * (36 * (1 - OVERHEAD_SHARE) - took)


def test_a_compiled_plans_batch_gives_its_steps_after_the_compilation():
    """The batch is sized for >= MIN_STEPS steps in the seconds the steps run, the compilation taken out: on an
    RTX 4090 in 72 s (about 15 s of compiling) a batch sized on the whole budget gave 293 steps."""
    from pufferfish.resolver.search import MIN_STEPS

    cfg = compose("gpu=rtx4090", "mode=quick_dev", "mode.target_hours=0.02")
    plan = make_plan(cfg, own_card(cfg), 8192, 10**9)
    assert plan.compile and "of compiling" in plan.reasons["steps"]
    assert plan.steps >= MIN_STEPS and f">= {MIN_STEPS} steps" in plan.reasons["batch"]


def test_compiling_is_kept_where_the_data_ends_both_steps_early_and_where_the_steps_are_fixed():
    cfg = compose("gpu=h200", "mode=standard")  # 50M tokens in 1.5 h: both steps would read 22 epochs
    plan = make_plan(cfg, own_card(cfg), 8192, 50_000_000)
    assert plan.compile and "it pays in the 5400 s budget" in plan.reasons["compile"]
    fixed = compose("gpu=h100", "mode=ultra_fast", "mode.target_hours=0.004", "train.max_steps=50")
    plan = make_plan(fixed, own_card(fixed), 8192, 10**8)
    assert plan.compile and "pays" not in plan.reasons["compile"]  # the budget only reports
    shorter = compose("gpu=h100", "mode=ultra_fast", "mode.target_hours=0.001")  # 3.6 s: less than compiling takes
    assert not make_plan(shorter, own_card(shorter), 8192, 10**8).compile
    fixed = compose("gpu=h100", "mode=ultra_fast", "mode.target_hours=0.001", "train.max_steps=5")
    assert make_plan(fixed, own_card(fixed), 8192, 10**8).steps == 5


def test_the_committed_compile_time_is_the_fit_of_the_committed_runs(capsys, monkeypatch):
    """SpeedConstants' compile seconds are the least-squares line through the committed H100 runs' cold
    compiles (python -m pufferfish.lab.fit_compile_time), and each run lies within 7 s of it."""
    from pufferfish.lab import fit_compile_time as fct

    rows = [r for f in fct.MEASURED for r in fct.cold_rows(f)]
    assert len(rows) >= 10 and {r["layers"] for r in rows} >= {6, 8, 10, 11, 12}
    base, per_layer = fct.fit_line([r["layers"] for r in rows], [r["startup_s"] for r in rows])
    assert round(base, 1) == CONSTANTS.compile_base_s and round(per_layer, 2) == CONSTANTS.compile_layer_s
    assert all(abs(r["startup_s"] - compile_seconds(r["layers"])) < 7 for r in rows)
    # a Muon run after the default's at the same shape compiled from a warm cache: not a cold row
    candidates = [r for r in rows if r["file"].endswith("shakespeare_candidates.jsonl")]
    assert sorted(r["system"] for r in candidates) == ["default", "default", "qk_norm", "qk_norm"]
    monkeypatch.setattr("sys.argv", ["fit_compile_time"])
    fct.main()
    assert f"compile_base_s = {CONSTANTS.compile_base_s}, compile_layer_s = {CONSTANTS.compile_layer_s}" in \
        capsys.readouterr().out  # fmt: skip
