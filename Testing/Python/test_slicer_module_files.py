"""The Slicer module's files: CMake lists complete, .ui loadable and consistent with BrainID.py."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "BrainID"
UI = MODULE / "Resources" / "UI" / "BrainID.ui"
IGNORED = ("CMakeLists.txt", ".DS_Store", ".gitignore")


def cmake_list(path: Path, var: str) -> list[str]:
    text = re.sub(r"#[^\n]*", "", path.read_text())
    m = re.search(r"set\(\s*" + var + r"\s+(.*?)\)", text, re.S)
    assert m, f"{path}: no set({var} ...)"
    return [item.replace("${MODULE_NAME}", "BrainID") for item in m.group(1).split()]


def files_under(root: Path, exclude=("__pycache__",)) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and not any(part in exclude for part in p.parts)
            and p.name not in IGNORED and not p.name.endswith(".pyc")}


def test_module_cmake_lists_every_script_and_resource():
    cm = MODULE / "CMakeLists.txt"
    listed = set(cmake_list(cm, "MODULE_PYTHON_SCRIPTS")) | set(cmake_list(cm, "MODULE_PYTHON_RESOURCES"))
    present = files_under(MODULE)
    assert not present - listed, f"add to BrainID/CMakeLists.txt: {sorted(present - listed)}"
    assert not listed - present, f"listed in BrainID/CMakeLists.txt but missing: {sorted(listed - present)}"


def test_library_cmake_lists_every_module_and_resource():
    cm = REPO / "BrainIDLib" / "CMakeLists.txt"
    scripts = set(cmake_list(cm, "BRAINIDLIB_PYTHON_SCRIPTS"))
    present = {p for p in files_under(REPO / "BrainIDLib") if p.endswith(".py")}
    assert not present - scripts, f"add to BRAINIDLIB_PYTHON_SCRIPTS: {sorted(present - scripts)}"
    assert not scripts - present, f"listed but missing: {sorted(scripts - present)}"
    resources = set(cmake_list(cm, "BRAINIDLIB_RESOURCES"))
    present = files_under(REPO / "Resources")
    assert not present - resources, f"add to BRAINIDLIB_RESOURCES: {sorted(present - resources)}"
    assert not resources - present, f"listed but missing: {sorted(resources - present)}"


def test_top_level_cmake_is_an_extension():
    text = (REPO / "CMakeLists.txt").read_text()
    for needle in ("project(BrainID)", "EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS",
                   "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS",
                   "set(EXTENSION_DEPENDS PyTorch)", "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                   "add_subdirectory(BrainID)", "add_subdirectory(BrainIDLib)",
                   "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert needle in text, needle
    module = (MODULE / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in module and "WITH_GENERIC_TESTS" in module
    assert "slicer_add_python_unittest" in module
    # ctest runs the pytest suite too, from the repository root, in Slicer's Python
    test = re.search(r"add_test\(\s*NAME (\S+)\s+COMMAND (.*?)\s+WORKING_DIRECTORY (\S+)\s*\)", module, re.S)
    assert test, "BrainID/CMakeLists.txt: add_test(NAME ... COMMAND ... WORKING_DIRECTORY ...)"
    assert test.group(2).split()[-4:] == ["-m", "pytest", "-q", "Testing/Python"]
    assert "${PYTHON_EXECUTABLE}" in test.group(2) and test.group(3) == "${PROJECT_SOURCE_DIR}"
    assert (REPO / "Testing" / "Python").is_dir()


def test_extension_urls_name_files_that_exist():
    """Raw GitHub URLs of the homepage's repository, checked against that repository (commit
    5d8a2d3 of peirong26/Brain-ID has assets/data_gen.png, framework.png, showcase.png)."""
    text = (REPO / "CMakeLists.txt").read_text()
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"]*)"\)', text).group(1)
    owner_repo = homepage.removeprefix("https://github.com/")
    urls = re.search(r'set\(EXTENSION_SCREENSHOTURLS "([^"]*)"\)', text).group(1).split()
    urls += [u for u in [re.search(r'set\(EXTENSION_ICONURL "([^"]*)"\)', text).group(1)] if u]
    assert urls
    for url in urls:
        assert url.startswith(f"https://raw.githubusercontent.com/{owner_repo}/main/"), url
        assert url.rsplit("/main/", 1)[1] in {"assets/data_gen.png", "assets/framework.png", "assets/showcase.png"}


def test_apply_sits_under_its_inputs():
    items = [w.get("name") for w in ui_tree().find("widget").find("layout").findall("item/widget")]
    assert items.index("modelCollapsibleButton") + 1 == items.index("applyButton")
    assert items.index("applyButton") < items.index("correspondenceCollapsibleButton") < items.index(
        "fewShotCollapsibleButton")


def test_ui_bindings_name_parameter_node_fields():
    tree = ast.parse((MODULE / "BrainIDModuleLib" / "parameters.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "BrainIDParameterNode")
    fields = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    bound = {}
    for w in ui_tree().iter("widget"):
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.get("stdset") == "0", w.get("name")  # a dynamic property, as Designer writes it
                bound[prop.findtext("string")] = w.get("name")
    assert set(bound) <= fields and fields - set(bound) == {"modelName"}


def import_graph() -> dict[str, set[str]]:
    """{module: modules of BrainID/ it imports} for BrainID.py and BrainIDModuleLib/*.py, from their ASTs
    (every import statement, also those inside functions)."""
    files = {"BrainID": MODULE / "BrainID.py"}
    files.update({f"BrainIDModuleLib.{p.stem}": p for p in (MODULE / "BrainIDModuleLib").glob("*.py")})
    files["BrainIDModuleLib"] = files.pop("BrainIDModuleLib.__init__")
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def test_no_import_cycle_inside_the_module():
    graph = import_graph()
    assert graph["BrainID"] >= {"BrainIDModuleLib.panel", "BrainIDModuleLib.predict_logic"}  # the graph sees imports
    state = {}

    def visit(node, path):
        if state.get(node) == "open":
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        if state.get(node) != "done":
            state[node] = "open"
            for nxt in sorted(graph[node]):
                visit(nxt, path + [node])
            state[node] = "done"

    for name in graph:
        visit(name, [])
    assert all("BrainID" not in imported for imported in graph.values())  # the parts never import the shell


def ui_tree():
    return ET.parse(UI).getroot()


def widget_names_in_ui() -> set[str]:
    return {w.get("name") for w in ui_tree().iter("widget")}


def names_used_by_module() -> set[str]:
    """Widget names the panel and the sections use (the parameter node binds the rest by property)."""
    names = set()
    for part in ("panel.py", "sections.py"):
        names |= set(re.findall(r"\bui\.(\w+)", (MODULE / "BrainIDModuleLib" / part).read_text()))
    return names


def test_every_widget_name_the_module_uses_exists_in_the_ui():
    used = names_used_by_module()
    assert {"applyButton", "progressBar", "modelComboBox", "downloadButton", "modelStatusLabel", "logTextEdit",
            "pointSelector", "targetVolumesSelector", "findMatchButton", "heatmapCheckBox",
            "fewShotSegmentationsSelector", "trainHeadButton", "saveHeadButton", "loadHeadButton", "applyHeadButton",
            "headLabel"} <= used
    missing = used - widget_names_in_ui()
    assert not missing, f"BrainID.py uses widgets missing from BrainID.ui: {sorted(missing)}"


def test_custom_slicer_widgets_are_declared():
    root = ui_tree()
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    custom = {c for c in used if c.startswith(("qMRML", "qSlicer", "ctk"))}
    assert custom <= declared, f"declare in <customwidgets>: {sorted(custom - declared)}"
    for c in root.iter("customwidget"):
        assert c.findtext("extends") and c.findtext("header"), c.findtext("class")


UI_LOADER = r"""
import os, sys, xml.etree.ElementTree as ET
os.environ["QT_QPA_PLATFORM"] = "offscreen"
from PySide6 import QtWidgets
from PySide6.QtCore import QFile
from PySide6.QtUiTools import QUiLoader
ui, names = sys.argv[1], sys.argv[2].split(",")
root = ET.parse(ui).getroot()
app = QtWidgets.QApplication([])
loader = QUiLoader()
custom = {c.findtext("class"): c.findtext("extends") for c in root.iter("customwidget")}
for cls, base in custom.items():  # placeholders for the Slicer/CTK classes (real ones live in Slicer's Qt)
    loader.registerCustomWidget(type(cls, (getattr(QtWidgets, base),), {}))
standard = set(loader.availableWidgets())
unknown = {w.get("class") for w in root.iter("widget")} - standard - set(custom)
assert not unknown, f"unknown widget classes: {unknown}"
f = QFile(ui)
assert f.open(QFile.ReadOnly)
widget = loader.load(f)
assert widget is not None, loader.errorString()
missing = [n for n in names if widget.findChild(QtWidgets.QWidget, n) is None]
assert not missing, f"not in the loaded ui: {missing}"
assert widget.findChild(QtWidgets.QPushButton, "applyButton").text() == "Apply"
assert widget.findChild(QtWidgets.QCheckBox, "segmentationCheckBox").isChecked()
print("UI-OK", len(names))
"""


def test_ui_loads_offscreen_with_pyside6():
    """QUiLoader in a clean child process (Qt and the VTK/MRML libraries share no process here)."""
    import subprocess
    import sys

    pytest.importorskip("PySide6.QtUiTools", reason="PySide6 is needed to load the .ui")
    names = sorted(names_used_by_module())
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    r = subprocess.run([sys.executable, "-c", UI_LOADER, str(UI), ",".join(names)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0 and "UI-OK" in r.stdout, r.stdout + r.stderr


def test_module_source_is_short_and_compiles():
    source = (MODULE / "BrainID.py").read_text()
    compile(source, "BrainID.py", "exec")
    assert len(source.splitlines()) <= 150
    citation = next(n.value.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Assign)
                    and any(getattr(t, "id", "") == "CITATION" for t in n.targets))
    assert citation == ("Liu P, Puonti O, Hu X, Alexander DC, Iglesias JE. Brain-ID: Learning Contrast-agnostic "
                        "Anatomical Representations for Brain Imaging. ECCV 2024.")
    assert "acknowledgementText" in source and "CITATION" in source
    assert "registerCustomSampleDataSource" in source and "ScriptedLoadableModuleTest" in source
    assert "isinstance" not in (MODULE / "BrainIDModuleLib" / "panel.py").read_text()  # jobs finish themselves
    # only the adapter imports slicer inside the library
    for py in (REPO / "BrainIDLib").rglob("*.py"):
        if py.name != "slicer_adapter.py":
            assert not re.search(r"^\s*(import slicer|from slicer)", py.read_text(), re.M), py


def test_sample_checksums_match_the_shipped_files():
    from BrainIDLib.resources import resource_path
    from BrainIDLib.samples import sample_manifest

    samples = sample_manifest()
    assert samples
    for s in samples:
        assert s["sha256"] == hashlib.sha256(resource_path("SampleData", s["filename"]).read_bytes()).hexdigest()
    json.loads((REPO / "Resources" / "models.json").read_text())


def test_module_parts_load_without_torch():
    """Slicer shows the module before PyTorch is installed (Apply then offers to install it)."""
    import subprocess
    import sys

    parts = ", ".join(f"BrainIDModuleLib.{p.stem}" for p in sorted((MODULE / "BrainIDModuleLib").glob("*.py"))
                      if p.stem not in ("__init__", "panel", "sections", "parameters"))  # (these need Qt / Slicer's app)
    code = f"import sys; sys.path.insert(0, {str(MODULE)!r}); import {parts}; assert 'torch' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
