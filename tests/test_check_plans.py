"""scripts/check_plans.py end to end on CPU: the machinery behind the GPU check (issue 3), one real job."""

import json
import subprocess
import sys

from tests.conftest import ROOT, tiny_overrides

VERDICTS = ("ok", "OOM", "crash", "below 70 %", "not memory-bound")


def test_check_plans_runs_a_job_and_reads_its_memory(tmp_path, cache_dir):
    shared = ("gpu=", "mode=", "run_dir=", "train.sample_tokens=")  # the script sets these itself
    extra = [o for o in tiny_overrides(tmp_path / "unused", cache_dir) if not o.startswith(shared)]
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, "scripts/check_plans.py", "--device", "cpu", "--profiles", "cpu",
                           "--modes", "ultra_fast", "--steps", "3", "--out", str(out), "--", *extra],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (row,) = json.loads((out / "check_plans.json").read_text())["rows"]
    assert (row["profile"], row["mode"], row["exit"], row["steps"], row["oom"]) == ("cpu", "ultra_fast", 0, 3, False)
    assert row["measured_peak_bytes"] > 0 and row["cap_bytes"] > 0 and 0 < row["use"] < 1
    assert row["predicted_peak_bytes"] > 0 and row["micro_batch"] >= 1 and row["num_layers"] == 1
    assert row["binding_constraint"] != "user"  # the plan without train.max_steps: what really limits it
    assert row["verdict"].startswith(VERDICTS)
    assert "| cpu | ultra_fast | 1 x 64 |" in proc.stdout
    assert not (out / "cpu-ultra_fast" / "checkpoints").exists()  # deleted once read


def test_verdicts_and_packing_rules():
    sys.path.insert(0, str(ROOT / "scripts"))
    import check_plans as cp

    row = {"oom": False, "exit": 0, "measured_peak_bytes": 1, "use": 0.5, "steps": 20, "stopped_by": "schedule",
           "binding_constraint": "data", "grad_accum": 4, "double_micro_batch_fits": False}  # fmt: skip
    assert cp.verdict(row, 20) == "below 70 %"  # memory set the micro-batch, and it left 30 % unused
    assert cp.verdict({**row, "use": 0.8}, 20) == "ok"
    assert cp.verdict({**row, "grad_accum": 1}, 20) == "not memory-bound (batch at target)"
    assert cp.verdict({**row, "double_micro_batch_fits": True}, 20) == "not memory-bound (micro-batch cap)"
    assert cp.verdict({**row, "grad_accum": 1, "binding_constraint": "memory"}, 20) == "below 70 %"
    assert cp.verdict({**row, "oom": True, "exit": 1}, 20) == "OOM"
    assert cp.verdict({**row, "exit": 1}, 20) == "crash"
    assert cp.verdict({**row, "steps": 1, "stopped_by": "time budget"}, 20).startswith("incomplete")

    cards = cp.Cards(["0", "1"], capacity_gib=140, per_card=3)
    big, small = cp.Job("h200", "standard", ROOT, need_gib=140), cp.Job("gtx1650", "quick_dev", ROOT, need_gib=4)
    assert cards.fits("0", big)  # an empty card takes any job, however big
    cards.running["0"].append(big)
    assert not cards.fits("0", small) and cards.fits("1", small)  # a whole-card job runs alone
    cards.running["1"] += [small, small, small]
    assert not cards.fits("1", small)  # --jobs-per-gpu
