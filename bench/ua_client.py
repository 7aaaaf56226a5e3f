"""An OPC UA client for the benchmarks: asyncua, in a process of its own.

Run as ``python -m bench.ua_client --url opc.tcp://... --ns-uri URI --count N``. It
subscribes to the Value of every PV node (``ns=<URI's index>;s=<name>``, sampling
interval 0, queue size 0: the server's maximum) in one subscription with the given
publishing interval, and reports ``ready`` once every item delivered its first value.

Measurement. asyncua's subscription handler runs every notification in a task of its
own, and its iterator drops beyond a bounded queue; either would make the client, not the
server, the limit or the liar. The subscription here is asyncua's ``Subscription`` with
``publish_callback`` replaced: it walks each PublishResponse's MonitoredItems and records
the arrival time minus each DataValue's SourceTimestamp (the time the driver posted the
value). ``window t0 t1 grace`` and its ``result`` are as in :mod:`bench.ca_client`.

``roundtrip pv n [deadline]`` logs in (``--user``/``--password``), writes ``n`` distinct values to the
node with the Write service and times each until its data change arrives, in a second
subscription with publishing interval 0 (asyncua then publishes as soon as a change is
queued, rather than at the next interval).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import time

from asyncua import Client, ua
from asyncua.common.subscription import Subscription

from bench.stats import summary
from bench.wire import Requests, emit, log, measurement_window, pv_names

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
NAIVE_EPOCH = dt.datetime(1970, 1, 1)


def unix(stamp: dt.datetime) -> float:
    """A DateTime as UNIX seconds (asyncua may hand out naive UTC datetimes)."""
    return (stamp - (NAIVE_EPOCH if stamp.tzinfo is None else EPOCH)).total_seconds()


class Recorder:
    """As :class:`bench.ca_client.Recorder`, on the event loop."""

    def __init__(self) -> None:
        self.t0 = float("inf")
        self.t1 = float("-inf")
        self.latencies: list[float] = []
        self.stamped = 0
        self.total = 0
        self.first = 0
        self.expected_first = 0
        self.first_done = asyncio.Event()


class MeasuringSubscription(Subscription):
    """A subscription whose publish callback only counts and times notifications."""

    recorder: Recorder
    on_value: object = None

    async def publish_callback(self, publish_result: ua.PublishResult) -> None:
        now = time.time()
        self.last_publish_at = time.monotonic()
        data = publish_result.NotificationMessage.NotificationData
        if not data:
            return
        rec = self.recorder
        for notif in data:
            if not isinstance(notif, ua.DataChangeNotification):
                continue
            for item in notif.MonitoredItems:
                dv = item.Value
                if self.on_value is not None:
                    self.on_value(dv)  # type: ignore[operator]
                    continue
                rec.total += 1
                if rec.first < rec.expected_first:
                    rec.first += 1
                    if rec.first == rec.expected_first:
                        rec.first_done.set()
                    continue
                ts = unix(dv.SourceTimestamp)
                if rec.t0 <= now <= rec.t1:
                    rec.latencies.append(now - ts)
                if rec.t0 <= ts <= rec.t1:
                    rec.stamped += 1


async def subscribe(
    client: Client, interval_ms: float, nodeids: list[ua.NodeId], chunk: int = 1000
) -> MeasuringSubscription:
    """One subscription to the Value of ``nodeids``; its recorder expects a first value from each."""
    params = ua.CreateSubscriptionParameters()
    params.RequestedPublishingInterval = interval_ms
    params.RequestedLifetimeCount = 10000
    params.RequestedMaxKeepAliveCount = client.get_keepalive_count(interval_ms) or 10
    params.MaxNotificationsPerPublish = 0  # no limit
    params.PublishingEnabled = True
    params.Priority = 0
    sub = MeasuringSubscription(client.uaclient.session, params, handler=object())  # type: ignore[arg-type]
    sub.recorder = Recorder()
    sub.recorder.expected_first = len(nodeids)  # before any item exists: first values may come at once
    await sub.init()
    handle = 1000
    for k in range(0, len(nodeids), chunk):
        requests = []
        for nodeid in nodeids[k : k + chunk]:
            handle += 1
            rv = ua.ReadValueId(NodeId=nodeid, AttributeId=ua.AttributeIds.Value)
            mp = ua.MonitoringParameters(ClientHandle=handle, SamplingInterval=0.0, QueueSize=0, DiscardOldest=True)
            requests.append(
                ua.MonitoredItemCreateRequest(
                    ItemToMonitor=rv, MonitoringMode=ua.MonitoringMode.Reporting, RequestedParameters=mp
                )
            )
        results = await sub.create_monitored_items(requests)
        bad = [r for r in results if isinstance(r, ua.StatusCode)]
        if bad:
            raise RuntimeError(f"{len(bad)} monitored items refused, e.g. {bad[0]}")
    return sub


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--ns-uri", required=True)
    parser.add_argument("--prefix", default="BENCH:")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--interval-ms", type=float, default=100.0)
    parser.add_argument("--user", default=None)
    parser.add_argument("--password", default=None)
    parser.add_argument("--connect-timeout", type=float, default=300.0)
    args = parser.parse_args()

    client = Client(args.url, timeout=args.connect_timeout)
    if args.user:
        client.set_user(args.user)
        client.set_password(args.password or "")
    t = time.monotonic()
    await client.connect()
    idx = await client.get_namespace_index(args.ns_uri)
    connect_s = time.monotonic() - t
    names = pv_names(args.prefix, args.count)
    t = time.monotonic()
    sub = None
    if names:
        sub = await subscribe(client, args.interval_ms, [ua.NodeId(n, idx) for n in names])
        try:
            async with asyncio.timeout(args.connect_timeout):
                await sub.recorder.first_done.wait()
        except TimeoutError:
            raise RuntimeError(
                f"only {sub.recorder.first} of {len(names)} first values arrived in {args.connect_timeout} s"
            ) from None
    subscribe_s = time.monotonic() - t
    loop = asyncio.get_running_loop()

    window = measurement_window(loop, lambda: sub.recorder)  # type: ignore[union-attr]  # a writer has no window

    async def roundtrip(
        pv: str, n: int, base: float = 1.0, step: float = 0.001, timeout: float = 5.0, deadline: float | None = None
    ) -> dict:
        nodeid = ua.NodeId(pv, idx)
        rt = await subscribe(client, 0.0, [nodeid])
        state: dict = {"want": None, "seen": asyncio.Event()}

        def on_value(dv: ua.DataValue) -> None:
            want = state["want"]
            value = dv.Value.Value if dv.Value is not None else None
            if want is not None and isinstance(value, float) and abs(value - want) < 1e-9:
                state["seen"].set()

        rt.on_value = on_value
        node = client.get_node(nodeid)
        times, failures, refused = [], 0, []
        for k in range(n):
            if deadline is not None and time.time() >= deadline:
                break
            value = round(base + step * (k % 500 + 1), 6)
            state["seen"] = asyncio.Event()
            state["want"] = value
            t = time.perf_counter()
            try:
                await node.write_attribute(
                    ua.AttributeIds.Value, ua.DataValue(ua.Variant(value, ua.VariantType.Double))
                )
            except ua.UaStatusCodeError as e:
                refused.append(str(e))
                failures += 1
                continue
            try:
                async with asyncio.timeout(timeout):
                    await state["seen"].wait()
                times.append(time.perf_counter() - t)
            except TimeoutError:
                failures += 1
        await rt.delete()
        return {"times": times, "failures": failures, "refused": refused[:3], "latency": summary(times)}

    requests = Requests(loop, {"window": window, "roundtrip": roundtrip})
    requests.start()
    emit({"event": "ready", "items": len(names), "connect_s": connect_s, "subscribe_s": subscribe_s})
    await requests.stopped.wait()
    try:
        async with asyncio.timeout(10):
            await client.disconnect()
    except Exception:  # the server may be gone already
        pass


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception as e:
        log(f"ua_client: {type(e).__name__}: {e}")
        raise
