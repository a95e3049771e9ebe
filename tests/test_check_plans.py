"""python -m pufferfish.lab.check_plans on CPU: the machinery behind the GPU plan check, real jobs, and which
profile x mode pairs share one job (their plans made through fake GPU hardware, as tests/test_resolver.py)."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from pufferfish.lab.check_plans import parse_args
from pufferfish.lab.plan_check.cards import gpu_ids
from pufferfish.lab.plan_check.grouping import (
    Pair,
    as_run,
    group_pairs,
    memory_key,
    pair_for,
    plan_pairs,
    ran_as_planned,
)
from pufferfish.lab.plan_check.rows import read_rows, verdict
from pufferfish.lab.plan_check.scheduler import (
    CONTEXT_GIB,
    PEAK_MARGIN,
    Cards,
    Job,
    job_command,
    need_gib,
    place,
    planned_need_gib,
)
from tests.conftest import ROOT, compose, tiny_overrides

VERDICTS = ("ok", "OOM", "crash", "below 70 %", "not memory-bound")


def test_check_plans_runs_a_job_and_reads_its_memory(tmp_path, cache_dir):
    shared = ("gpu=", "mode=", "run_dir=", "train.sample_tokens=")  # the script sets these itself
    extra = [o for o in tiny_overrides(tmp_path / "unused", cache_dir) if not o.startswith(shared)]
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, "-m", "pufferfish.lab.check_plans", "--device", "cpu", "--profiles", "cpu",
                           "--modes", "ultra_fast", "--steps", "3", "--out", str(out), "--", *extra],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (row,) = json.loads((out / "check_plans.json").read_text())["rows"]
    assert (row["profile"], row["mode"], row["exit"], row["steps"], row["oom"]) == ("cpu", "ultra_fast", 0, 3, False)
    assert row["measured_peak_bytes"] > 0 and row["cap_bytes"] > 0 and 0 < row["use"] < 1
    assert row["predicted_peak_bytes"] > 0 and row["micro_batch"] >= 1 and row["num_layers"] == 1
    assert row["binding_constraint"] != "user"  # the plan without train.max_steps: what really limits it
    plan = json.loads((out / "cpu-ultra_fast" / "plan.json").read_text())
    assert row["optimizer"] == plan["optimizer"]["name"] in ("muon", "adamw")  # what optim.name=auto chose
    assert row["verdict"].startswith(VERDICTS)
    assert "| cpu | ultra_fast | 1 x 64 |" in proc.stdout
    assert not (out / "cpu-ultra_fast" / "checkpoints").exists()  # deleted once read


def test_the_check_plans_on_the_corpus_its_jobs_read(tmp_path):
    # the default corpus (this machine's Python source) is capped by each job's budget: the check plans on, and
    # prepares, that capped corpus, so its plans are the jobs' and no job builds a corpus of its own
    cache = tmp_path / "cache"
    args, extra = parse_args(["--device", "cpu", "--profiles", "cpu", "--modes", "ultra_fast", "--out",
                              str(tmp_path / "out"), "--", f"data.cache_dir='{cache}'"])  # fmt: skip
    (pair,) = plan_pairs(args, extra, None)
    prepared = sorted(p.name for p in cache.iterdir())
    job = Job("cpu", "ultra_fast", tmp_path / "run")
    proc = subprocess.run(job_command(job, args, [*extra, "dry_run=true"]), capture_output=True, text=True,
                          timeout=300, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert ran["corpus_tokens"] == pair.plan["corpus_tokens"] < 20_000_000  # capped, not the whole source tree
    assert sorted(p.name for p in cache.iterdir()) == prepared  # the job found its corpus ready


def test_verdicts_and_packing_rules():
    row = {"oom": False, "exit": 0, "measured_peak_bytes": 1, "use": 0.5, "steps": 20, "stopped_by": "schedule",
           "binding_constraint": "data", "grad_accum": 4, "double_micro_batch_fits": False}  # fmt: skip
    assert verdict(row, 20) == "below 70 %"  # memory set the micro-batch, and it left 30 % unused
    assert verdict({**row, "use": 0.8}, 20) == "ok"
    assert verdict({**row, "grad_accum": 1}, 20) == "not memory-bound (batch at target)"
    assert verdict({**row, "double_micro_batch_fits": True}, 20) == "not memory-bound (micro-batch cap)"
    assert verdict({**row, "grad_accum": 1, "binding_constraint": "memory"}, 20) == "below 70 %"
    assert verdict({**row, "oom": True, "exit": 1}, 20) == "OOM"
    assert verdict({**row, "exit": 1}, 20) == "crash"
    assert verdict({**row, "steps": 1, "stopped_by": "time budget"}, 20).startswith("incomplete")

    cards = Cards(["0", "1"], capacity_gib=140, per_card=3)
    big, small = Job("h200", "standard", ROOT, need_gib=140), Job("gtx1650", "quick_dev", ROOT, need_gib=4)
    assert cards.fits("0", big)  # an empty card takes any job, however big
    cards.running["0"].append(big)
    assert not cards.fits("0", small) and cards.fits("1", small)  # a whole-card job runs alone
    cards.running["1"] += [small, small, small]
    assert not cards.fits("1", small)  # --jobs-per-gpu


def test_single_pairs_join_the_profiles_by_modes():
    args, _ = parse_args(["--profiles", "h200", "--modes", "standard,extended", "--also", "rtx4060:quick_dev",
                          "h200:standard"])  # fmt: skip
    assert args.pairs == [("h200", "standard"), ("h200", "extended"), ("rtx4060", "quick_dev")]
    assert args.profiles == ["h200", "rtx4060"]
    with pytest.raises(SystemExit):
        parse_args(["--also", "rtx4060-quick_dev"])  # not PROFILE:MODE


def test_a_job_needs_its_cap_or_what_its_plan_predicts_if_less():
    gib = 2**30
    assert need_gib("rtx3060", [], 139.8) == 12 + CONTEXT_GIB  # the cap bounds what it can hold
    assert need_gib("h200", [], 139.8) == 139.8  # the card's own size: the whole card
    # an h200 ultra_fast plan predicts 5 GiB: it shares the card instead of holding all of it
    assert planned_need_gib(139.8, peak_bytes=5 * gib) == pytest.approx(5 * PEAK_MARGIN + CONTEXT_GIB)
    assert planned_need_gib(12 + CONTEXT_GIB, peak_bytes=11 * gib) == 12 + CONTEXT_GIB  # memory-bound: its cap
    assert planned_need_gib(139.8, peak_bytes=0) == 139.8  # no plan: its cap


def test_small_jobs_pass_a_big_one_that_cannot_start_until_it_has_waited_its_turn():
    # one H200: two 80 GiB plans cannot share it, but the small ones fit beside the first of them
    cards = Cards(["0"], capacity_gib=139.8, per_card=10)
    a80, h100 = Job("a100_80gb", "extended", ROOT, need_gib=81), Job("h100", "extended", ROOT, need_gib=81)
    a40, g6, g4 = (Job(p, "standard", ROOT, need_gib=n) for p, n in (("a100_40gb", 41), ("gtx1060", 7), ("gtx1650", 5)))
    pending, waiting = [a80, h100, a40, g6, g4], {}
    started = place(pending, cards, now=0.0, waiting=waiting, hold_after_s=60)
    assert [j.name for j, _ in started] == ["a100_80gb-extended", "a100_40gb-standard", "gtx1060-standard",
                                            "gtx1650-standard"]  # fmt: skip
    assert cards.free_gib("0") == pytest.approx(139.8 - 134) and waiting == {"h100-extended": 0.0}
    for job, _ in started:
        pending.remove(job)
    cards.running["0"].remove(g4)  # the smallest ends; another small one waits behind the h100 job
    late = Job("rtx2060", "quick_dev", ROOT, need_gib=5)
    assert [j.name for j, _ in place([h100, late], cards, now=30.0, waiting=waiting)] == ["rtx2060-quick_dev"]
    cards.running["0"].remove(late)
    assert place([h100, late], cards, now=61.0, waiting=waiting) == []  # the card is held for the h100 job now
    cards.running["0"][:] = []
    assert [j.name for j, _ in place([h100, late], cards, now=200.0, waiting=waiting)] == ["h100-extended",
                                                                                           "rtx2060-quick_dev"]


def _pair(profile: str, mode: str, *overrides: str, time_limit_s: float = 600):
    """A pair planned on CPU for its profile's card, emulated (as on a bigger GPU), as tests/test_resolver does."""
    from pufferfish.resolver import make_plan
    from tests.test_resolver import fake_gpu

    cfg = compose(f"gpu={profile}", f"mode={mode}", "train.max_steps=20", *overrides)
    hw = replace(fake_gpu(profile, "bf16" if cfg.gpu.bf16 else "fp16"), emulated=True)
    return pair_for(profile, mode, cfg, make_plan(cfg, hw, 8192, 10**9).to_dict(), time_limit_s)


