"""Run BrainID commands in a separate process, non-blocking, with progress and a real cancel.

Front ends (the Slicer widget polls with a QTimer) start a `ProcessRunner` on one or more command
lines, call `poll()` now and then, and read `.fraction`, `.message`, `.log`, `.state`. Each command
prints `PROGRESS <fraction> <message>` lines (`brainid ... --progress-format machine`); other lines
go to the log. Progress of a sequence is spread evenly over its commands.

`OUTPUT <kind> <path>` lines fill `.outputs`; `INFO <text>` lines update the message.

`cancel()` kills the whole process tree: the child is started in its own session/process group on
POSIX (`os.killpg`), and with `taskkill /T /F` on Windows, so torch worker threads or processes
it started never outlive it.

No Qt, no Slicer: testable anywhere.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PROGRESS_RE = re.compile(r"^PROGRESS\s+([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*(.*)$")
ERROR_PREFIXES = ("error:", "brainid: error:", "ERROR ")

IDLE, RUNNING, SUCCEEDED, FAILED, CANCELLED = "idle", "running", "succeeded", "failed", "cancelled"


def python_executable() -> str:
    """A Python interpreter that can run `-m BrainIDLib.cli`.

    Inside Slicer `sys.executable` is the Slicer application (or already PythonSlicer); the
    interpreter to launch is PythonSlicer, found beside it (bin/PythonSlicer[.exe]).
    """
    slicer_module = sys.modules.get("slicer")
    if slicer_module is not None and getattr(slicer_module, "app", None) is not None:
        found = shutil.which("PythonSlicer")  # Slicer puts it on PATH
        if found:
            return found
    exe = Path(sys.executable)
    name = exe.name.lower()
    if name.startswith("pythonslicer") or name.startswith("python"):
        return str(exe)
    candidates = [exe.parent / "PythonSlicer", exe.parent / "PythonSlicer.exe",
                  exe.parent / "bin" / "PythonSlicer", exe.parent / "bin" / "PythonSlicer.exe"]
    for c in candidates:
        if c.is_file():
            return str(c)
    return str(exe)


def parse_line(line: str) -> tuple[float, str] | None:
    """(fraction, message) for a `PROGRESS 0.42 message` line, else None."""
    m = PROGRESS_RE.match(line.strip())
    if not m:
        return None
    return min(max(float(m.group(1)), 0.0), 1.0), m.group(2).strip()


def kill_tree(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Terminate a process started by `ProcessRunner` and everything it started."""
    if proc.poll() is not None:
        return
    if os.name == "nt":
        subprocess.run(["taskkill", "/PID", str(proc.pid), "/T", "/F"], capture_output=True)
    else:
        try:
            pgid = os.getpgid(proc.pid)
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass


class ProcessRunner:
    """One or more commands run one after the other in child processes."""

    def __init__(self, commands: list[list[str]], env: dict | None = None, cwd: str | None = None):
        if commands and isinstance(commands[0], str):
            commands = [commands]  # a single command line
        self.commands = [list(map(str, c)) for c in commands]
        self.env = env
        self.cwd = cwd
        self.state = IDLE
        self.fraction = 0.0
        self.message = ""
        self.log: list[str] = []
        self.outputs: dict[str, str] = {}  # from `OUTPUT <kind> <path>` lines
        self.notices: list[str] = []  # out-of-memory fallbacks reported by the engine
        self.error: str | None = None
        self.returncode: int | None = None
        self._index = -1
        self._proc: subprocess.Popen | None = None
        self._lines: queue.Queue = queue.Queue()
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()

    # -------------------------------------------------------------- control
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    def start(self) -> "ProcessRunner":
        if self.state == RUNNING:
            raise RuntimeError("already running")
        self.state = RUNNING
        self._start_next()
        return self

    def _start_next(self) -> None:
        self._index += 1
        cmd = self.commands[self._index]
        kwargs = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                      text=True, bufsize=1, env=self._child_env(), cwd=self.cwd)
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        self.log.append("$ " + " ".join(cmd))
        try:
            self._proc = subprocess.Popen(cmd, **kwargs)
        except OSError as e:
            self._finish(FAILED, f"could not start {cmd[0]}: {e}")
            return
        self._reader = threading.Thread(target=self._read, args=(self._proc, self._lines), daemon=True)
        self._reader.start()

    def _child_env(self) -> dict:
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    @staticmethod
    def _read(proc: subprocess.Popen, lines: queue.Queue) -> None:
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        proc.stdout.close()
        lines.put(None)  # end of this process's output

    def cancel(self) -> None:
        """Stop now: kill the running process tree; later commands are not started."""
        if self.state != RUNNING:
            return
        if self._proc is not None:
            kill_tree(self._proc)
        self._drain()
        self._finish(CANCELLED, "cancelled")

    # -------------------------------------------------------------- polling
    def _drain(self) -> bool:
        """Consume queued output; True when the current process's output has ended."""
        ended = False
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return ended
            if line is None:
                ended = True
                continue
            self._handle(line)

    def _handle(self, line: str) -> None:
        parsed = parse_line(line)
        n = max(len(self.commands), 1)
        if parsed is not None:
            frac, msg = parsed
            self.fraction = (self._index + frac) / n
            if msg:
                self.message = msg
            return
        if line.startswith("OUTPUT "):
            parts = line.split(" ", 2)
            if len(parts) == 3:
                self.outputs[parts[1]] = parts[2].strip()
        elif line.startswith("INFO "):
            self.message = line[5:].strip()
        if "out of memory" in line.lower():  # the engine's fallback notices (tiled / CPU), INFO or warning
            notice = line[5:] if line.startswith("INFO ") else line.split("RuntimeWarning:")[-1]
            notice = notice.strip().removeprefix("brainid: note:").strip()  # the CLI prints warnings as notes
            self.message = notice
            if notice not in self.notices:
                self.notices.append(notice)
        self.log.append(line)
        if line.strip().lower().startswith(ERROR_PREFIXES):
            self.error = line.strip()

    def poll(self) -> str:
        """Advance: read output, notice exits, start the next command. Returns the state."""
        with self._lock:
            if self.state != RUNNING:
                return self.state
            ended = self._drain()
            if self._proc is not None and self._proc.poll() is not None and (ended or not self._reader.is_alive()):
                self._reader.join(timeout=1.0)
                self._drain()
                self.returncode = self._proc.returncode
                if self.returncode != 0:
                    tail = self.error or next((ln for ln in reversed(self.log) if ln.strip()), "")
                    self._finish(FAILED, tail or f"exited with status {self.returncode}")
                elif self._index + 1 < len(self.commands):
                    self._start_next()
                else:
                    self.fraction = 1.0
                    self._finish(SUCCEEDED, self.message or "done")
            return self.state

    def _finish(self, state: str, message: str) -> None:
        self.state = state
        if state != SUCCEEDED:
            self.error = self.error or message
        self.message = message

    def wait(self, timeout: float | None = None, interval: float = 0.05, on_poll=None) -> str:
        """Block until finished (for scripts and tests); `on_poll(runner)` after every poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() == RUNNING:
            if on_poll is not None:
                on_poll(self)
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                break
            time.sleep(interval)
        return self.state
