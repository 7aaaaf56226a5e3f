"""HistoryRead over OPC UA, served from the historian: raw (paged, bounded, both directions) and processed.

A real server (core, historian on SQLite, OPC UA) with a real asyncua client over loopback,
and node-opcua as the independent client (``tests/node/history.js``).
Values are posted with synthetic timestamps a little in the future, so the baselines the
historian records at start never fall into the ranges read.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from asyncua import Client, ua
from labctl.ioc.types import Reading, Severity, Status
from labctl.server.app import Server
from labctl.server.opcua.history import CALCULATED, INFO_DATAVALUE, PARTIAL
from labctl.server.opcua.values import HISTORY_READ, status_code
from labctl.server.site import parse_site

from tests.historian.support import future_minute

from .conftest import NAMESPACE, SITE, pv_node, site_text
from .test_node_opcua import NODE_DIR, Interop, _node

_S = ua.StatusCodes
_O = ua.ObjectIds


def utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.UTC)


def seconds(d: dt.datetime) -> float:
    return d.timestamp()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    """The default test site with the historian on (SQLite under the state directory)."""
    text = site_text(tmp_path / "state").replace("historian: {enabled: false}", "historian: {batch_age_s: 0.05}")
    srv = Server(parse_site(text, "history-site.yaml"))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def series(server: Server) -> float:
    """LAB:FLOW = 0, 1, ... 119 at one value per second from a minute boundary t0; returns t0."""
    t0 = future_minute()
    for i in range(120):
        server.db.post("LAB:FLOW", float(i), t0 + i)
    assert await server.service("historian").flush()
    return t0


def raw_details(start: float | None, end: float | None, n: int = 0, bounds: bool = False) -> ua.ReadRawModifiedDetails:
    d = ua.ReadRawModifiedDetails()
    d.IsReadModified = False
    d.StartTime = utc(start) if start is not None else ua.get_win_epoch()
    d.EndTime = utc(end) if end is not None else ua.get_win_epoch()
    d.NumValuesPerNode = n
    d.ReturnBounds = bounds
    return d


async def history_read(client: Client, details, nodeids, continuation: bytes | None = None, *, release: bool = False,
                       timestamps=ua.TimestampsToReturn.Source) -> list[ua.HistoryReadResult]:  # fmt: skip
    params = ua.HistoryReadParameters()
    params.HistoryReadDetails = details
    params.TimestampsToReturn = timestamps
    params.ReleaseContinuationPoints = release
    for nid in nodeids:
        item = ua.HistoryReadValueId()
        item.NodeId = nid
        item.ContinuationPoint = continuation
        params.NodesToRead.append(item)
    return await client.uaclient.history_read(params)


async def read_all(client: Client, nid: ua.NodeId, details) -> tuple[list[ua.DataValue], int]:
    """Every value of a paged read, and the number of responses it took."""
    values, cont, pages = [], None, 0
    while True:
        (result,) = await history_read(client, details, [nid], cont)
        assert result.StatusCode.is_good(), result.StatusCode
        values += result.HistoryData.DataValues
        pages += 1
        cont = result.ContinuationPoint
        if not cont:
            return values, pages


def processed_details(start: float, end: float, interval_s: float, aggregates: list[int]) -> ua.ReadProcessedDetails:
    d = ua.ReadProcessedDetails()
    d.StartTime, d.EndTime = utc(start), utc(end)
    d.ProcessingInterval = interval_s * 1000.0
    d.AggregateType = [ua.NodeId(a) for a in aggregates]
    d.AggregateConfiguration = ua.AggregateConfiguration(UseServerCapabilitiesDefaults=True)
    return d


async def test_pvs_are_historizing_with_the_history_read_bit(server, connect):
    client = await connect("operator")
    node = await pv_node(client, "LAB:TEMP")
    assert (await node.read_attribute(ua.AttributeIds.Historizing)).Value.Value is True
    assert (await node.read_attribute(ua.AttributeIds.AccessLevel)).Value.Value & HISTORY_READ
    assert (await node.read_attribute(ua.AttributeIds.UserAccessLevel)).Value.Value & HISTORY_READ
    caps = client.get_node(ua.NodeId(_O.HistoryServerCapabilities_AccessHistoryDataCapability))
    assert await caps.read_value() is True
    folder = client.get_node(ua.NodeId(_O.HistoryServerCapabilities_AggregateFunctions))
    names = {(await c.read_browse_name()).Name for c in await folder.get_children()}
    assert {"Average", "Minimum", "Maximum", "Count", "Start", "End"} <= names


async def test_raw_read_returns_the_archived_values_in_order_with_source_timestamps(server, connect, series):
    t0 = series
    client = await connect()  # anonymous: reading history needs no more than reading values
    node = await pv_node(client, "LAB:FLOW")
    values = await node.read_raw_history(utc(t0), utc(t0 + 120), return_bounds=False)
    assert [v.Value.Value for v in values] == [float(i) for i in range(120)]
    assert [seconds(v.SourceTimestamp) for v in values] == [t0 + i for i in range(120)]
    assert all(v.StatusCode.is_good() for v in values)
    # the end time is excluded, the start time included
    inner = await node.read_raw_history(utc(t0 + 10), utc(t0 + 20), return_bounds=False)
    assert [v.Value.Value for v in inner] == [float(i) for i in range(10, 20)]


async def test_raw_read_pages_with_continuation_points(server, connect, series):
    t0 = series
    client = await connect()
    nid = (await pv_node(client, "LAB:FLOW")).nodeid
    values, pages = await read_all(client, nid, raw_details(t0, t0 + 120, n=7))
    assert [v.Value.Value for v in values] == [float(i) for i in range(120)], "each value once, in order"
    assert pages == 18
    # backward: StartTime after EndTime reads (End, Start] newest first
    values, _ = await read_all(client, nid, raw_details(t0 + 119, t0 + 99, n=6))
    assert [v.Value.Value for v in values] == [float(i) for i in range(119, 99, -1)]


async def test_a_continuation_point_belongs_to_its_request_and_can_be_released(server, connect, series):
    t0 = series
    client = await connect()
    nid = (await pv_node(client, "LAB:FLOW")).nodeid
    (first,) = await history_read(client, raw_details(t0, t0 + 120, n=5), [nid])
    assert first.ContinuationPoint
    (other,) = await history_read(client, raw_details(t0, t0 + 60, n=5), [nid], first.ContinuationPoint)
    assert other.StatusCode.value == _S.BadContinuationPointInvalid
    (forged,) = await history_read(client, raw_details(t0, t0 + 120, n=5), [nid], b"not ours")
    assert forged.StatusCode.value == _S.BadContinuationPointInvalid
    (released,) = await history_read(client, raw_details(t0, t0 + 120, n=5), [nid], first.ContinuationPoint, release=True)
    assert released.StatusCode.is_good() and not released.ContinuationPoint


async def test_one_sided_reads_take_num_values_per_node(server, connect, series):
    t0 = series
    client = await connect()
    nid = (await pv_node(client, "LAB:FLOW")).nodeid
    (fwd,) = await history_read(client, raw_details(t0 + 50, None, n=3), [nid])
    assert [v.Value.Value for v in fwd.HistoryData.DataValues] == [50.0, 51.0, 52.0]
    assert not fwd.ContinuationPoint
    (back,) = await history_read(client, raw_details(None, t0 + 50, n=3), [nid])
    assert [v.Value.Value for v in back.HistoryData.DataValues] == [50.0, 49.0, 48.0]
    (neither,) = await history_read(client, raw_details(t0 + 50, None, n=0), [nid])
    assert neither.StatusCode.value == _S.BadInvalidTimestampArgument


async def test_return_bounds(server, connect, series):
    t0 = series
    client = await connect()
    node = await pv_node(client, "LAB:FLOW")
    values = await node.read_raw_history(utc(t0 + 10.5), utc(t0 + 20.5), return_bounds=True)
    assert [v.Value.Value for v in values] == [float(i) for i in range(10, 22)]  # the bounds 10 and 21 around 11..20
    exact = await node.read_raw_history(utc(t0 + 10), utc(t0 + 20), return_bounds=True)
    assert [v.Value.Value for v in exact] == [float(i) for i in range(10, 21)]  # 10 is its own bound; 20 bounds the end
    (past_end,) = await history_read(client, raw_details(t0 + 119.5, t0 + 500, bounds=True), [node.nodeid])
    values = past_end.HistoryData.DataValues
    assert [v.Value.Value for v in values[:1]] == [119.0]
    assert values[-1].StatusCode.value == _S.BadBoundNotFound and seconds(values[-1].SourceTimestamp) == t0 + 500


async def test_raw_statuses_follow_the_live_quality_mapping(server, connect):
    t0 = future_minute()
    db = server.db
    db.post("LAB:TEMP", 50.0, t0)
    db.post("LAB:TEMP", 150.0, t0 + 1)  # MINOR HIGH
    db.post("LAB:TEMP", 250.0, t0 + 2)  # MAJOR HIHI
    db.invalidate(["LAB:TEMP"], Status.COMM, t0 + 3)
    db.post("LAB:TEMP", 20.0, t0 + 4)
    assert await server.service("historian").flush()
    client = await connect()
    node = await pv_node(client, "LAB:TEMP")
    values = await node.read_raw_history(utc(t0), utc(t0 + 5), return_bounds=False)
    expected = [
        Reading(50.0, t0),
        Reading(150.0, t0 + 1, Severity.MINOR, Status.HIGH),
        Reading(250.0, t0 + 2, Severity.MAJOR, Status.HIHI),
        Reading(250.0, t0 + 3, Severity.INVALID, Status.COMM),
        Reading(20.0, t0 + 4),
    ]
    assert [v.StatusCode.value for v in values] == [status_code(r).value for r in expected]
    assert [v.StatusCode.value for v in values[:3]] == [_S.Good] * 3, "an alarm is no quality problem"
    assert values[3].StatusCode.value == _S.BadCommunicationError and values[3].Value.Value is None
    assert [v.Value.Value for v in values] == [50.0, 150.0, 250.0, None, 20.0]
    # The AlarmState's history: the same samples' severity and status (100 x severity + status), Good.
    alarm = client.get_node(ua.NodeId("LAB:TEMP.AlarmState", node.nodeid.NamespaceIndex))
    states = await alarm.read_raw_history(utc(t0), utc(t0 + 5), return_bounds=False)
    assert [(v.Value.Value, v.StatusCode.value) for v in states] == [(0, 0), (104, 0), (203, 0), (309, 0), (0, 0)]
    assert [v.SourceTimestamp for v in states] == [v.SourceTimestamp for v in values]


async def test_processed_average_minimum_maximum_count(server, connect, series):
    t0 = series
    client = await connect()
    nid = (await pv_node(client, "LAB:FLOW")).nodeid
    aggregates = [_O.AggregateFunction_Average, _O.AggregateFunction_Minimum, _O.AggregateFunction_Maximum, _O.AggregateFunction_Count]
    results = await history_read(client, processed_details(t0, t0 + 120, 60, aggregates), [nid] * 4)
    values = [[dv.Value.Value for dv in r.HistoryData.DataValues] for r in results]
    assert values == [[29.5, 89.5], [0.0, 60.0], [59.0, 119.0], [60, 60]]
    for r in results:
        assert [seconds(dv.SourceTimestamp) for dv in r.HistoryData.DataValues] == [t0, t0 + 60]
    avg = results[0].HistoryData.DataValues[0].StatusCode.value
    assert avg & 0xFFFF0000 == _S.Good and avg & 0xFFFF == INFO_DATAVALUE | CALCULATED
    # 45 s intervals (not whole minutes: from raw rows), the last one cut short by the end
    (avg45,) = await history_read(client, processed_details(t0, t0 + 120, 45, [_O.AggregateFunction_Average]), [nid])
    dvs = avg45.HistoryData.DataValues
    assert [dv.Value.Value for dv in dvs] == [22.0, 67.0, 104.5]
    assert [bool(dv.StatusCode.value & PARTIAL) for dv in dvs] == [False, False, True]
    # an interval of 0 is the whole range
    (whole,) = await history_read(client, processed_details(t0, t0 + 120, 0, [_O.AggregateFunction_Count]), [nid])
    assert [dv.Value.Value for dv in whole.HistoryData.DataValues] == [120]


async def test_processed_edge_cases(server, connect, series):
    t0 = series
    client = await connect()
    nid = (await pv_node(client, "LAB:FLOW")).nodeid
    # an interval without data: no Average, a Count of 0
    empty = processed_details(t0 + 120, t0 + 180, 60, [_O.AggregateFunction_Average, _O.AggregateFunction_Count])
    avg, count = await history_read(client, empty, [nid, nid])
    assert avg.HistoryData.DataValues[0].StatusCode.value == _S.BadNoData
    assert count.HistoryData.DataValues[0].Value.Value == 0
    # backward: intervals from the start time back, newest first, stamped with their later time
    (back,) = await history_read(client, processed_details(t0 + 120, t0, 50, [_O.AggregateFunction_Maximum]), [nid])
    dvs = back.HistoryData.DataValues
    assert [dv.Value.Value for dv in dvs] == [119.0, 69.0, 19.0]
    assert [seconds(dv.SourceTimestamp) for dv in dvs] == [t0 + 120, t0 + 70, t0 + 20]
    # Start and End carry the time of their sample
    first, last = await history_read(
        client, processed_details(t0 + 0.5, t0 + 60.5, 60, [_O.AggregateFunction_Start, _O.AggregateFunction_End]), [nid, nid]
    )
    assert (first.HistoryData.DataValues[0].Value.Value, seconds(first.HistoryData.DataValues[0].SourceTimestamp)) == (1.0, t0 + 1)
    assert (last.HistoryData.DataValues[0].Value.Value, seconds(last.HistoryData.DataValues[0].SourceTimestamp)) == (60.0, t0 + 60)
    # refusals, each with its own status
    (unsupported,) = await history_read(client, processed_details(t0, t0 + 60, 60, [_O.AggregateFunction_Total]), [nid])
    assert unsupported.StatusCode.value == _S.BadAggregateNotSupported
    note = (await pv_node(client, "LAB:NOTE")).nodeid
    (text,) = await history_read(client, processed_details(t0, t0 + 60, 60, [_O.AggregateFunction_Average]), [note])
    assert text.StatusCode.value == _S.BadAggregateInvalidInputs
    mismatch = await history_read(client, processed_details(t0, t0 + 60, 60, [_O.AggregateFunction_Average]), [nid, nid])
    assert [r.StatusCode.value for r in mismatch] == [_S.BadAggregateListMismatch] * 2
    folder = ua.NodeId(f"/{SITE}", nid.NamespaceIndex)
    (not_a_pv,) = await history_read(client, raw_details(t0, t0 + 60), [folder])
    assert not_a_pv.StatusCode.value == _S.BadHistoryOperationUnsupported
    (unknown,) = await history_read(client, raw_details(t0, t0 + 60), [ua.NodeId("NO:SUCH:PV", nid.NamespaceIndex)])
    assert unknown.StatusCode.value == _S.BadNodeIdUnknown


async def test_processed_reads_page_by_intervals(server, connect, series):
    t0 = series
    storage = server.service("opcua")._iserver.history_manager.storage  # noqa: SLF001 -- the installed storage
    storage.max_intervals = 4
    client = await connect()
    nid = (await pv_node(client, "LAB:FLOW")).nodeid
    values, cont, pages = [], None, 0
    details = processed_details(t0, t0 + 120, 10, [_O.AggregateFunction_Average])
    while True:
        (r,) = await history_read(client, details, [nid], cont)
        values += [dv.Value.Value for dv in r.HistoryData.DataValues]
        pages += 1
        cont = r.ContinuationPoint
        if not cont:
            break
    assert values == [4.5 + 10 * k for k in range(12)]
    assert pages == 3
    backward = processed_details(t0 + 120, t0 + 5, 10, [_O.AggregateFunction_Count])
    counts, cont = [], None
    while True:
        (r,) = await history_read(client, backward, [nid], cont)
        counts += [dv.Value.Value for dv in r.HistoryData.DataValues]
        cont = r.ContinuationPoint
        if not cont:
            break
    assert counts == [10] * 11 + [5]


async def test_the_storage_also_serves_asyncuas_own_interface(server, series):
    """``read_node_history``: what asyncua's HistoryManager would call (both ends included)."""
    t0 = series
    storage = server.service("opcua")._iserver.history_manager.storage  # noqa: SLF001 -- the installed storage
    nid = server.service("opcua").nodes.pvs["LAB:FLOW"].nodeid
    values, cont = await storage.read_node_history(nid, utc(t0 + 10), utc(t0 + 12), 0)
    assert ([v.Value.Value for v in values], cont) == ([10.0, 11.0, 12.0], None)
    values, cont = await storage.read_node_history(nid, utc(t0 + 10), utc(t0 + 20), 4)
    assert ([v.Value.Value for v in values], cont) == ([10.0, 11.0, 12.0, 13.0], None)  # a count asked for: no more
    storage.max_values = 3
    try:
        values, cont = await storage.read_node_history(nid, utc(t0 + 10), utc(t0 + 20), 0)
        assert [v.Value.Value for v in values] == [10.0, 11.0, 12.0] and seconds(cont) == t0 + 13  # asyncua goes on from there
        values, _ = await storage.read_node_history(nid, ua.get_win_epoch(), utc(t0 + 20), 2)
        assert [v.Value.Value for v in values] == [20.0, 19.0]  # only an end: backward from it
    finally:
        storage.max_values = 10_000


