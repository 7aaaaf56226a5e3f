"""History carries the last value over the wire, on every backend: OPC UA HistoryRead, the library, ``labctl history``.

The issue's check, end to end: a PV that changed once, 30 minutes before "now" -- raw with
ReturnBounds returns that value, 1-minute buckets over the last 15 minutes all hold it
(TimeAverage2, StartBound), the library's DataFrame has no INVALID rows, and the command
prints the value in every bucket. "Now" is a minute boundary 40 minutes ahead of the wall
clock, so the baselines the historian records at start are older than everything read.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from asyncua import Client, ua
from labctl.clients.session import connect
from labctl.server.app import Server
from labctl.server.cli import main
from labctl.server.opcua.history import INFO_DATAVALUE
from labctl.server.site import parse_site

from tests.historian.support import future_minute
from tests.protocol.opcua.conftest import open_client, pv_node, site_text

_S = ua.StatusCodes
_O = ua.ObjectIds


def utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.UTC)


@pytest.fixture
async def server(tmp_path: Path, archive_url: str) -> AsyncIterator[Server]:
    text = site_text(tmp_path / "state").replace(
        "historian: {enabled: false}", f'historian: {{url: "{archive_url}", batch_age_s: 0.05}}'
    )
    srv = Server(parse_site(text, "held-site.yaml"))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def now(server: Server) -> float:
    """LAB:FLOW changed once, to 3.25, 30 minutes before the returned "now"."""
    now = future_minute(40)
    server.db.post("LAB:FLOW", 3.25, now - 1800)
    assert await server.service("historian").flush()
    return now


@pytest.fixture
async def client(server: Server) -> AsyncIterator[Client]:
    c = await open_client(server.service("opcua").url)
    try:
        yield c
    finally:
        await c.disconnect()


async def history_read(client: Client, details, nid: ua.NodeId, n: int = 1) -> list[ua.HistoryReadResult]:
    params = ua.HistoryReadParameters()
    params.HistoryReadDetails = details
    params.TimestampsToReturn = ua.TimestampsToReturn.Source
    params.ReleaseContinuationPoints = False
    for _ in range(n):
        item = ua.HistoryReadValueId()
        item.NodeId = nid
        params.NodesToRead.append(item)
    return await client.uaclient.history_read(params)


async def test_opcua_raw_with_bounds_and_held_aggregates(client, now):
    nid = (await pv_node(client, "LAB:FLOW")).nodeid
    d = ua.ReadRawModifiedDetails()
    d.IsReadModified, d.StartTime, d.EndTime, d.NumValuesPerNode, d.ReturnBounds = False, utc(now - 900), utc(now), 0, True
    (result,) = await history_read(client, d, nid)
    assert result.StatusCode.is_good(), result.StatusCode
    values = result.HistoryData.DataValues
    # the start bound is the value set 30 minutes ago, with its own time; no value after it, so no end bound
    assert [(v.Value.Value, v.SourceTimestamp.timestamp(), v.StatusCode.value) for v in values] == [
        (3.25, now - 1800, _S.Good),
        (None, now, _S.BadBoundNotFound),
    ]
    d.ReturnBounds = False
    (result,) = await history_read(client, d, nid)
    assert result.HistoryData.DataValues == [] and result.StatusCode.value == _S.GoodNoData

    p = ua.ReadProcessedDetails()
    p.StartTime, p.EndTime, p.ProcessingInterval = utc(now - 900), utc(now), 60_000.0
    held = [_O.AggregateFunction_TimeAverage2, _O.AggregateFunction_TimeAverage, _O.AggregateFunction_StartBound,
            _O.AggregateFunction_Interpolative]  # fmt: skip
    p.AggregateType = [ua.NodeId(a) for a in (*held, _O.AggregateFunction_Average, _O.AggregateFunction_Count)]
    p.AggregateConfiguration = ua.AggregateConfiguration(UseServerCapabilitiesDefaults=True)
    results = await history_read(client, p, nid, n=6)
    for result in results[:4]:
        dvs = result.HistoryData.DataValues
        assert [v.Value.Value for v in dvs] == [3.25] * 15
        assert all(v.StatusCode.is_good() for v in dvs)
        assert [v.SourceTimestamp.timestamp() for v in dvs] == [now - 900 + 60 * k for k in range(15)]
    assert results[2].HistoryData.DataValues[0].StatusCode.value == _S.Good | INFO_DATAVALUE | 0x2  # Interpolated
    # Average keeps its Part 13 meaning: the raw values inside the interval -- none here
    assert {v.StatusCode.value for v in results[4].HistoryData.DataValues} == {_S.BadNoData}
    assert [v.Value.Value for v in results[5].HistoryData.DataValues] == [0] * 15


async def test_library_and_command_hold_the_value(server, now):
    url = server.service("opcua").url
    async with await connect(url) as s:
        raw = await s.history("LAB:FLOW", now - 900, now)
        assert (raw.values.tolist(), raw.times.tolist()) == ([3.25], [now - 1800])
        assert len(await s.history("LAB:FLOW", now - 900, now, bounds=False)) == 0
        frame = (await s.history("LAB:FLOW", now - 900, now, every=60)).to_dataframe()
    assert len(frame) == 15
    assert not (frame["severity"] == "INVALID").any()
    assert frame["mean"].tolist() == [3.25] * 15
    assert frame["min"].tolist() == frame["max"].tolist() == [3.25] * 15
    assert frame["count"].tolist() == [0] * 15

    iso = [utc(now - 900).isoformat(), utc(now).isoformat()]
    out = await asyncio.to_thread(_cli, url, ["history", "LAB:FLOW", "--since", iso[0], "--until", iso[1], "--every", "1m", "--json"])
    rows = json.loads(out)["rows"]
    assert [(r["mean"], r["severity"]) for r in rows] == [(3.25, "NO_ALARM")] * 15
    out = await asyncio.to_thread(_cli, url, ["history", "LAB:FLOW", "--since", iso[0], "--until", iso[1], "--json"])
    assert [r["value"] for r in json.loads(out)["rows"]] == [3.25]


def _cli(url: str, args: list[str]) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main([args[0], "--url", url, *args[1:]])
    assert code == 0
    return buf.getvalue()
