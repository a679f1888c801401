"""Progress over a long call: one monotonic fraction for the caller, cancellation checked on the way.

A call makes one `Progress` from the caller's callbacks and hands each stage a `Span` of it, so a
stage reports its own 0..1 and never needs to know where it sits in the whole. Pure Python.
"""

from __future__ import annotations

from typing import Callable

from .errors import Cancelled


class Progress:
    """Monotonic progress in [0, 1]: `callback(fraction, message)`, and `cancel()` -> True stops the run."""

    def __init__(self, callback: Callable | None = None, cancel: Callable | None = None):
        self.callback, self.cancel, self.last = callback, cancel, 0.0

    def __call__(self, fraction: float, message: str = "") -> None:
        self.check()
        self.last = max(self.last, min(1.0, float(fraction)))
        if self.callback is not None:
            self.callback(self.last, message)

    def check(self) -> None:
        """Raise Cancelled when the caller asked to stop."""
        if self.cancel is not None and self.cancel():
            raise Cancelled("cancelled by the user")


class Span:
    """The part [start, stop] of a parent progress, reported as its own 0..1."""

    def __init__(self, parent: Progress | Span, start: float, stop: float):
        self.parent, self.start, self.stop = parent, start, stop

    def __call__(self, fraction: float, message: str = "") -> None:
        self.parent(self.start + (self.stop - self.start) * fraction, message)

    def check(self) -> None:
        self.parent.check()
