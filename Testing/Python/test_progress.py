"""Progress and its spans: monotonic fractions mapped into the parent's range, cancellation."""

import pytest

from BrainIDLib.errors import Cancelled
from BrainIDLib.progress import Progress, Span


def test_spans_map_their_own_fraction_into_the_parent_and_never_go_back():
    seen = []
    prog = Progress(lambda f, msg: seen.append((round(f, 3), msg)))
    Span(Span(prog, 0.5, 1.0), 0.0, 0.5)(0.5, "inner")  # 0.5 + 0.5 * (0.5 * 0.5)
    prog(0.2, "late report")  # a stage that reports less than already shown does not move the bar back
    assert seen == [(0.625, "inner"), (0.625, "late report")]


def test_cancel_stops_at_the_next_report_or_check():
    stop = []
    span = Span(Progress(None, cancel=lambda: bool(stop)), 0.0, 1.0)
    span(0.1)
    stop.append(1)
    with pytest.raises(Cancelled):
        span.check()
