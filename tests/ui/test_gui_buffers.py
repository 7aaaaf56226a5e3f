"""Chart storage: the double-written ring, history chunks, gaps for invalid readings and lost connections."""

from __future__ import annotations

import numpy as np
import pytest
from labctl.clients.gui.buffers import History, Ring, Trace, clean


def test_gui_ring_views_are_contiguous_and_keep_the_newest():
    ring = Ring(4)
    for i in range(6):
        ring.append(float(i), 10.0 * i, True)
    assert len(ring) == 4 and ring.overwritten == 2
    assert ring.times().tolist() == [2.0, 3.0, 4.0, 5.0]
    assert ring.values().tolist() == [20.0, 30.0, 40.0, 50.0]
    assert ring.times().base is not None  # a view into the ring, not a copy
    assert ring.first() == (2.0, 20.0, True) and ring.last() == (5.0, 50.0, True)
    with pytest.raises(ValueError, match="at least 2"):
        Ring(1)


def test_gui_trace_breaks_lines_at_invalid_readings_and_keeps_arrays_finite():
    tr = Trace("X", capacity=8)
    for t, v in [(1.0, 1.0), (2.0, 2.0), (3.0, None), (4.0, 4.0), (5.0, 5.0)]:
        tr.append(t, v)
    t, y, conn = tr.live()
    assert t.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert np.isfinite(y).all() and y[2] == 2.0  # the invalid point holds the last value (hidden: not connected)
    assert conn.tolist()[:4] == [True, False, False, True]


def test_gui_trace_marks_a_gap_after_a_lost_connection_and_drops_repeats():
    tr = Trace("X", capacity=8)
    tr.append(1.0, 1.0)
    tr.append(2.0, 2.0)
    assert not tr.append(2.0, 2.0)  # the same reading again (a monitor's first value after reconnecting)
    tr.mark_gap()
    tr.append(10.0, 3.0)
    tr.append(9.0, 4.0)  # out of order: clamped, times stay non-decreasing
    t, _, conn = tr.live()
    assert t.tolist() == [1.0, 2.0, 10.0, 10.0]
    assert conn.tolist()[:3] == [True, False, True]


def test_gui_trace_keeps_connect_flags_across_the_ring_wrapping():
    tr = Trace("X", capacity=3)
    for i in range(7):
        tr.append(float(i), None if i == 5 else float(i))
    t, _, conn = tr.live()
    assert t.tolist() == [4.0, 5.0, 6.0]
    assert conn.tolist()[:2] == [False, False]


def test_gui_history_chunks_merge_in_time_order_and_join_only_when_adjacent():
    h = History()
    h.add(100.0, 200.0, np.array([150.0, 120.0]), np.array([2.0, 1.0]))  # unsorted answer
    h.add(0.0, 100.0, np.array([10.0, 90.0]), np.array([0.5, 0.9]))  # older, adjacent
    h.add(300.0, 400.0, np.array([310.0]), np.array([3.0]))  # after a gap
    assert h.times.tolist() == [10.0, 90.0, 120.0, 150.0, 310.0]
    assert h.connect.tolist() == [True, True, True, False, False]
    assert h.since == 0.0


def test_gui_history_values_none_or_nan_are_gaps():
    t, y, ok = clean(np.array([1.0, 2.0, 3.0]), np.array([1.0, np.nan, 3.0]))
    assert ok.tolist() == [True, False, True] and y.tolist() == [1.0, 1.0, 3.0]


def test_gui_trace_joins_history_to_the_first_live_point():
    tr = Trace("X", capacity=8)
    tr.append(100.0, 5.0)
    tr.history.add(0.0, 100.0, np.array([10.0, 50.0]), np.array([1.0, 2.0]))
    t, y, conn = tr.past()
    assert t.tolist() == [10.0, 50.0, 100.0] and y.tolist() == [1.0, 2.0, 5.0]
    assert conn.tolist() == [True, True, False]
    all_t, all_y = tr.points()
    assert all_t.tolist() == [10.0, 50.0, 100.0, 100.0]


def test_gui_history_that_overlaps_live_ends_at_the_first_live_point():
    """The archive may hold what the monitor delivered, its time rounded to the microsecond past the live one."""
    tr = Trace("X", capacity=8)
    t3 = 1_796_603_810.1234566
    tr.append(t3, 12.0)  # the monitor's first value
    tr.append(t3 + 1.0, 20.0)
    tr.history.add(t3 - 10.0, t3 + 0.5, np.array([t3 - 2.0, t3 - 1.0, 1_796_603_810.123457]), np.array([10.0, 11.0, 12.0]))
    times, values = tr.points()
    assert (np.diff(times) >= 0).all()
    assert values.tolist() == [10.0, 11.0, 12.0, 12.0, 20.0]  # history up to the first live point, joined to it
    assert times[2] == times[3] == t3
