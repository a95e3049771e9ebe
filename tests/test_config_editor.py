"""The config editor driven end to end from a script: choose, set, see the plan, save, train with it."""

import json

from omegaconf import OmegaConf

from pufferfish.config_editor import Editor
from tests.conftest import run_cli, tiny_overrides

SCRIPT = """\
gpu=gtx1060
mode
quick_dev
mode.target_hours=0.2
mode.no_such_field=1
gpu=gtx9999
save tiny_edit
quit
"""


def test_editor_script_saves_an_experiment_that_trains(tmp_path, cache_dir):
    experiments = tmp_path / "conf" / "experiment"
    (tmp_path / "commands.txt").write_text(SCRIPT)
    proc = run_cli("pufferfish.config_editor", "--script", str(tmp_path / "commands.txt"),
                   "--experiment-dir", str(experiments))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.count("Plan\n----") == 4  # the defaults, then after each of the three changes
    assert "gtx1060 on cpu" in out and "planning for gpu=gtx1060" in out  # a profile, planned on this CPU
    assert "0.200 h ->" in out and "predicted of 6.00 GiB" in out  # the budget, memory against the VRAM
    assert "not changed: Could not override 'mode.no_such_field'" in out
    assert "gpu=gtx9999 is not an option; known: a100_40gb" in out

    saved = (experiments / "tiny_edit.yaml").read_text()
    assert saved.startswith("# @package _global_\n")
    body = OmegaConf.create(saved)
    assert list(body.defaults) == [{"override /gpu": "gtx1060"}, {"override /mode": "quick_dev"}]
    assert OmegaConf.to_container(body, resolve=True) == {"defaults": list(body.defaults), "mode": {"target_hours": 0.2}}

    run = tmp_path / "run"
    keep = [o for o in tiny_overrides(run, cache_dir) if not o.startswith(("gpu=", "mode="))]
    dry = run_cli("pufferfish.train", "experiment=tiny_edit", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
                  "dry_run=true", *keep)  # fmt: skip
    assert dry.returncode == 0, dry.stderr[-2000:]
    plan = json.loads((run / "plan.json").read_text())
    assert plan["hardware"]["profile"] == "gtx1060" and plan["time_budget_s"] == 0.2 * 3600
    assert OmegaConf.load(run / "config.yaml").mode.name == "quick_dev"


def test_unset_returns_to_the_default_and_only_deltas_are_saved(tmp_path):
    commands = iter(["attention=mqa", "gpu=cpu", "data=pysource", "train.seed=7", "unset attention", "save d"])

    def read(prompt: str) -> str:
        line = next(commands, None)
        if line is None:
            raise EOFError
        return line

    with open(tmp_path / "log.txt", "w") as log:
        Editor(tmp_path, out=log).run(read)
    saved = OmegaConf.load(tmp_path / "d.yaml")
    assert list(saved.defaults) == [{"override /gpu": "cpu"}]  # data=pysource is the default already
    assert OmegaConf.to_container(saved.train) == {"seed": 7}
