"""The lab stands apart: pufferfish/lab/ imports the product's public names, and nothing else in pufferfish/
imports the lab; no file puts the repository on sys.path; the measuring job's settings are not training
settings.

Imports are read from the source with `ast`, so those inside functions count too, even where no test run
reaches them.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "pufferfish"
LAB = PACKAGE / "lab"
PATH_HACK = "sys.path." + "insert"  # spelled in two parts, so that this file does not contain it


def module_of(path: Path) -> str:
    """The dotted name of a module file under the repository; a package is its __init__.py."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, is_package: bool) -> list[tuple[str, list[str], int]]:
    """(the module imported from, the names imported, line) of every import statement, module level or inside
    a function; a relative import is resolved against `module`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = module.split(".") if is_package else module.split(".")[:-1]
            if node.level:
                base = base[: len(base) - (node.level - 1)]
                source_module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source_module = node.module or ""
            found.append((source_module, [alias.name for alias in node.names], node.lineno))
    return found


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    return imports(path.read_text(), module_of(path), path.name == "__init__.py")


def in_lab(module: str) -> bool:
    return module == "pufferfish.lab" or module.startswith("pufferfish.lab.")


def lab_imports(found: list[tuple[str, list[str], int]]) -> list[str]:
    """What of the lab the imports reach: `from pufferfish import lab` reaches it as much as `import pufferfish.lab`."""
    return [f"line {line}: {module}" + (f" import {', '.join(names)}" if names else "")
            for module, names, line in found
            if in_lab(module) or any(in_lab(f"{module}.{name}") for name in names)]  # fmt: skip


def private_core_imports(found: list[tuple[str, list[str], int]]) -> list[str]:
    """Names of the product (pufferfish outside the lab) imported while private: a leading underscore on the
    name imported or on any module on the way to it."""
    offences = []
    for module, names, line in found:
        if module.split(".")[0] != "pufferfish" or in_lab(module):
            continue
        private = [part for part in module.split(".") if part.startswith("_")]
        private += [name for name in names if name.startswith("_") and not in_lab(f"{module}.{name}")]
        if private:
            offences.append(f"line {line}: {module} ({', '.join(private)})")
    return offences


def test_the_checks_see_every_way_to_import():
    lazy = "def main():\n    from .lab.measure import measure\n"
    assert lab_imports(imports(lazy, "pufferfish.train", False)) == ["line 2: pufferfish.lab.measure import measure"]
    assert lab_imports(imports("from .. import lab\n", "pufferfish.resolver.plan", False)) == [
        "line 1: pufferfish import lab"]  # fmt: skip
    assert lab_imports(imports("import pufferfish.lab.bench as b\n", "pufferfish.api", False)) == [
        "line 1: pufferfish.lab.bench"]  # fmt: skip
    assert lab_imports(imports("from .labels import lab\nfrom . import config\n", "pufferfish", True)) == []

    private = "from ..resolver.shapes import _fit_micro_batch, model_dict\nfrom pufferfish._x import y\n"
    assert private_core_imports(imports(private, "pufferfish.lab.sweep_tools", False)) == [
        "line 1: pufferfish.resolver.shapes (_fit_micro_batch)", "line 2: pufferfish._x (_x)"]  # fmt: skip
    public = "from pufferfish import config as _schemas\nfrom . import _own\nfrom .plan_check import _x\n"
    assert private_core_imports(imports(public, "pufferfish.lab.measure", False)) == []  # the lab's own names


def product_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if not p.is_relative_to(LAB))


def lab_modules() -> list[Path]:
    return sorted(LAB.rglob("*.py"))


def test_nothing_in_the_product_imports_the_lab():
    modules = product_modules()
    assert PACKAGE / "train.py" in modules and PACKAGE / "resolver" / "plan.py" in modules
    offences = {str(p.relative_to(ROOT)): found for p in modules if (found := lab_imports(imports_of(p)))}
    assert offences == {}


def test_the_lab_imports_only_public_names_of_the_product():
    modules = lab_modules()
    assert LAB / "measure.py" in modules and LAB / "plan_check" / "rows.py" in modules
    assert any(module == "pufferfish.resolver" for p in modules for module, _, _ in imports_of(p))  # it sees them
    offences = {str(p.relative_to(ROOT)): found for p in modules if (found := private_core_imports(imports_of(p)))}
    assert offences == {}


def test_no_file_puts_the_repository_on_sys_path():
    files = [p for folder in ("pufferfish", "scripts", "tests") for p in (ROOT / folder).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]  # fmt: skip
    assert len(files) > 50
    offences = [str(p.relative_to(ROOT)) for p in files if PATH_HACK in p.read_text(errors="replace")]
    assert offences == []


def setting_names(schema, prefix: str = "") -> set[str]:
    """Every key of a dataclass schema, nested ones as dotted names."""
    names = set()
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        names.add(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            names |= setting_names(hints[f.name], f"{prefix}{f.name}.")
    return names


@pytest.mark.parametrize("moved", ["job", "train.measure_steps", "train.measure_batches"])
def test_the_measuring_jobs_settings_are_not_training_settings(moved):
    from pufferfish.api import compose_config
    from pufferfish.config import PufferfishConfig
    from pufferfish.lab.config import MeasureConfig

    training = setting_names(PufferfishConfig)
    assert "train.micro_batch" in training and moved not in training
    assert not any("measure" in name for name in training)
    assert moved not in {f"{k}.{sub}" if sub else k for k, node in compose_config([]).items()
                         for sub in (node.keys() if hasattr(node, "keys") else [None])}  # fmt: skip
    measuring = setting_names(MeasureConfig)  # the measuring job's own config has them, under `measure`
    assert {"measure.steps", "measure.batches"} <= measuring and measuring - training == {
        "measure", "measure.steps", "measure.batches"}  # fmt: skip
