"""Promises about the project's shape: the README's test command is what CI runs, the library
stays free of Qt and (but for one adapter) of Slicer, torch stays a range users can satisfy, and
the wheel ships the library and `brainid_training`, without the repository's tests, runs or scripts."""

import ast
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLICER_ADAPTER = "slicer_adapter.py"


def _ci_command() -> str:
    lines = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith(("#", "set ", "cd "))]
    assert len(lines) == 1, lines
    return lines[0].strip()


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    assert _ci_command() in readme


def test_torch_requirement_is_a_range_not_a_pin():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(d for d in deps if re.match(r"torch\b", d))
    assert "==" not in torch_req and ">=" in torch_req


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_imports_no_qt_and_only_the_adapter_imports_slicer():
    for path in sorted((REPO / "BrainIDLib").rglob("*.py")):
        imported = _imported_modules(path)
        assert not imported & {"qt", "PySide6", "PyQt5", "PythonQt", "ctk"}, f"{path.name} imports Qt"
        if path.name != SLICER_ADAPTER:
            assert not imported & {"slicer", "vtk", "mrml"}, f"{path.name} imports Slicer; only {SLICER_ADAPTER} may"


def test_library_source_is_python_310_compatible():
    # `X | Y` annotations need postponed evaluation before 3.10's runtime typing; match needs 3.10.
    for path in sorted((REPO / "BrainIDLib").rglob("*.py")):
        text = path.read_text()
        ast.parse(text, feature_version=(3, 10))
        if re.search(r"->\s*[^:\n]*\|", text) or re.search(r":\s*\w+\s*\|\s*\w+", text):
            assert "from __future__ import annotations" in text, f"{path.name} needs postponed annotations"


REPOSITORY_ONLY = {"brainid_devtools", "benchmarks", "docs", "training", "brainid_training"}


def test_shipped_code_imports_no_repository_only_package_and_the_core_not_the_module():
    # BrainIDLib/ and BrainID/ are what the Slicer extension ships; test pairs, benchmarks, docs
    # scripts and the training package do not travel with them. Imports go module -> core only.
    for path in sorted([*(REPO / "BrainIDLib").rglob("*.py"), *(REPO / "BrainID").rglob("*.py")]):
        forbidden = REPOSITORY_ONLY | ({"BrainID", "BrainIDModuleLib"} if path.is_relative_to(REPO / "BrainIDLib") else set())
        imported = _imported_modules(path) & forbidden
        assert not imported, f"{path.relative_to(REPO)} imports {sorted(imported)}"


@pytest.mark.slow
def test_wheel_holds_the_library_and_brainid_training_and_nothing_else(tmp_path):
    pytest.importorskip("setuptools")  # --no-build-isolation: build with this environment's setuptools
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "out", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "wheel"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"BrainIDLib", "brainid_training"}
    assert "brainid_training/cli.py" in names and "brainid_training/configs/smoke.yaml" in names
    assert "BrainIDLib/resources/Models/brainid-lite.safetensors" in names
    stray = [n for n in names if n.endswith((".sh", ".pt", ".jsonl")) or "demo_pairs" in n or "checkpoints" in n]
    assert not stray, stray
    entry_points = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "brainid-train = brainid_training.cli:main" in entry_points
