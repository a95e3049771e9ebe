"""The config editor driven end to end from a script: choose, set, see the plan, save, train with it."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pufferfish.config_editor import Editor
from pufferfish.paths import CONF_DIR
from tests.conftest import run_cli, tiny_overrides


def scripted(*lines: str):
    commands = iter(lines)

    def read(prompt: str) -> str:
        line = next(commands, None)
        if line is None:
            raise EOFError
        return line

    return read

SCRIPT = """\
gpu=gtx1060
mode
quick_dev
mode.target_hours=0.2
mode.target_hour=1
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
    assert "not changed: mode.target_hour is not a setting of pufferfish.train; did you mean mode.target_hours?" in out
    assert "not changed: gpu=gtx9999 is not an option of gpu; choose one of: a100_40gb" in out

    saved = (experiments / "tiny_edit.yaml").read_text()
    assert saved.startswith("# @package _global_\n")
    body = OmegaConf.create(saved)
    assert list(body.defaults) == [{"override /gpu": "gtx1060"}, {"override /mode": "quick_dev"}]
    assert OmegaConf.to_container(body, resolve=True) == {"defaults": list(body.defaults), "mode": {"target_hours": 0.2}}

    run = tmp_path / "run"
    keep = [o for o in tiny_overrides(run, cache_dir) if not o.startswith(("gpu=", "mode="))]
    # hydra.run.dir too: Hydra's own files would otherwise go to outputs/ in the checkout
    dry = run_cli("pufferfish.train", "experiment=tiny_edit", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
                  "dry_run=true", *keep, f"hydra.run.dir={run}")  # fmt: skip
    assert dry.returncode == 0, dry.stderr[-2000:]
    plan = json.loads((run / "plan.json").read_text())
    assert plan["hardware"]["profile"] == "gtx1060" and plan["time_budget_s"] == 0.2 * 3600
    assert OmegaConf.load(run / "config.yaml").mode.name == "quick_dev"


def test_unset_returns_to_the_default_and_only_deltas_are_saved(tmp_path):
    read = scripted("attention=mqa", "gpu=cpu", "data=pysource", "train.seed=7", "unset attention", "save d")
    with open(tmp_path / "log.txt", "w") as log:
        Editor(tmp_path, out=log).run(read)
    saved = OmegaConf.load(tmp_path / "d.yaml")
    assert list(saved.defaults) == [{"override /gpu": "cpu"}]  # data=pysource is the default already
    assert OmegaConf.to_container(saved.train) == {"seed": 7}


def test_gpu_menu_lists_each_profile_once_with_its_description(tmp_path):
    with open(tmp_path / "log.txt", "w") as log:
        Editor(tmp_path, out=log).pick("gpu", scripted(""))
    menu = [line.split() for line in (tmp_path / "log.txt").read_text().splitlines()]
    profiles = sorted(p.stem for p in (CONF_DIR / "gpu").glob("*.yaml"))
    assert [words[1] for words in menu] == profiles  # each once, in order
    gtx1060 = next(" ".join(words[2:]) for words in menu if words[1] == "gtx1060")
    assert gtx1060 == "NVIDIA GeForce GTX 1060 6 GB (Pascal GP106, compute capability 6.1): eager, fp32, memory-efficient attention."
    assert all(words[1] not in words[2:] and words[2:] for words in menu)  # a description, without the name again


def test_save_writes_in_the_current_folder_or_the_given_path_never_in_the_package_conf(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(CONF_DIR.rglob("*"))
    read = scripted("train.seed=7", "save mine", f"save {CONF_DIR / 'experiment' / 'mine'}", "save elsewhere/other.yaml")
    with open(tmp_path / "log.txt", "w") as log:
        Editor(Path("experiment"), out=log).run(read)
    said = (tmp_path / "log.txt").read_text()
    assert OmegaConf.load(tmp_path / "experiment" / "mine.yaml").train.seed == 7
    assert OmegaConf.load(tmp_path / "elsewhere" / "other.yaml").train.seed == 7
    assert f"saved {tmp_path / 'experiment' / 'mine.yaml'}\n" in said
    assert f"hydra.searchpath=[file://{tmp_path}] experiment=mine" in said  # where it is and how to train it
    assert f"not saved: {CONF_DIR / 'experiment' / 'mine.yaml'} is inside Pufferfish's own {CONF_DIR}" in said
    assert sorted(CONF_DIR.rglob("*")) == before


@pytest.mark.parametrize("module, args, says", [
    ("pufferfish.config_editor", ["--bogus"], "unrecognized arguments: --bogus; `python -m pufferfish.config_editor --help`"),
    ("pufferfish.config_editor", ["--script", "no/such/file"], "--script no/such/file cannot be read (No such file"),
    ("pufferfish.config_editor", ["--experiment-dir", "conf/experiment"], "conf/experiment is inside Pufferfish's own"),
    ("pufferfish.compare", ["no/such/run"], "no/such/run does not exist; give run directories"),
    ("pufferfish.compare", ["outputs", "--sort", "size"], "argument --sort: invalid choice: 'size'"),
])  # fmt: skip
def test_bad_command_line_is_one_line_and_exit_2(module, args, says):
    proc = run_cli(module, *args, env={"PYTHONUNBUFFERED": "1"}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("pufferfish: error: ")
    assert says in proc.stderr and "Traceback" not in proc.stderr and proc.stdout == ""