def test_pairs_with_the_same_plan_and_cap_share_one_job():
    shape = ("model.num_layers=30", "model.num_dims=768")  # the mode's own; the law may choose another per card
    a80, h100 = _pair("a100_80gb", "extended", *shape), _pair("h100", "extended", *shape)  # 96 x 5, 80 GB
    assert (a80.plan["micro_batch"], a80.plan["model"]) == (h100.plan["micro_batch"], h100.plan["model"])
    a40 = _pair("a100_40gb", "extended", "train.micro_batch=32", *shape)  # its own cap, 40 GB
    a80_32 = _pair("a100_80gb", "extended", "train.micro_batch=32", *shape)  # the same plan as a40 but for the cap
    assert (a40.plan["micro_batch"], a40.plan["grad_accum"], a40.plan["model"]) == \
        (a80_32.plan["micro_batch"], a80_32.plan["grad_accum"], a80_32.plan["model"])  # fmt: skip
    batch = "train.batch_tokens=131072"  # left to each card, the faster one's 1 x 64 gets a larger batch
    fast_a80, fast_h100 = _pair("a100_80gb", "ultra_fast", batch), _pair("h100", "ultra_fast", batch)
    groups = group_pairs([a80, a40, h100, a80_32, fast_a80, fast_h100])
    assert [[p.name for p in g] for g in groups] == [["a100_80gb-extended", "h100-extended"], ["a100_40gb-extended"],
                                                     ["a100_80gb-extended"], ["a100_80gb-ultra_fast", "h100-ultra_fast"]]  # fmt: skip

    limit = 600
    config = json.loads(a80.key)["config"]
    other_micro = memory_key({**a80.plan, "micro_batch": a80.plan["micro_batch"] + 8}, config, limit)
    assert other_micro != a80.key  # another micro-batch: another job
    assert memory_key({**a80.plan, "grad_accum": 9}, config, limit) == a80.key  # accumulating either way
    assert memory_key({**a80.plan, "grad_accum": 1}, config, limit) != a80.key  # no gradients held across
    fast = fast_a80.plan  # a 36 s budget ends a job before its 600 s limit: the accumulation sets how far it gets
    assert memory_key({**fast, "grad_accum": 2}, json.loads(fast_a80.key)["config"], limit) != \
        memory_key({**fast, "grad_accum": 3}, json.loads(fast_a80.key)["config"], limit)  # fmt: skip

    quick = replace(h100, plan={**h100.plan, "grad_accum": 2})  # the fewest accumulation steps run for the group
    assert group_pairs([a80, quick, h100])[0] == [quick, a80, h100]  # then the order given
    lone = Pair("gtx1650", "standard", error="no plan")  # not planned here: a job of its own
    assert [len(g) for g in group_pairs([lone, replace(lone, mode="extended"), a80])] == [1, 1, 1]


