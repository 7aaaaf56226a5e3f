"""The spool on its own: segment files, order across reopening, the bound and its policy, quarantine."""

from __future__ import annotations

import logging
import math

from labctl.server.historian.spool import Batch, Spool


def batch(first: int, n: int, *, audits: int = 0, name: str = "PV:A") -> Batch:
    """``n`` float samples of one PV with values and microsecond times ``first..first+n-1``."""
    samples = [(name, 1_700_000_000_000_000 + i, 0, float(i), None, None, None, 0, 0, 1) for i in range(first, first + n)]
    audit_rows = [(f"{first:016x}{k:016x}", first, "write", "alice", "ca", "pc1", name, "1.0", "2.0", True, "") for k in range(audits)]
    return Batch(samples, [], audit_rows, {name: "float64"})


def values(spool: Spool) -> list[float]:
    out = []
    for seg in spool.oldest(10**9):
        out += [r[3] for r in spool.read(seg).samples]
    return out


def test_a_batch_survives_the_round_trip_through_a_segment(tmp_path):
    b = Batch(
        samples=[
            ("A", 1, 0, None, None, None, (1.0, math.inf, -0.0), 3, 9, 5),
            ("B", 2, 1, None, 2**62 + 1, None, None, 0, 0, 6),
            ("C", 3, 0, None, None, "hé ✓", None, 1, 4, 7),
        ],
        alarms=[("A", 1, 0, 3, 9)],
        audits=[("ab" * 16, 4, "write", "bob", "opcua", "h", "A", None, "[1.0]", False, "no")],
        types={"A": "float64[]", "B": "int", "C": "string"},
    )
    spool = Spool(tmp_path / "spool", 10**6)
    seg = spool.append(b)
    assert spool.read(seg) == b
    nan = Batch([("A", 1, 0, None, None, None, (math.nan,), 0, 0, 1)], types={"A": "float64[]"})
    assert math.isnan(spool.read(spool.append(nan)).samples[0][6][0])


def test_segments_keep_their_order_across_reopening_and_torn_writes_are_ignored(tmp_path):
    spool = Spool(tmp_path / "spool", 10**6)
    for k in range(3):
        spool.append(batch(k * 10, 10, audits=1))
    (tmp_path / "spool" / ".000000000004-10s-0e.json.tmp").write_bytes(b'{"format": "labctl-hist')  # a crash mid-write

    again = Spool(tmp_path / "spool", 10**6)
    assert (again.segments, again.samples, again.events) == (3, 30, 3)
    assert values(again) == [float(i) for i in range(30)]
    assert not list((tmp_path / "spool").glob("*.tmp"))
    again.remove(again.oldest(10))
    assert values(again) == [float(i) for i in range(10, 30)]
    seg = again.append(batch(30, 5))  # numbering continues after the newest segment
    assert seg.path.name.startswith("000000000004-5s-0e")
    assert values(Spool(tmp_path / "spool", 10**6)) == [float(i) for i in range(10, 35)]


def test_a_full_spool_drops_the_oldest_samples_keeps_events_and_says_so(tmp_path, caplog):
    one = len(batch(0, 100).encode())
    spool = Spool(tmp_path / "spool", int(one * 3.5))
    caplog.set_level(logging.WARNING, logger="labctl.server.historian.spool")
    spool.append(batch(0, 100))
    spool.append(batch(100, 100, audits=2))  # its audit records must outlive its samples
    for k in range(2, 8):
        spool.append(batch(k * 100, 100))

    assert spool.bytes <= spool.max_bytes
    kept = values(spool)
    assert kept == [float(i) for i in range(int(kept[0]), 800)]  # the newest, contiguous up to the last
    assert spool.dropped_samples == 800 - len(kept) > 0
    assert spool.events == 2 and spool.dropped_events == 0
    segments = spool.oldest(10**9)
    assert (segments[0].samples, segments[0].events) == (0, 2)  # the events kept their place in line
    assert [s.seq for s in segments] == sorted(s.seq for s in segments)
    assert [s.seq for s in Spool(tmp_path / "spool", spool.max_bytes).oldest(10**9)] == [s.seq for s in segments]
    full = [r for r in caplog.records if "is full" in r.getMessage()]
    assert len(full) == 1 and full[0].levelno == logging.WARNING  # once per filling, then a summary a minute
    assert "dropping the oldest spooled samples" in full[0].getMessage()
    assert "historian.spool_max_mb" in full[0].getMessage()

    caplog.clear()
    spool.remove(spool.oldest(10**9))
    assert spool.empty
    (drained,) = [r for r in caplog.records if "drained" in r.getMessage()]
    assert f"{spool.dropped_samples} samples were dropped" in drained.getMessage()


def test_events_are_dropped_only_when_nothing_else_is_left(tmp_path, caplog):
    one = len(batch(0, 0, audits=50).encode())
    spool = Spool(tmp_path / "spool", int(one * 2.5))
    caplog.set_level(logging.ERROR, logger="labctl.server.historian.spool")
    for k in range(4):
        spool.append(batch(k, 0, audits=50))
    assert spool.dropped_events == 100 and spool.events == 100
    assert any("full of alarm/audit events only" in r.getMessage() for r in caplog.records)


def test_a_refused_segment_is_quarantined_with_its_reason(tmp_path, caplog):
    spool = Spool(tmp_path / "spool", 10**6)
    seg = spool.append(batch(0, 3))
    caplog.set_level(logging.ERROR, logger="labctl.server.historian.spool")
    moved = spool.quarantine(seg, "IntegrityError: NOT NULL constraint failed")
    assert spool.empty and spool.rejected_segments == 1
    assert moved.parent.name == "rejected" and moved.exists()
    assert "NOT NULL" in moved.with_suffix(".reason").read_text()
    assert "moved to" in caplog.records[0].getMessage()
    assert Spool(tmp_path / "spool", 10**6).empty  # not replayed after a restart
