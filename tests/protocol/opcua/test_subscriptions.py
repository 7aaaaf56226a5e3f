"""Subscriptions: every change that passes the monitor deadband reaches every client, from one database subscription."""

from __future__ import annotations

from asyncua import ua
from labctl.ioc.types import EventMask, Status

from tests.helpers import wait_for

from .conftest import pv_node


class Collector:
    """An asyncua subscription handler that keeps every data change per node."""

    def __init__(self) -> None:
        self.changes: dict[str, list[ua.DataValue]] = {}

    def datachange_notification(self, node, val, data) -> None:
        self.changes.setdefault(node.nodeid.Identifier, []).append(data.monitored_item.Value)

    def values(self, name: str) -> list:
        return [dv.Value.Value for dv in self.changes.get(name, [])]


async def subscribe(client, names, *, interval_ms: float = 20, queue: int = 100) -> tuple[Collector, object]:
    handler = Collector()
    sub = await client.create_subscription(interval_ms, handler)
    await sub.subscribe_data_change([await pv_node(client, n) for n in names], queuesize=queue)
    await wait_for(lambda: all(handler.changes.get(n) for n in names), what="initial values")
    return handler, sub


SERIES = {
    "LAB:TEMP": [float(i) for i in range(1, 13)],
    "LAB:COUNT": list(range(100, 112)),
    "LAB:VALVE": [bool(i % 2) for i in range(1, 13)],
    "LAB:MODE": [(i + 2) % 3 for i in range(1, 13)],
    "LAB:NOTE": [f"n{i}" for i in range(12)],
    "LAB:WAVE": [[float(i), float(i + 1), float(i + 2)] for i in range(12)],
}


async def test_every_type_delivers_every_change(server, connect):
    client = await connect()
    handler, sub = await subscribe(client, list(SERIES))
    for name, series in SERIES.items():
        for value in series:
            server.db.post(name, value)
    for name, series in SERIES.items():
        await wait_for(lambda name=name, series=series: len(handler.values(name)) >= 1 + len(series), what=f"changes of {name}")
        # the current value first, then every change in order
        assert handler.values(name)[1:] == series, name
        assert all(dv.StatusCode.is_good() and dv.SourceTimestamp is not None for dv in handler.changes[name])
    await sub.delete()


async def test_many_clients_share_one_database_subscription(server, connect):
    def subscribers() -> int:  # the database's inline subscribers (adapters, historian...)
        return len(server.db._callbacks)

    before = subscribers()
    clients = [await connect(u) for u in ("viewer", "operator", None, "admin")]
    handlers = [(await subscribe(c, ["LAB:TEMP"]))[0] for c in clients]
    assert subscribers() == before, "clients must not add database subscriptions"
    for i in range(10):
        server.db.post("LAB:TEMP", 10.0 + i)
    for h in handlers:
        await wait_for(lambda h=h: len(h.values("LAB:TEMP")) >= 11, what="10 changes on each client")
        assert h.values("LAB:TEMP")[-10:] == [10.0 + i for i in range(10)]


async def test_monitor_deadband_filters_small_changes(server, connect):
    client = await connect()
    handler, _ = await subscribe(client, ["LAB:SLOW"])
    for value in (0.1, 0.2, 0.3, 0.4, 1.0, 1.2, 2.0):
        server.db.post("LAB:SLOW", value)
    await wait_for(lambda: handler.values("LAB:SLOW")[-1:] == [2.0], what="the last big change")
    assert handler.values("LAB:SLOW") == [0.0, 1.0, 2.0]


async def test_alarm_and_validity_changes_are_notified(server, connect):
    client = await connect()
    handler, _ = await subscribe(client, ["LAB:TEMP"])
    server.db.post("LAB:TEMP", 150.0)  # MINOR HIGH
    server.db.post("LAB:TEMP", 250.0)  # MAJOR HIHI
    server.db.invalidate(["LAB:TEMP"], Status.COMM)
    server.db.post("LAB:TEMP", 5.0)
    await wait_for(lambda: len(handler.changes["LAB:TEMP"]) >= 5, what="4 changes")
    codes = [dv.StatusCode.value for dv in handler.changes["LAB:TEMP"][1:]]
    assert codes == [ua.StatusCodes.Good, ua.StatusCodes.Good, ua.StatusCodes.BadCommunicationError, ua.StatusCodes.Good]
    assert handler.changes["LAB:TEMP"][3].Value.Value is None


async def test_alarm_state_changes_are_notified_with_the_time_of_their_reading(server, connect):
    client = await connect()
    handler, _ = await subscribe(client, ["LAB:TEMP", "LAB:TEMP.AlarmState"])
    server.db.post("LAB:TEMP", 150.0)  # MINOR HIGH
    server.db.post("LAB:TEMP", 160.0)  # still MINOR HIGH: no AlarmState change
    server.db.post("LAB:TEMP", 250.0)  # MAJOR HIHI
    server.db.invalidate(["LAB:TEMP"], Status.COMM)
    server.db.post("LAB:TEMP", 5.0)
    await wait_for(lambda: len(handler.changes["LAB:TEMP.AlarmState"]) >= 5, what="4 alarm changes")
    await wait_for(lambda: len(handler.changes["LAB:TEMP"]) >= 6, what="5 value changes")
    assert handler.values("LAB:TEMP.AlarmState") == [0, 104, 203, 309, 0]
    values = {dv.SourceTimestamp: dv for dv in handler.changes["LAB:TEMP"]}
    for state in handler.changes["LAB:TEMP.AlarmState"][1:]:
        assert state.SourceTimestamp in values, "stamped with the time of the reading that set it"


async def test_writes_by_one_client_reach_the_others(server, connect):
    watcher = await connect("viewer")
    handler, _ = await subscribe(watcher, ["LAB:NOTE"])
    writer = await connect("operator")
    await (await pv_node(writer, "LAB:NOTE")).write_value(ua.DataValue(ua.Variant("from operator", ua.VariantType.String)))
    await wait_for(lambda: handler.values("LAB:NOTE")[-1:] == ["from operator"], what="the write")


async def test_publisher_only_queues_watched_nodes(server, service):
    """Nodes nobody monitors cost a store, not a queued notification."""
    publisher = service._publisher
    server.db.post("LAB:COUNT", 1234)
    assert not publisher._queue
    mask = EventMask.VALUE | EventMask.ALARM
    assert publisher._subscription.mask == mask


async def test_slow_consumer_drops_oldest_not_memory(server, service, connect):
    publisher = service._publisher
    publisher._max = 5
    client = await connect()
    handler, _ = await subscribe(client, ["LAB:COUNT"], queue=1000)
    for i in range(20):  # all in one loop turn: the drain task has no chance to run
        server.db.post("LAB:COUNT", i)
    assert len(publisher._queue) == 5 and publisher.dropped == 15
    await wait_for(lambda: handler.values("LAB:COUNT")[-1:] == [19], what="the newest value")
    assert handler.values("LAB:COUNT")[1:] == [15, 16, 17, 18, 19]