async def test_modified_and_event_history_are_empty_or_refused(server, connect, series):
    t0 = series
    client = await connect()
    nid = (await pv_node(client, "LAB:FLOW")).nodeid
    modified = raw_details(t0, t0 + 10)
    modified.IsReadModified = True
    (r,) = await history_read(client, modified, [nid])
    assert r.StatusCode.value == _S.GoodNoData and not r.HistoryData.DataValues
    (neither,) = await history_read(client, raw_details(t0, t0 + 10), [nid], timestamps=ua.TimestampsToReturn.Neither)
    assert neither.StatusCode.value == _S.BadTimestampsToReturnInvalid


# ---- an independent client: node-opcua ------------------------------------------------------------


@pytest.mark.node
async def test_node_opcua_reads_raw_and_average_history(server, series):
    t0 = series
    config = {"url": server.service("opcua").url, "namespace": NAMESPACE, "pv": "LAB:FLOW", "start": _ms(t0),
              "end": _ms(t0 + 120), "pageSize": 25, "intervalMs": 60_000}  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        _node(), str(NODE_DIR / "history.js"), json.dumps(config), cwd=NODE_DIR,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    run = Interop(proc)
    try:
        await run.expect("connected")
        raw = await run.expect("raw")
        assert raw["status"] == "Good"
        assert raw["values"] == [float(i) for i in range(120)]
        assert raw["times"] == [_ms(t0 + i) for i in range(120)]
        assert set(raw["statuses"]) == {"Good"}
        paged = await run.expect("paged")
        assert paged["values"] == [float(i) for i in range(120)] and paged["pages"] == 5
        average = await run.expect("average")
        assert average["status"] == "Good"
        assert average["values"] == [29.5, 89.5]
        assert average["times"] == [_ms(t0), _ms(t0 + 60)]
        await run.expect("done")
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _ms(t: float) -> str:
    """JavaScript's Date.toISOString(): milliseconds and a Z."""
    return utc(t).isoformat(timespec="milliseconds").replace("+00:00", "Z")
