"""Which Python packages BrainID needs inside Slicer, and installing them with the user's consent.

Import this before BrainIDLib (which imports torch). Nothing here imports slicer or Qt: the
prompt (`confirm`), the explanation sink (`explain`), pip and the torch installer are injected, so
the rules are unit-tested. Rules:
- torch comes from the PyTorch extension (PyTorchUtils picks the CUDA build matching the machine);
  when that extension is missing we explain how to get it and install nothing.
- pure-Python requirements (nibabel, safetensors, tqdm) are pip-installed after asking.
- packages Slicer ships (numpy, SimpleITK, requests, ...) are never installed, upgraded or replaced.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

TORCH_REQUIREMENT = "torch>=2.4"
REQUIREMENTS = {"nibabel": "nibabel>=5.0", "safetensors": "safetensors>=0.4", "tqdm": "tqdm>=4.60"}
SLICER_SHIPPED = frozenset({"numpy", "SimpleITK", "requests", "scipy", "vtk", "qt", "ctk", "PythonQt", "packaging"})

PYTORCH_EXTENSION_HELP = (
    "BrainID needs PyTorch. Install the 'PyTorch' extension from the Extensions Manager "
    "(View > Extensions Manager), restart Slicer, then open BrainID again: it will install "
    "the PyTorch build that matches your GPU."
)


def _has(module: str, find_spec=importlib.util.find_spec) -> bool:
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing(find_spec=importlib.util.find_spec) -> dict:
    """{'torch': bool missing, 'packages': [requirement strings to pip-install], 'shipped': [missing shipped]}."""
    return {
        "torch": not _has("torch", find_spec),
        "packages": [req for mod, req in REQUIREMENTS.items() if not _has(mod, find_spec)],
        "shipped": sorted(m for m in ("numpy",) if not _has(m, find_spec)),
    }


def slicer_torch_installer() -> Callable[[], object] | None:
    """PyTorchUtils' installer when the PyTorch extension is present, else None."""
    try:
        import PyTorchUtils  # the PyTorch extension's module
    except ImportError:
        return None

    def install():
        logic = PyTorchUtils.PyTorchUtilsLogic()
        try:
            return logic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT[len("torch"):])
        except TypeError:  # older PyTorchUtils without the version argument
            return logic.installTorch(askConfirmation=False)

    return install


def ensure(confirm: Callable[[str], bool], pip_install: Callable[[str], object],
           torch_installer: Callable[[], object] | None = None, explain: Callable[[str], None] = print,
           find_spec=importlib.util.find_spec) -> bool:
    """Make BrainID's requirements importable; True when everything is there afterwards."""
    need = missing(find_spec)
    if need["shipped"]:
        explain(f"Slicer's own {', '.join(need['shipped'])} cannot be imported; this Slicer installation "
                "is damaged. Reinstall Slicer (BrainID never replaces packages Slicer ships).")
        return False
    if need["torch"]:
        if torch_installer is None:
            explain(PYTORCH_EXTENSION_HELP)
            return False
        if not confirm("BrainID needs PyTorch, which is not installed yet. Install it now with the PyTorch "
                       "extension? This downloads up to a few GB and can take several minutes."):
            explain("PyTorch was not installed; BrainID cannot run without it.")
            return False
        if torch_installer() is None and not _has("torch", find_spec):
            explain("PyTorch installation did not complete; see the Python console for details.")
            return False
    packages = [p for p in need["packages"] if p.split(">")[0].split("=")[0] not in SLICER_SHIPPED]
    if packages:
        if not confirm(f"BrainID needs these Python packages: {', '.join(packages)}. Install them now?"):
            explain(f"Not installed: {', '.join(packages)}; BrainID cannot run without them.")
            return False
        pip_install(" ".join(packages))
        importlib.invalidate_caches()
    still = missing(find_spec)
    if still["torch"] or still["packages"]:
        explain("Some requirements are still missing after installation: "
                + ", ".join((["torch"] if still["torch"] else []) + still["packages"])
                + ". Restart Slicer and try again.")
        return False
    return True
