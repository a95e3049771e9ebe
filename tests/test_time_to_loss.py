"""python -m pufferfish.lab.time_to_loss end to end on the CPU: real runs of two recipes at two sizes (a fixed one and
the plan's own) on English text; the table's seconds are the runs' own eval records."""

import json
import sys
from types import SimpleNamespace

import pytest

from pufferfish.lab import time_to_loss
from pufferfish.runlog import read_metrics
from tests.conftest import ROOT, english_file

SIZES = ("1x64", "plan")  # the plan of mode=ultra_fast is 1 x 64 too: as cheap


@pytest.fixture(scope="module")
def measured(tmp_path_factory, cache_dir):
    import subprocess

    out = tmp_path_factory.mktemp("ttl")
    # fixed steps keep the losses the same from run to run on a busy machine; the seconds are still measured
    proc = subprocess.run([sys.executable, "-m", "pufferfish.lab.time_to_loss", "--out", str(out), "--target", "default",
                           "--corpus", str(english_file()), "--gpu", "cpu", "--mode", "ultra_fast", "--budget", "30",
                           "--sizes", ",".join(SIZES), "--systems", "default,adamw", "--set", "data.vocab_size=512",
                           "data.tokenizer_train_mb=1", f"data.cache_dir='{cache_dir}'", "train.eval_tokens=2048",
                           "train.sample_tokens=0", "train.max_steps=20", "train.eval_interval=4",
                           "train.batch_tokens=512", "train.micro_batch=4"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def table(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| system")]
    keys = ["system", "size", "target", "seconds", "startup", "step", "x_peer", "x_run", "handed_over", "steps", "verdict"]
    return [dict(zip(keys, (c.strip() for c in line.strip("|").split("|")))) for line in lines]


def test_the_table_has_a_row_per_system_and_size_with_seconds_from_the_runs_metrics(measured):
    out, stdout = measured
    rows = table((out / "time_to_loss.md").read_text())
    assert table(stdout) == rows
    assert [(r["system"], r["size"]) for r in rows] == [(s, size) for size in SIZES for s in ("default", "adamw")]
    for r in rows:
        run = out / "runs" / f"{r['system']}_{r['size']}"
        evals = [e for e in read_metrics(run / "metrics.jsonl") if e["kind"] == "eval" and not e.get("final")]
        default = [e for e in read_metrics(out / "runs" / f"default_{r['size']}" / "metrics.jsonl")
                   if e["kind"] == "eval" and not e.get("final")]  # fmt: skip
        target = min(e["val_loss"] for e in default)  # --target default: the default's lowest evaluation
        assert float(r["target"]) == pytest.approx(target, abs=5e-4)
        hit = next((e for e in evals if e["val_loss"] <= target), None)
        if hit is None:
            assert r["seconds"] == "not reached" and r["step"] == ""
        else:
            assert float(r["seconds"]) == pytest.approx(hit["elapsed_s"], abs=0.005) and int(r["step"]) == hit["step"]
        (t0, s0), (t1, s1) = ((e["elapsed_s"], e["step"]) for e in (evals[0], evals[-1]))
        assert float(r["startup"]) == pytest.approx(max(0.0, t0 - s0 * (t1 - t0) / (s1 - s0)), abs=0.05)
        summary = json.loads((run / "summary.json").read_text())
        assert float(r["handed_over"]) == pytest.approx(summary["val_loss"], abs=5e-4)
        assert int(r["steps"]) == summary["step"] == 20
        assert r["x_peer"] == r["x_run"] == ""  # no nanoGPT run to compare with
    plan = json.loads((out / "runs" / "adamw_plan" / "plan.json").read_text())
    default = json.loads((out / "runs" / "default_plan" / "plan.json").read_text())
    assert plan["optimizer"]["name"] == "adamw" and default["optimizer"]["name"] == "muon"  # the system's override
    assert plan["schedule"] == default["schedule"] and default["schedule"]["schedule"] == "wsd"
    assert "set by you" not in plan["reasons"]["shape"]  # size `plan`: the resolver chose the shape
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    planned = next(r for r in results if (r["system"], r["size"]) == ("adamw", "plan"))
    assert (planned["layers"], planned["dims"]) == (plan["model"]["num_layers"], plan["model"]["num_dims"])
    fixed = json.loads((out / "runs" / "adamw_1x64" / "plan.json").read_text())
    assert "set by you" in fixed["reasons"]["shape"]
    assert (out / "time_to_loss.png").stat().st_size > 10_000


def test_the_verdict_follows_the_rule_at_both_sizes(measured):
    """Recomputed from the runs' own files at full precision (the table rounds)."""
    out, _ = measured
    rows = {(r["system"], r["size"]): r for r in table((out / "time_to_loss.md").read_text())}
    assert {rows["default", s]["verdict"] for s in SIZES} == {"reference"}

    def run(system, size):
        folder = out / "runs" / f"{system}_{size}"
        evals = [e for e in read_metrics(folder / "metrics.jsonl") if e["kind"] == "eval" and not e.get("final")]
        return evals, json.loads((folder / "summary.json").read_text())["val_loss"]

    def after_startup(evals, target):  # seconds to target less the seconds before the steady steps
        (t0, s0), (t1, s1) = ((e["elapsed_s"], e["step"]) for e in (evals[0], evals[-1]))
        hit = next((e["elapsed_s"] for e in evals if e["val_loss"] <= target), None)
        return None if hit is None else hit - max(0.0, t0 - s0 * (t1 - t0) / (s1 - s0))

    def better(size):
        (mine, mine_loss), (base, base_loss) = run("adamw", size), run("default", size)
        target = min(e["val_loss"] for e in base)
        hit, base_hit = after_startup(mine, target), after_startup(base, target)
        return hit is not None and hit < base_hit and mine_loss <= base_loss

    verdict = rows["adamw", SIZES[0]]["verdict"]
    assert verdict == rows["adamw", SIZES[1]]["verdict"]
    if all(better(s) for s in SIZES):
        assert verdict == "kept"
    else:
        assert verdict.startswith("rejected (")


def test_the_old_recipe_systems_are_what_a_plan_from_before_muon_and_wsd_ran():
    from pufferfish.resolver.plan import OPTIMIZER_DEFAULTS, SCHEDULE_DEFAULTS

    assert time_to_loss.SYSTEMS["cosine"] == [f"optim.{k}={v}" for k, v in SCHEDULE_DEFAULTS.items()]
    assert time_to_loss.SYSTEMS["adamw"] == [f"optim.name={OPTIMIZER_DEFAULTS['name']}"]


def test_verdicts_need_both_sizes_sooner_and_no_worse_hand_over():
    def row(system, size, curve, loss):  # an evaluation every 10 steps, a step a second: no start-up
        return {"system": system, "size": size, "curve": [(t, v, 10 * (i + 1)) for i, (t, v) in enumerate(curve)],
                "val_loss": loss}  # fmt: skip

    goal = {"a": 3.0, "b": 3.0}
    base = [row("default", "a", [(10, 3.5), (20, 3.0)], 3.0), row("default", "b", [(10, 3.4), (20, 2.9)], 2.9)]
    sooner_both = [row("muon", "a", [(10, 2.9)], 2.9), row("muon", "b", [(10, 2.95)], 2.8)]
    assert time_to_loss.verdicts(base + sooner_both, goal) == {"muon": "kept"}
    worse_hand_over = [row("wsd", "a", [(10, 2.9)], 2.9), row("wsd", "b", [(10, 2.95)], 2.91)]
    assert time_to_loss.verdicts(base + worse_hand_over, goal)["wsd"] == "rejected (b: handed-over loss 2.910 > 2.900)"
    one_size_only = [row("qk_norm", "a", [(5, 2.9)], 2.8)]
    assert time_to_loss.verdicts(base + one_size_only, goal)["qk_norm"] == "rejected (b: no run to compare)"
    never = [row("combined", "a", [(10, 3.1)], 2.9), row("combined", "b", [(5, 2.9)], 2.8)]
    assert time_to_loss.verdicts(base + never, goal)["combined"] == "rejected (a: not sooner)"
    assert time_to_loss.first_at_or_below(never[1]["curve"], 3.0) == (5, 10)
    assert time_to_loss.first_at_or_below(base[0]["curve"], 3.0) == (20, 20)  # at or below: 3.0 counts


def test_sooner_counts_the_seconds_after_each_runs_start_up_so_a_warm_compile_cache_decides_nothing():
    def row(system, start, step_s, losses, hand_over):  # an evaluation every 100 steps after `start` seconds
        curve = [(start + step_s * 100 * (i + 1), v, 100 * (i + 1)) for i, v in enumerate(losses)]
        return {"system": system, "size": "a", "curve": curve, "val_loss": hand_over}

    default = row("default", 15.0, 0.01, [5.0, 4.6, 4.4, 4.5], 4.4)  # compiled from a cold cache: 15 s
    warm_same = row("wsd", 2.0, 0.01, [5.0, 4.6, 4.4, 4.5], 4.4)  # the same steps, its compile cached: 2 s
    fewer_steps = row("muon", 15.0, 0.012, [4.7, 4.4, 4.3, 4.4], 4.3)  # slower steps, fewer of them, cold cache
    slow_steps = row("qk_norm", 2.0, 0.02, [5.0, 4.6, 4.4, 4.5], 4.4)  # warm cache, every step twice as slow
    assert time_to_loss.startup(default["curve"]) == pytest.approx(15.0)
    assert time_to_loss.startup(warm_same["curve"]) == pytest.approx(2.0)
    assert time_to_loss.startup([(7.0, 5.0, 100)]) == 0.0  # one evaluation: no steady speed to tell it from
    goal = {"a": 4.4}
    # raw seconds to 4.4: default 18, wsd 5, muon 17.4, qk_norm 8: all "sooner" on the clock
    said = time_to_loss.verdicts([default, warm_same, fewer_steps, slow_steps], goal)
    assert said == {"wsd": "rejected (a: not sooner)", "muon": "kept", "qk_norm": "rejected (a: not sooner)"}


def test_the_nanogpt_target_is_its_final_evaluation_and_times_are_set_against_its_own():
    def row(system, size, curve, loss):
        return {"system": system, "size": size, "curve": [(t, v, 10 * i) for i, (t, v) in enumerate(curve)],
                "val_loss": loss}  # fmt: skip

    rows = [row("nanogpt", "plan", [(20, 5.0), (300, 3.6), (600, 3.5), (610, 3.52)], 3.5),
            row("default", "plan", [(30, 4.0), (200, 3.51), (250, 3.45)], 3.4),
            row("muon", "plan", [(30, 3.9), (100, 3.6)], 3.6)]  # fmt: skip
    goal = time_to_loss.targets(rows, "nanogpt")
    assert goal == {"plan": 3.52}  # its last evaluation, not its best
    assert time_to_loss.targets(rows, "nanogpt-best") == {"plan": 3.5}  # its best, where it overfits
    # nanoGPT itself first reached 3.52 at 600 s; the default at 200 s; muon never did
    assert time_to_loss.times_peer(rows, goal) == {("nanogpt", "plan"): 1.0, ("default", "plan"): pytest.approx(1 / 3)}
    # against nanoGPT's whole run (610 s to its final evaluation): what share of its wall-clock time the default needed
    assert time_to_loss.times_peer(rows, goal, whole_run=True) == {("nanogpt", "plan"): pytest.approx(600 / 610),
                                                                   ("default", "plan"): pytest.approx(200 / 610)}
    with pytest.raises(SystemExit, match="--target nanogpt needs nanogpt's run at size"):
        time_to_loss.targets(rows[1:], "nanogpt")
    assert sorted(["plan", "12x768", "8x512", "8x1024"], key=time_to_loss.size_order) == ["8x512", "8x1024", "12x768",
                                                                                          "plan"]


@pytest.mark.parametrize("argv, said", [(["--target", "low"], "--target='low'; allowed: a validation loss"),
                                        (["--target", "4", "--sizes", "8x512,big"], "--sizes has big; allowed"),
                                        (["--target", "nanogpt", "--systems", "default"],
                                         "has no nanoGPT run at size.s. 8x512, 12x768 on this corpus; add nanogpt"),
                                        (["--target", "4", "--systems", "nanogpt", "--sizes", "2x64"],
                                         "has no default run at size.s. 2x64 on this corpus and budget.*--peer-seconds"),
                                        (["--target", "4", "--peer-seconds", "0"], "--peer-seconds=0.0; allowed: seconds")])
def test_bad_arguments_are_refused_with_what_is_allowed(tmp_path, monkeypatch, argv, said):
    monkeypatch.setattr(sys, "argv", ["time_to_loss", "--out", str(tmp_path), *argv])
    with pytest.raises(SystemExit, match=said):
        time_to_loss.main()


def test_nanogpt_runs_its_given_seconds_or_as_long_as_the_latest_default_run_of_its_size_corpus_and_budget(tmp_path):
    rows = [{"system": "default", "size": "plan", "corpus": "default", "budget_s": 600.0, "wall_s": 650.0},
            {"system": "default", "size": "plan", "corpus": "shakespeare", "budget_s": 600.0, "wall_s": 640.0},
            {"system": "default", "size": "plan", "corpus": "default", "budget_s": 600.0, "wall_s": 655.5},
            {"system": "muon", "size": "plan", "corpus": "default", "budget_s": 600.0, "wall_s": 700.0}]  # fmt: skip
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = SimpleNamespace(out=tmp_path, corpus="default", budget=600.0)
    assert time_to_loss.default_wall(args, "plan") == 655.5  # the later of the two on this corpus
    assert time_to_loss.default_wall(args, "8x512") is None
    assert time_to_loss.default_wall(SimpleNamespace(out=tmp_path, corpus="default", budget=300.0), "plan") is None
    # its own length, when given, whatever default runs there are (nanoGPT for 600 s, the default planned for 300 s)
    for budget in (600.0, 300.0):
        given = SimpleNamespace(out=tmp_path, corpus="default", budget=budget, peer_seconds=600.0)
        assert time_to_loss.peer_wall(given, "plan") == 600.0
    assert time_to_loss.peer_wall(SimpleNamespace(out=tmp_path, corpus="default", budget=600.0, peer_seconds=None),
                                  "plan") == 655.5  # fmt: skip


def test_a_nanogpt_run_already_in_the_results_is_the_target_of_later_runs_on_its_corpus(tmp_path):
    rows = [{"system": "nanogpt", "size": "plan", "corpus": "shakespeare", "budget_s": 600.0, "wall_s": 601.0},
            {"system": "default", "size": "8x512", "corpus": "shakespeare", "budget_s": 300.0, "wall_s": 301.0},
            {"system": "nanogpt", "size": "8x512", "corpus": "default", "budget_s": 600.0, "wall_s": 602.0}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert time_to_loss.peer_sizes(SimpleNamespace(out=tmp_path, corpus="shakespeare")) == {"plan"}
    assert time_to_loss.peer_sizes(SimpleNamespace(out=tmp_path, corpus="default")) == {"8x512"}


def test_a_later_command_reads_the_default_corpus_at_the_cap_of_the_runs_already_in_out(tmp_path, capsys):
    def args(budget):
        return SimpleNamespace(out=tmp_path, corpus="default", sizes="plan", budget=budget, gpu="h200",
                               mode="quick_dev", set=[])  # fmt: skip

    own = {b: time_to_loss.corpus_data(args(b)).max_mb for b in (60.0, 20.0)}  # nothing in --out yet
    assert own[60.0] > own[20.0] > 0  # each budget alone caps the corpus at what it can use
    rows = [{"system": "nanogpt", "size": "plan", "corpus": "shakespeare", "budget_s": 60.0, "data_max_mb": None},
            {"system": "nanogpt", "size": "plan", "corpus": "default", "budget_s": 60.0, "data_max_mb": own[60.0]}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert time_to_loss.corpus_data(args(20.0)).max_mb == own[60.0]  # the same tokens as nanoGPT's run
    said = capsys.readouterr().out
    assert f"capped at {own[60.0]} MB, as the runs already in {tmp_path} read it" in said
    assert f"would cap it at {own[20.0]} MB" in said
    text = SimpleNamespace(**{**vars(args(20.0)), "corpus": str(english_file())})
    assert time_to_loss.corpus_data(text).max_mb is None  # a file of text is read whole: never capped
