"""Pufferfish's modules import one another without a cycle, lazy imports inside functions included.

A cycle works only while every module in it happens to be imported in the right order and needs none of
the others' names at import time; moving one import line breaks it. The graph is read from the source
with `ast`, so it also sees the imports a given run never reaches.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PUFFERFISH = Path(__file__).resolve().parents[1] / "pufferfish"


def modules_of(package: Path) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of a package; a package is its __init__.py."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def source_of(importer: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute name of the module `from ... import` reads from, relative levels resolved."""
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def lazy_reexports(tree: ast.Module) -> set[ast.AST]:
    """The imports inside a package's module-level __getattr__: they run when a name is asked for, to hand
    it on, never while the package is imported."""
    return {n for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
            for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}  # fmt: skip


def imported(importer: str, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> set[str]:
    """The package's modules an import statement runs: `from .x import y` runs x.y where y is a submodule,
    x itself otherwise; and every package's __init__ on the way, but the importer's own (they are being
    imported around it already)."""
    top = min(modules, key=len)  # the package itself
    if isinstance(node, ast.Import):
        targets = {alias.name for alias in node.names}
    else:
        source = source_of(importer, node, modules[importer].name == "__init__.py")
        targets = {f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names}
    found = set()
    for target in targets:
        if target.partition(".")[0] != top:
            continue  # another distribution's module
        if target not in modules:
            raise ImportError(f"{modules[importer]} imports {target}, which is not a module of {top}")
        found |= {target, *(a for a in ancestors(target) if a not in ancestors(importer))}
    found.discard(importer)
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, module level and inside functions alike."""
    modules = modules_of(package)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = lazy_reexports(tree) if path.name == "__init__.py" else set()
        graph[name] = {target for node in ast.walk(tree)
                       if isinstance(node, (ast.Import, ast.ImportFrom)) and node not in skip
                       for target in imported(name, node, modules)}  # fmt: skip
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None: depth-first search, where an edge back into the current path
    closes a cycle."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        path.append(node)
        for nxt in sorted(graph[node]):
            if nxt in path:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done and (cycle := visit(node)):
            return cycle
    return None


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "pkg"


def test_every_kind_of_import_becomes_the_edges_python_runs(tmp_path):
    package = write_package(tmp_path, {
        "pkg/__init__.py": "from .sub import Thing\n\ndef __getattr__(name):\n    from .heavy import Big\n"
                           "    return Big\n",
        "pkg/heavy.py": "import torch\nfrom . import sub\n",
        "pkg/plain.py": "from __future__ import annotations\nimport os.path\n",
        "pkg/user.py": "from . import plain\nfrom .sub import Thing\nfrom .sub.deep import f\n",
        "pkg/late.py": "def run():\n    import pkg.heavy\n",
        "pkg/sub/__init__.py": "Thing = 1\n",
        "pkg/sub/deep.py": "from .. import plain\nfrom ..sub import Thing\nfrom . import Thing as Again\n",
    })  # fmt: skip
    assert import_graph(package) == {
        "pkg": {"pkg.sub"},  # __getattr__ only hands Big on: not an edge
        "pkg.heavy": {"pkg.sub"},  # torch is not the package's
        "pkg.plain": set(),
        "pkg.user": {"pkg.plain", "pkg.sub", "pkg.sub.deep"},  # module, package's name, package's module
        "pkg.late": {"pkg.heavy"},  # inside a function; `pkg` itself is the importer's own package
        "pkg.sub": set(),
        "pkg.sub.deep": {"pkg.plain", "pkg.sub"},  # two levels up; its own package's names
    }


def test_an_import_of_a_module_that_is_not_there_says_which_file():
    node = ast.parse("from .gone import x").body[0]
    with pytest.raises(ImportError, match="^pkg/user.py imports pkg.gone, which is not a module of pkg$"):
        imported("pkg.user", node, {"pkg": Path("pkg/__init__.py"), "pkg.user": Path("pkg/user.py")})


def test_find_cycle_names_the_modules_in_order():
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # two ways to c: not a cycle
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_pufferfish_imports_have_no_cycle():
    graph = import_graph(PUFFERFISH)
    assert {"pufferfish", "pufferfish.train", "pufferfish.model.llama", "pufferfish.resolver"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle or [])}; move what both need into a third module"
