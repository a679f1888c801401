"""One launcher for every child-process job of the module (predict, download, correspondence,
few-shot): commands run with BrainIDLib.runner, so Slicer stays responsive and Cancel kills the
process tree. Each job carries its own completion callback, so whoever polls it never needs to
know what kind of job it is.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from BrainIDModuleLib import MODULE_DIR, library_root


@dataclass
class Job:
    """A running command sequence: `poll()` it, `cancel()` it, then `finish()` to import its results."""

    runner: object  # a BrainIDLib.runner.ProcessRunner (or a stand-in with the same attributes)
    onDone: Callable[["Job"], dict]  # reads the outputs into the scene; returns {name: node or object}
    workdir: Path
    ownWorkdir: bool = True

    def poll(self) -> str:
        return self.runner.poll()

    def cancel(self) -> None:
        self.runner.cancel()

    @property
    def state(self) -> str:
        return self.runner.state

    def finish(self) -> dict:
        """The job's results; BrainIDError for a failed or cancelled job. Temporary files go either way."""
        from BrainIDLib.errors import BrainIDError

        try:
            if self.state != "succeeded":
                raise BrainIDError(f"BrainID {self.state}: {self.runner.error or self.runner.message}")
            return self.onDone(self)
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        if self.ownWorkdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class JobLauncher:
    """Starts Python module commands in child processes. `runner_factory` and `python` are injectable
    (tests, or another interpreter)."""

    def __init__(self, runner_factory=None, python: str | None = None):
        self.runner_factory = runner_factory
        self.python = python

    def command(self, module: str, *args) -> list[str]:
        """`python -m module args...` with the interpreter that can run BrainID (PythonSlicer in Slicer)."""
        python = self.python
        if python is None:
            from BrainIDLib.runner import python_executable

            python = python_executable()
        return [python, "-m", module, *map(str, args)]

    @staticmethod
    def workdir(workdir=None) -> tuple[Path, bool]:
        """(folder for the job's files, whether the job owns it and removes it when finished)."""
        own = workdir is None
        path = Path(tempfile.mkdtemp(prefix="BrainID-")) if own else Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        return path, own

    @staticmethod
    def environment() -> dict:
        """The child's environment: BrainIDLib and BrainIDModuleLib importable."""
        env = dict(os.environ)
        paths = list(dict.fromkeys([str(library_root()), str(MODULE_DIR)]))
        env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        return env

    def start(self, commands: list[list[str]], onDone, workdir: Path | None = None, ownWorkdir: bool = False) -> Job:
        factory = self.runner_factory
        if factory is None:
            from BrainIDLib.runner import ProcessRunner as factory
        runner = factory(commands, env=self.environment())
        job = Job(runner, onDone, Path(workdir) if workdir else Path(tempfile.gettempdir()), ownWorkdir and bool(workdir))
        runner.start()
        return job


def cli_options(model=None, device="auto", featureCacheDir=None) -> list[str]:
    """Options shared by `brainid correspond` and `brainid fewshot`: machine-readable progress and the
    on-disk feature cache (default the CLI's $BRAINID_CACHE/features), so repeated runs skip the network."""
    out = ["--device", str(device), "--progress-format", "machine"]
    if featureCacheDir:
        out += ["--feature-cache", str(featureCacheDir)]
    if model:
        out += [f"--model={model}"]  # one argument: a value starting with "-" is not an option
    return out
