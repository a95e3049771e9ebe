"""An installed wheel, not the checkout, runs: it carries the config groups and plans a run from an empty
folder."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

from pufferfish.paths import CONF_DIR
from tests.conftest import ROOT, tiny_overrides

# no index, no version check, no prompt, nothing left in ~/.cache/pip
OFFLINE_PIP = {"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1",
               "PIP_NO_CACHE_DIR": "1"}  # fmt: skip


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | OFFLINE_PIP  # the install, not ROOT
    proc = subprocess.run(list(map(str, args)), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"{' '.join(map(str, args))} exited {proc.returncode}:\n"
                                  f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")  # fmt: skip
    return proc


def build_wheel(out: Path, scratch: Path) -> Path:
    """A wheel of the working tree, built offline with the installed setuptools, from a copy: in the checkout
    setuptools keeps build/lib between builds and would pack a module deleted since."""
    src = scratch / "src"
    shutil.copytree(ROOT / "pufferfish", src / "pufferfish", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out, ".", cwd=src)
    (wheel,) = out.glob("pufferfish-*.whl")
    return wheel


def reach_the_dependencies(python: Path, cwd: Path) -> None:
    """--system-site-packages reaches the base interpreter's packages; where the tests run in a venv of their
    own, its site-packages is added after the new venv's, so the wheel still comes first."""
    own = [d for d in site.getsitepackages() if not Path(d).is_relative_to(sys.base_prefix)]
    if own:
        purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=cwd)
        lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in own)
        (Path(purelib.stdout.strip()) / "pufferfish-test-dependencies.pth").write_text(lines)


def test_the_top_level_conf_is_a_link_to_the_package_conf():
    assert (ROOT / "conf").is_symlink() and os.readlink(ROOT / "conf") == "pufferfish/conf"
    assert (ROOT / "conf").resolve() == CONF_DIR
    listed = subprocess.run(["git", "ls-files", "-s", "conf"], cwd=ROOT, capture_output=True, text=True,
                            check=True)  # fmt: skip
    assert listed.stdout.startswith("120000 "), listed.stdout  # stored by git as a link, not a copy


def test_the_installed_wheel_carries_its_configs_and_plans_a_run(tmp_path, cache_dir):
    wheel = build_wheel(tmp_path / "dist", tmp_path)
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("pufferfish/conf/")}
    yaml = {f"pufferfish/{p.relative_to(CONF_DIR.parent).as_posix()}" for p in CONF_DIR.rglob("*.yaml")}
    assert shipped == yaml and len(yaml) > 40  # every group's options, and nothing else there

    venv, empty = tmp_path / "venv", tmp_path / "empty"
    empty.mkdir()
    # torch and the other dependencies come from this interpreter's site-packages, and so does pip
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv, cwd=empty)
    python = venv / "bin" / "python"
    reach_the_dependencies(python, empty)
    run(python, "-m", "pip", "install", "--no-deps", wheel, cwd=empty)
    code = "import pufferfish, pufferfish.paths; print(pufferfish.__file__); print(pufferfish.paths.CONF_DIR)"
    where = run(python, "-c", code, cwd=empty)
    module, conf = (Path(line).resolve() for line in where.stdout.split())
    inside = venv.resolve()
    assert module.is_relative_to(inside) and conf.is_relative_to(inside), where.stdout  # not the checkout's

    out = tmp_path / "run"
    tiny = tiny_overrides(out, cache_dir, "dry_run=true", "train.device=cpu")
    tiny = [o for o in tiny if not o.startswith("run_dir=")]  # Hydra's run dir instead, as a user would
    dry = run(python, "-m", "pufferfish.train", *tiny, f"hydra.run.dir={out}", cwd=empty)
    assert dry.stdout.startswith("Plan\n----\ngpu         cpu on cpu\n"), dry.stdout
    assert "\nWhy\n" in dry.stdout and "steps" in dry.stdout, dry.stdout
    assert (out / "plan.json").is_file() and (out / ".hydra" / "config.yaml").is_file()
    assert not any(empty.iterdir())  # every file went to the folders it was given
