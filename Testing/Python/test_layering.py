"""Which way imports go: the core (BrainIDLib) never imports the Slicer module, Qt or the training
package; its modules import each other without cycles; the light parts import without torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CORE = REPO / "BrainIDLib"
FORBIDDEN = {"BrainID", "BrainIDModuleLib", "training", "qt", "ctk", "PythonQt", "PySide2", "PySide6", "PyQt5", "PyQt6"}
TORCH_FREE = ("BrainIDLib", "BrainIDLib.registry", "BrainIDLib.labels", "BrainIDLib.samples", "BrainIDLib.tasks",
              "BrainIDLib.resources", "BrainIDLib.devices", "BrainIDLib.progress", "BrainIDLib.files")


def core_modules(root: Path = CORE) -> dict[str, Path]:
    modules = {}
    for py in root.rglob("*.py"):
        parts = py.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = py
    return modules


def imports_of(name: str, path: Path, modules) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in the file, at module level or inside
    functions; `from pkg import mod` counts as importing pkg.mod, `from mod import name` as mod."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            found += [(m, node.lineno) for m in submodules]
            if len(submodules) < len(node.names):
                found.append((base, node.lineno))
    return found


def import_graph(root: Path = CORE) -> dict[str, set[str]]:
    modules = core_modules(root)
    return {name: {m for m, _ in imports_of(name, path, modules) if m in modules and m != name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, first repeated last), or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n))), None)


def test_core_never_imports_the_slicer_module_qt_or_training():
    modules = core_modules()
    bad = [f"{path.relative_to(REPO)}:{line} imports {m}" for name, path in modules.items()
           for m, line in imports_of(name, path, modules) if m.split(".")[0] in FORBIDDEN]
    assert not bad, "\n".join(bad)


def test_core_modules_import_each_other_without_cycles():
    graph = import_graph()
    assert graph["BrainIDLib.cli"] >= {"BrainIDLib.console", "BrainIDLib.cohort"}  # function-level imports count
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_training_modules_import_each_other_without_cycles():
    """The same check for the headless training package (the Slicer module has its own in
    test_slicer_module_files.py), so no package of the repository has an import cycle."""
    graph = import_graph(REPO / "training")
    assert graph["training.cli"], "the graph must see training's relative imports"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", TORCH_FREE)
def test_light_modules_import_without_torch(module):
    code = f"import {module}, sys; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