def test_a_run_stands_for_its_group_only_as_planned():
    a80 = _pair("a100_80gb", "extended")
    assert ran_as_planned(a80, a80.plan, backed_off=False, time_limit_s=600)
    half = a80.plan["micro_batch"] // 2
    halved = {**a80.plan, "micro_batch": half, "grad_accum": 2 * a80.plan["grad_accum"]}  # an out-of-memory back-off
    assert ran_as_planned(a80, halved, backed_off=True, time_limit_s=600)
    assert not ran_as_planned(a80, halved, backed_off=False, time_limit_s=600)
    other_cap = {**a80.plan, "hardware": {**a80.plan["hardware"], "vram_bytes": 70 * 2**30}}
    assert not ran_as_planned(a80, other_cap, backed_off=False, time_limit_s=600)
    member = {**a80.plan, "grad_accum": 7}
    assert (as_run(member, halved)["micro_batch"], as_run(member, halved)["grad_accum"]) == (half, 14)


def test_profiles_are_emulated_on_a_described_card_as_on_a_real_one():
    """check_plans plans for the card nvidia-smi describes, through detect_hardware's own rules."""
    from pufferfish.resolver.hardware import CUDA_CONTEXT_BYTES, hardware_on

    cfg = compose("gpu=h200", "mode=standard", "train.device=cuda:0")  # h200's profile is 139 GiB
    for card, emulated, vram in ((140.4 * 2**30, True, 139 * 2**30),  # an H200: capped at the profile
                                 (139 * 2**30, False, 139 * 2**30 - CUDA_CONTEXT_BYTES)):  # all that is free  # fmt: skip
        hw = hardware_on(cfg.gpu, cfg.optimizations, "cuda:0", "NVIDIA H200", int(card), int(card) - CUDA_CONTEXT_BYTES)
        assert (hw.emulated, hw.vram_bytes, hw.precision, hw.device) == (emulated, vram, "bf16", "cuda:0")


