"""History in the client library (arrays, DataFrames), its blocking mirror, and ``labctl history``.

A real server with its historian (SQLite) and OPC UA; values are posted with synthetic
timestamps from a minute boundary a little in the future, so the baselines the historian
records at start stay out of the ranges read.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from labctl.clients import history as history_module
from labctl.clients import sync
from labctl.clients.errors import NoSuchPV
from labctl.clients.history import HistoryUnavailable
from labctl.clients.session import connect
from labctl.ioc.types import Severity, Status
from labctl.server.app import Server
from labctl.server.cli import main
from labctl.server.site import parse_site

from tests.historian.support import future_minute

from .conftest import PASSWORDS, site_text


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    """The bench site with its historian on."""
    text = site_text(tmp_path / "state").replace("historian: {enabled: false}", "historian: {batch_age_s: 0.05}")
    srv = Server(parse_site(text, "bench.yaml"))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def t0(server: Server) -> float:
    """B:TEMP = 0..119 (one a second from t0; 150 at t0+30: MINOR; INVALID at t0+40), B:MODE steps, B:NOTE texts."""
    t0 = future_minute()
    db = server.db
    for i in range(120):
        if i == 40:
            db.invalidate(["B:TEMP"], Status.COMM, t0 + i)
        else:
            db.post("B:TEMP", 150.0 if i == 30 else float(i), t0 + i)
    for i, state in enumerate(["LOW", "HIGH", "OFF"]):
        db.post("B:MODE", ["OFF", "LOW", "HIGH"].index(state), t0 + 10 * i)
    db.post("B:NOTE", "first", t0)
    db.post("B:NOTE", "second", t0 + 1)
    assert await server.service("historian").flush()
    return t0


@pytest.fixture
async def session(url):
    async with await connect(url) as s:  # anonymous: history needs no more than reading
        yield s


def expected_temps() -> list[float]:
    return [math.nan if i == 40 else 150.0 if i == 30 else float(i) for i in range(120)]


async def test_raw_history_as_arrays(session, t0):
    h = await session.history("B:TEMP", t0, t0 + 120)
    assert not h.processed and len(h) == 120
    assert h.times.dtype == np.float64 and h.values.dtype == np.float64
    np.testing.assert_array_equal(h.times, [t0 + i for i in range(120)])
    np.testing.assert_array_equal(h.values, expected_temps())  # NaN where INVALID
    assert Severity(h.severities[30]) is Severity.MINOR and Status(h.statuses[30]) is Status.HIGH
    assert Severity(h.severities[40]) is Severity.INVALID and Status(h.statuses[40]) is Status.COMM
    assert (h.severities[:30] == int(Severity.NO_ALARM)).all()
    # datetimes work as well as UNIX seconds; the end is excluded
    part = await session.history("B:TEMP", dt.datetime.fromtimestamp(t0 + 10, dt.UTC), dt.datetime.fromtimestamp(t0 + 13, dt.UTC))
    assert part.values.tolist() == [10.0, 11.0, 12.0]


async def test_raw_history_pages_through_continuation_points(session, t0, monkeypatch):
    monkeypatch.setattr(history_module, "PAGE_SIZE", 7)
    h = await session.history("B:TEMP", t0, t0 + 120)
    np.testing.assert_array_equal(h.values, expected_temps())


async def test_processed_history(session, t0):
    h = await session.history("B:TEMP", t0, t0 + 180, every=60)
    assert h.processed and h.every == 60
    np.testing.assert_array_equal(h.times, [t0, t0 + 60, t0 + 120])
    first = [150.0 if i == 30 else float(i) for i in range(60) if i != 40]
    second = [float(i) for i in range(60, 120)]
    assert h.values[0] == pytest.approx(sum(first) / 59) and h.values[1] == pytest.approx(sum(second) / 60)
    assert h.values[2] == 119.0  # no sample in the last bucket: the value in force holds
    assert h.counts.tolist() == [59, 60, 0]  # the INVALID sample does not count
    assert h.minimum.tolist() == [0.0, 60.0, 119.0] and h.maximum.tolist() == [150.0, 119.0, 119.0]
    assert [Severity(s) for s in h.severities] == [Severity.NO_ALARM] * 3
    # before anything was archived the value is unknown: INVALID/UDF
    early = await session.history("B:TEMP", t0 - 86_400 * 30, t0 - 86_400 * 30 + 120, every=60)
    assert [(Severity(a), Status(b)) for a, b in zip(early.severities, early.statuses, strict=True)] == [(Severity.INVALID, Status.UDF)] * 2
    assert np.isnan(early.values).all() and early.counts.tolist() == [0, 0]
    # a bucket in which the PV was INVALID throughout: INVALID with the reading's status
    lost = await session.history("B:TEMP", t0 + 40, t0 + 40.5, every=0.5)
    assert (Severity(lost.severities[0]), Status(lost.statuses[0])) == (Severity.INVALID, Status.COMM)


async def test_to_dataframe(session, t0):
    raw = (await session.history("B:TEMP", t0, t0 + 120)).to_dataframe()
    assert list(raw.columns) == ["value", "severity", "status"]
    assert str(raw.index.tz) == "UTC" and raw.index.name == "time"
    assert raw.index[0].timestamp() == t0
    assert raw["severity"].iloc[30] == "MINOR" and raw["status"].iloc[40] == "COMM"
    assert raw["value"].iloc[5] == 5.0 and math.isnan(raw["value"].iloc[40])
    buckets = (await session.history("B:TEMP", t0, t0 + 120, every=60)).to_dataframe()
    assert list(buckets.columns) == ["mean", "min", "max", "count", "severity", "status"]
    assert buckets["count"].tolist() == [59, 60]
    modes = (await session.history("B:MODE", t0, t0 + 30)).to_dataframe()
    assert modes["state"].tolist() == ["LOW", "HIGH", "OFF"]
    notes = await session.history("B:NOTE", t0, t0 + 2)
    assert notes.values.dtype == object and notes.values.tolist() == ["first", "second"]


async def test_history_errors(session, t0):
    with pytest.raises(NoSuchPV):
        await session.history("B:NOPE", t0, t0 + 1)
    with pytest.raises(ValueError, match="end after it starts"):
        await session.history("B:TEMP", t0 + 10, t0)
    with pytest.raises(ValueError, match="buckets need a number"):
        await session.history("B:NOTE", t0, t0 + 10, every=1)
    with pytest.raises(ValueError, match="positive"):
        await session.history("B:TEMP", t0, t0 + 10, every=0)
    assert issubclass(HistoryUnavailable, Exception)


async def test_sync_history(server, url, t0):
    def script():
        with sync.connect(url, "viewer", PASSWORDS["viewer"], timeout_s=10) as s:
            raw = s.history("B:TEMP", t0, t0 + 120)
            buckets = s.history("B:TEMP", t0, t0 + 120, every=30)
            return raw.values, buckets.counts

    values, counts = await asyncio.to_thread(script)
    np.testing.assert_array_equal(values, expected_temps())
    assert counts.tolist() == [30, 29, 30, 30]


# ---- labctl history --------------------------------------------------------------------------------------


@pytest.fixture
def labctl(url, monkeypatch, capsys):
    """``await labctl(*args)`` -> (exit status, stdout, stderr)."""
    for var in ("LABCTL_URL", "LABCTL_USER", "LABCTL_PASSWORD"):
        monkeypatch.delenv(var, raising=False)

    async def run(*args: str):
        code = await asyncio.to_thread(main, [args[0], "--url", url, *args[1:]])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat()


async def test_cli_history_formats(labctl, t0):
    code, out, err = await labctl("history", "B:TEMP", "--since", iso(t0), "--until", iso(t0 + 3), "--format", "csv")
    assert code == 0, err
    assert list(csv.reader(io.StringIO(out))) == [
        ["time", "value", "severity", "status"],
        *[[dt.datetime.fromtimestamp(t0 + i, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000000+00:00"), f"{float(i)}", "NO_ALARM", "NO_ALARM"] for i in range(3)],
    ]
    code, out, _ = await labctl("history", "B:TEMP", "--since", iso(t0 + 29), "--until", iso(t0 + 41), "--json")
    doc = json.loads(out)
    assert (doc["pv"], doc["unit"], doc["every"]) == ("B:TEMP", "K", None)
    assert [r["value"] for r in doc["rows"]][:2] == [29.0, 150.0] and doc["rows"][-1]["value"] is None
    assert (doc["rows"][1]["severity"], doc["rows"][-1]["status"]) == ("MINOR", "COMM")
    code, out, _ = await labctl("history", "B:TEMP", "--since", iso(t0), "--until", iso(t0 + 3))
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "VALUE", "[K]", "SEVERITY", "STATUS"]
    assert [line.split()[2] for line in lines[1:]] == ["0.000", "1.000", "2.000"]  # no precision declared: three decimals
    code, out, _ = await labctl("history", "B:MODE", "--since", iso(t0), "--until", iso(t0 + 30))
    assert [line.split()[2] for line in out.splitlines()[1:]] == ["LOW", "HIGH", "OFF"]
    code, out, _ = await labctl("history", "B:MODE", "--since", iso(t0), "--until", iso(t0 + 30), "--json")
    doc = json.loads(out, parse_constant=lambda name: pytest.fail(f"not strict JSON: {name}"))
    assert [r["state"] for r in doc["rows"]] == ["LOW", "HIGH", "OFF"]
    assert all(dt.datetime.fromisoformat(r["time"]).utcoffset() == dt.timedelta(0) for r in doc["rows"])


async def test_cli_history_buckets(labctl, t0):
    code, out, err = await labctl("history", "B:TEMP", "--since", iso(t0), "--until", iso(t0 + 120), "--every", "1m", "--format", "json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [(r["min"], r["max"], r["count"]) for r in rows] == [(0.0, 150.0, 59), (60.0, 119.0, 60)]
    code, out, _ = await labctl("history", "B:TEMP", "--since", iso(t0), "--until", iso(t0 + 120), "--every", "1m")
    assert out.splitlines()[0].split() == ["TIME", "MEAN", "[K]", "MIN", "MAX", "COUNT"]
    assert [line.split()[-1] for line in out.splitlines()[1:]] == ["59", "60"]


async def test_cli_history_relative_times_and_refusals(labctl, server, capsys):
    server.db.post("B:COUNT", 8)  # now: inside "the last hour"
    assert await server.service("historian").flush()
    code, out, err = await labctl("history", "B:COUNT", "--since", "1h", "--format", "json")
    assert code == 0, err
    assert [r["value"] for r in json.loads(out)["rows"]][-1] == 8
    with pytest.raises(SystemExit) as exit_:  # argparse refuses it before anything runs
        await labctl("history", "B:COUNT", "--since", "yesterday-ish")
    assert exit_.value.code == 2 and "expected a duration ago" in capsys.readouterr().err
    code, _, err = await labctl("history", "B:NOTE", "--since", "1h", "--every", "1m")
    assert code == 2 and "buckets need a number" in err
    code, _, err = await labctl("history", "B:NOPE", "--since", "1h")
    assert code == 1 and "no PV named 'B:NOPE'" in err
