"""The BrainID Slicer module's parts (logics, GUI panel, views, child-process engine).

Importing the package makes BrainIDLib importable once: installed, it lies beside the module
(on Slicer's sys.path already); in a checkout it is one folder up.
"""

import sys
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent.parent  # .../BrainID (holds BrainID.py)


def library_root() -> Path:
    """The folder that holds BrainIDLib: beside the module when installed, the checkout root in dev."""
    for candidate in (MODULE_DIR, MODULE_DIR.parent):
        if (candidate / "BrainIDLib" / "__init__.py").is_file():
            return candidate
    return MODULE_DIR


if str(library_root()) not in sys.path:
    sys.path.insert(0, str(library_root()))