def test_list_groups_the_pairs_and_runs_nothing(tmp_path, cache_dir):
    shared = ("gpu=", "mode=", "run_dir=", "train.sample_tokens=")
    extra = [o for o in tiny_overrides(tmp_path / "unused", cache_dir) if not o.startswith(shared)]
    out = tmp_path / "list.json"
    proc = subprocess.run([sys.executable, "-m", "pufferfish.lab.check_plans", "--list", "--profiles", "a100_80gb,h100",
                           "--modes", "ultra_fast", "extended", "--out", str(tmp_path / "check"), "--json", str(out),
                           "--", *extra], capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    listed = json.loads(out.read_text())
    assert listed["pairs"] == 4 and listed["jobs"] == len(listed["groups"]) <= 4 and not listed["errors"]
    assert sorted(n for g in listed["groups"] for n in g) == ["a100_80gb-extended", "a100_80gb-ultra_fast",
                                                              "h100-extended", "h100-ultra_fast"]  # fmt: skip
    assert f"4 profile x mode pairs need {listed['jobs']} distinct jobs, for " in proc.stdout
    if not gpu_ids(None):
        assert "no GPU is visible here" in proc.stdout and "140.4 GiB" in proc.stdout
    assert not (tmp_path / "check").exists()  # nothing ran


def test_two_pairs_with_one_plan_run_once(tmp_path, cache_dir):
    """Two modes made to plan alike (fixed shape, batch and data share): one job, two rows, two verdicts."""
    shared = ("gpu=", "mode=", "run_dir=", "train.sample_tokens=")
    extra = [o for o in tiny_overrides(tmp_path / "unused", cache_dir) if not o.startswith(shared)]
    extra += ["model.num_layers=1", "model.num_dims=64", "model.seq_len=32", "train.micro_batch=4",
              "train.batch_tokens=128", "mode.min_data_fraction=0.5", "mode.max_data_fraction=1.0"]  # fmt: skip
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, "-m", "pufferfish.lab.check_plans", "--device", "cpu", "--profiles", "cpu",
                           "--modes", "ultra_fast,quick_dev", "--steps", "3", "--timeout", "35", "--out", str(out),
                           "--", *extra], capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 profile x mode pair(s) need 1 distinct job(s)" in proc.stderr
    result = json.loads((out / "check_plans.json").read_text())
    assert (result["pairs"], result["jobs"], result["groups"]) == (2, 1, [["cpu-ultra_fast", "cpu-quick_dev"]])
    first, second = result["rows"]
    assert first["run_dir"] == second["run_dir"] == str(out / "cpu-ultra_fast")
    assert first["measured_peak_bytes"] == second["measured_peak_bytes"] > 0 and second["steps"] == 3
    assert second["same_run_as"] == "cpu/ultra_fast" and second["notes"][0].startswith("same plan as cpu/ultra_fast")
    assert first["verdict"].startswith(VERDICTS) and second["verdict"].startswith(VERDICTS)
    assert not (out / "cpu-quick_dev").exists()
    assert "(same plan as cpu/ultra_fast: its run)" in proc.stdout


def test_a_run_planned_otherwise_sends_its_group_to_run_alone(tmp_path):
    a80, h100 = _pair("a100_80gb", "extended"), _pair("h100", "extended")
    (tmp_path / "logs").mkdir()
    for run_plan, alone in ((a80.plan, []), ({**a80.plan, "micro_batch": a80.plan["micro_batch"] + 8}, [h100])):
        job = Job("a100_80gb", "extended", tmp_path / "run", rc=0, pairs=[a80, h100])
        job.run_dir.mkdir(exist_ok=True)
        (job.run_dir / "plan.json").write_text(json.dumps(run_plan))
        (job.run_dir / "summary.json").write_text(json.dumps({"step": 20, "stopped_by": "schedule",
                                                              "peak_mem_bytes": 70 * 2**30}))  # fmt: skip
        rows, to_run = read_rows(job, [], tmp_path / "logs", 20, 600)
        assert to_run == alone
        assert sorted(rows) == (["a100_80gb-extended"] if alone else ["a100_80gb-extended", "h100-extended"])
        if not alone:
            assert rows["h100-extended"]["same_run_as"] == "a100_80gb/extended"
            assert rows["h100-extended"]["use"] == rows["a100_80gb-extended"]["use"] > 0.85  # 70 GiB of 79.4
            assert (rows["h100-extended"]["profile"], rows["h100-extended"]["verdict"]) == ("h100", "ok")
