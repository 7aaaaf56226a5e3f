"""History carries the last value: raw reads with bounds and held buckets, on every backend.

A value holds until the PV's next sample. The issue's check: a PV that changed once, 30
minutes ago -- a raw read with bounds returns that value, 1-minute buckets over the last
15 minutes all hold it, and none is INVALID. Buckets are INVALID only where the PV was
INVALID or unknown; time-weighted means weigh each value by how long it held.
"""

from __future__ import annotations

import math
import time

from labctl.ioc.types import Reading, Severity, Status

from tests.historian.support import make_db


def _minute(offset_min: float) -> float:
    return (math.floor(time.time() / 60) + offset_min) * 60.0


async def test_a_value_set_30_minutes_ago_is_held_through_the_last_15(archive_url, start_historian):
    now = _minute(0)
    db = make_db(clock=lambda: now - 3600)  # start-up values (the baselines) an hour ago
    h = await start_historian(db, archive_url)
    db.post("CRYO:RAW", 7.5, now - 1800)
    assert await h.flush()

    page = await h.read_raw("CRYO:RAW", now - 900, now, bounds=True)
    assert page.readings == [Reading(7.5, now - 1800)]
    assert (await h.read_raw("CRYO:RAW", now - 900, now)).readings == []  # without bounds: nothing changed

    buckets = await h.read_processed("CRYO:RAW", now - 900, now, 60, held=True)
    assert len(buckets) == 15
    assert {(b.held, b.time_mean, b.valid_time, b.severity, b.status, b.held_time) for b in buckets} == {
        (7.5, 7.5, 60.0, Severity.NO_ALARM, Status.NO_ALARM, now - 1800)
    }
    assert all(b.count == 0 and b.mean is None for b in buckets)  # no sample inside: OPC UA's Average has none
    # the same without rollup cells
    slow = await h.read_processed_many(["CRYO:RAW"], now - 900, now, 60, use_rollups=False, held=True)
    assert slow["CRYO:RAW"] == buckets


async def test_buckets_are_invalid_only_where_the_pv_was(archive_url, start_historian):
    t0 = _minute(-30)
    db = make_db(clock=lambda: t0 - 3600)
    h = await start_historian(db, archive_url)
    db.post("CRYO:COUNT", 1, t0 + 30)  # 0 (the baseline) until t0+30, then 1
    db.post("CRYO:COUNT", 3, t0 + 90)
    db.invalidate(["CRYO:COUNT"], Status.COMM, t0 + 150)  # lost in the middle of the third minute
    db.post("CRYO:COUNT", 5, t0 + 240)  # back at the start of the fifth
    assert await h.flush()

    b = await h.read_processed("CRYO:COUNT", t0, t0 + 300, 60, held=True)
    assert [x.held for x in b] == [0.0, 1.0, 3.0, None, 5.0]
    assert [x.time_mean for x in b] == [0.5, 2.0, 3.0, None, 5.0]
    assert [x.valid_time for x in b] == [60.0, 60.0, 30.0, 0.0, 60.0]
    assert [(x.severity, x.status) for x in b] == [
        (Severity.NO_ALARM, Status.NO_ALARM),
        (Severity.NO_ALARM, Status.NO_ALARM),
        (Severity.NO_ALARM, Status.NO_ALARM),  # valid for half of it: not INVALID
        (Severity.INVALID, Status.COMM),
        (Severity.NO_ALARM, Status.NO_ALARM),
    ]
    assert [x.held_severity for x in b] == [Severity.NO_ALARM] * 3 + [Severity.INVALID, Severity.NO_ALARM]
    # the ordinary aggregates are unchanged: samples inside each bucket only
    assert [(x.count, x.mean) for x in b] == [(1, 1.0), (1, 3.0), (0, None), (0, None), (1, 5.0)]

    # before anything was archived the value is unknown: INVALID/UDF
    early = await h.read_processed("CRYO:COUNT", t0 - 7200, t0 - 7080, 60, held=True)
    assert [(x.held, x.time_mean, x.severity, x.status) for x in early] == [(None, None, Severity.INVALID, Status.UDF)] * 2

    # raw with bounds: the value in force first; a sample exactly at the start is its own bound
    assert (await h.read_raw("CRYO:COUNT", t0 + 100, t0 + 200, bounds=True)).readings == [
        Reading(3, t0 + 90),
        Reading(3, t0 + 150, Severity.INVALID, Status.COMM),
    ]
    assert [r.value for r in (await h.read_raw("CRYO:COUNT", t0 + 90, t0 + 100, bounds=True)).readings] == [3]
    # pages: the bound, then the body
    first = await h.read_raw("CRYO:COUNT", t0 + 60, t0 + 300, bounds=True, limit=1)
    assert first.readings == [Reading(1, t0 + 30)]
    rest = await h.read_raw("CRYO:COUNT", t0 + 60, t0 + 300, bounds=True, limit=10, continuation=first.continuation)
    assert [r.timestamp for r in rest.readings] == [t0 + 90, t0 + 150, t0 + 240]


async def test_a_pv_that_never_changes_has_history_from_start_up(archive_url, start_historian):
    t0 = _minute(-10)
    db = make_db(clock=lambda: t0)
    h = await start_historian(db, archive_url)
    assert await h.flush()
    assert (await h.read_raw("CRYO:NOTE", t0 + 60, t0 + 120, bounds=True)).readings == [Reading("", t0)]
    b = await h.read_processed("CRYO:VALVE", t0 + 60, t0 + 180, 60, held=True)
    assert [(x.held, x.severity) for x in b] == [(0.0, Severity.NO_ALARM)] * 2
