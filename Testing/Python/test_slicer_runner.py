"""The Slicer-free process runner the BrainID widget polls: progress parsing, failure, cancel."""

from __future__ import annotations

import os
import sys
import time

import pytest

from BrainIDLib import runner as rn

PY = sys.executable


def script(code: str) -> list[str]:
    return [PY, "-c", code]


def test_parse_progress_lines():
    assert rn.parse_line("PROGRESS 0.42 running tile 3/8") == (0.42, "running tile 3/8")
    assert rn.parse_line("PROGRESS 1") == (1.0, "")
    assert rn.parse_line("PROGRESS 1.5 over") == (1.0, "over")
    assert rn.parse_line("loading model") is None


def test_sequence_progress_and_log():
    a = script("print('PROGRESS 0.5 half', flush=True); print('hello')")
    b = script("print('PROGRESS 0.5 second half', flush=True)")
    seen = []
    r = rn.ProcessRunner([a, b]).start()
    assert r.wait(timeout=60, on_poll=lambda x: seen.append(x.fraction)) == rn.SUCCEEDED
    assert r.fraction == 1.0 and "hello" in r.log
    assert all(0.0 <= f <= 1.0 for f in seen) and seen == sorted(seen)


def test_failure_reports_the_error_line():
    r = rn.ProcessRunner(script("import sys; print('brainid: error: input.nii is constant'); sys.exit(2)")).start()
    assert r.wait(timeout=60) == rn.FAILED
    assert r.returncode == 2 and "constant" in r.error


def test_missing_program_fails_cleanly():
    r = rn.ProcessRunner([["/nonexistent/PythonSlicer", "-m", "BrainIDLib.cli"]]).start()
    assert r.state == rn.FAILED and "could not start" in r.error


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True


@pytest.mark.skipif(os.name == "nt", reason="POSIX process-group check")
def test_cancel_kills_the_whole_process_tree(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "print('PROGRESS 0.1 working', flush=True)\n"
        "time.sleep(600)\n"
    )
    second = tmp_path / "second-ran"
    r = rn.ProcessRunner([script(code), script(f"open({str(second)!r}, 'w')")]).start()
    deadline = time.monotonic() + 30
    while not pidfile.exists() or r.fraction == 0.0:
        r.poll()
        assert time.monotonic() < deadline, "child did not start"
        time.sleep(0.05)
    child, grandchild = r.pid, int(pidfile.read_text())
    assert _alive(child) and _alive(grandchild)
    t = time.monotonic()
    r.cancel()
    assert r.state == rn.CANCELLED and time.monotonic() - t < 10
    for _ in range(100):
        if not _alive(grandchild):
            break
        time.sleep(0.05)
    assert not _alive(child) and not _alive(grandchild)
    assert r.poll() == rn.CANCELLED and not second.exists()


def test_python_executable_outside_slicer_is_this_python():
    assert rn.python_executable() == sys.executable


def test_out_of_memory_fallback_notice_becomes_the_status():
    code = ("import sys; print('PROGRESS 0.2 network', flush=True); "
            "print('inference.py:300: RuntimeWarning: GPU out of memory; retrying tiled with 96x96x96 windows', "
            "file=sys.stderr, flush=True); "
            "print('INFO GPU out of memory; retrying tiled with 96x96x96 windows', flush=True)")
    r = rn.ProcessRunner(script(code)).start()
    assert r.wait(timeout=60) == rn.SUCCEEDED
    assert r.notices == ["GPU out of memory; retrying tiled with 96x96x96 windows"]


@pytest.mark.skipif(os.name == "nt", reason="POSIX executable bits")
def test_python_executable_inside_slicer_is_pythonslicer(tmp_path, monkeypatch):
    import types

    fake = tmp_path / "PythonSlicer"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setitem(sys.modules, "slicer", types.SimpleNamespace(app=object()))
    assert rn.python_executable() == str(fake)
    # Slicer's own executable (not a Python) without PythonSlicer on PATH: look beside it
    monkeypatch.setitem(sys.modules, "slicer", types.SimpleNamespace(app=None))
    app = tmp_path / "bin" / "SlicerApp-real"
    app.parent.mkdir()
    app.write_text("")
    (tmp_path / "bin" / "PythonSlicer").write_text("")
    monkeypatch.setattr(sys, "executable", str(app))
    assert rn.python_executable() == str(tmp_path / "bin" / "PythonSlicer")
