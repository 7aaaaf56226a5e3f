"""How many notifications one PublishResponse holds: the client's MaxNotificationsPerPublish, within the server's limit.

A publish with more queued than that sends them oldest first across monitored items,
says MoreNotifications, and the rest follow in the next responses at once -- in the same
publishing interval, not one interval each.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from asyncua import ua
from asyncua.common.subscription import Subscription
from asyncua.server.address_space import AddressSpace
from labctl.server.app import Server
from labctl.server.opcua.subscriptions import LabctlSubscription, notification_limit
from labctl.server.site import parse_site

from tests.helpers import wait_for
from tests.protocol.opcua.conftest import open_client, pv_node, site_text

INTERVAL_MS = 1500.0
"""Long: every response of one publish arrives well inside one interval, however slow the machine."""


class Response:
    def __init__(self, result: ua.PublishResult) -> None:
        self.at = time.monotonic()
        self.more = result.MoreNotifications
        self.sequence = result.NotificationMessage.SequenceNumber
        self.values: list[Any] = []
        for data in result.NotificationMessage.NotificationData:
            if isinstance(data, ua.DataChangeNotification):
                self.values += [item.Value.Value.Value for item in data.MonitoredItems]


class Recording(Subscription):
    """An asyncua subscription that keeps each PublishResponse with data as it came."""

    responses: list[Response]

    async def publish_callback(self, publish_result: ua.PublishResult) -> None:
        if publish_result.NotificationMessage.NotificationData:
            self.responses.append(Response(publish_result))


async def recording(client: Any, names: list[str], *, max_notifications: int, queue: int = 100) -> Recording:
    """A subscription to ``names`` asking for at most ``max_notifications`` per publish (0: no limit), past its first values."""
    params = ua.CreateSubscriptionParameters(
        RequestedPublishingInterval=INTERVAL_MS, RequestedLifetimeCount=1000, RequestedMaxKeepAliveCount=10,
        MaxNotificationsPerPublish=max_notifications, PublishingEnabled=True, Priority=0,
    )  # fmt: skip
    sub = Recording(client.uaclient.session, params, handler=object())  # type: ignore[arg-type]
    sub.responses = []
    await sub.init()
    nodes = [await pv_node(client, n) for n in names]
    await sub.subscribe_data_change(nodes, queuesize=queue)
    await wait_for(lambda: sum(len(r.values) for r in sub.responses) == len(names), timeout=INTERVAL_MS / 1000 + 10,
                   what="the first values")  # fmt: skip
    sub.responses.clear()
    return sub


def post_interleaved(server: Server, n: int) -> list[Any]:
    """``n`` changes of LAB:COUNT and of LAB:FLOW, alternating, in one turn of the loop; their values in posting order."""
    posted: list[Any] = []
    for i in range(n):
        server.db.post("LAB:COUNT", 100 + i)
        server.db.post("LAB:FLOW", float(i))
        posted += [100 + i, float(i)]
    return posted


def limited_site(tmp_path: Path, per_publish: int) -> str:
    return site_text(tmp_path / "state").replace("trust: auto}", f"trust: auto, limits: {{notifications_per_publish: {per_publish}}}}}", 1)


async def test_a_publish_beyond_the_clients_maximum_goes_oldest_first_in_responses_that_follow_at_once(server, connect):
    client = await connect()
    sub = await recording(client, ["LAB:COUNT", "LAB:FLOW"], max_notifications=4)
    posted = post_interleaved(server, 5)  # 10 notifications, asyncua's queue holds them per item: COUNT's first
    await wait_for(lambda: sum(len(r.values) for r in sub.responses) >= 10, timeout=INTERVAL_MS / 1000 + 10, what="10 changes")
    sizes = [len(r.values) for r in sub.responses]
    assert sizes == [4, 4, 2]
    assert [r.more for r in sub.responses] == [True, True, False]
    assert [v for r in sub.responses for v in r.values] == posted  # oldest first across the two items
    spread = sub.responses[-1].at - sub.responses[0].at
    assert spread < INTERVAL_MS / 1000 / 2, f"the rest took {spread:.2f} s: not at once but at later intervals"
    await sub.delete()


async def test_the_server_limit_bounds_every_client_and_a_modified_maximum_is_taken(tmp_path):
    server = Server(parse_site(limited_site(tmp_path, 3), "lab.yaml"))
    await server.start()
    client = await open_client(server.service("opcua").url)  # type: ignore[attr-defined]
    try:
        unlimited = await recording(client, ["LAB:COUNT", "LAB:FLOW"], max_notifications=0)
        fewer = await recording(client, ["LAB:COUNT", "LAB:FLOW"], max_notifications=2)
        posted = post_interleaved(server, 4)
        for sub in (unlimited, fewer):
            await wait_for(lambda sub=sub: sum(len(r.values) for r in sub.responses) >= 8, timeout=INTERVAL_MS / 1000 + 10,
                           what="8 changes")  # fmt: skip
            assert [v for r in sub.responses for v in r.values] == posted
        assert [len(r.values) for r in unlimited.responses] == [3, 3, 2]
        assert [len(r.values) for r in fewer.responses] == [2, 2, 2, 2]

        # ModifySubscription: a new maximum is taken, still within the server's limit
        for asked, sizes in ((1, [1, 1, 1, 1]), (10, [3, 1])):
            params = ua.ModifySubscriptionParameters(
                SubscriptionId=fewer.subscription_id, RequestedPublishingInterval=INTERVAL_MS, RequestedLifetimeCount=1000,
                RequestedMaxKeepAliveCount=10, MaxNotificationsPerPublish=asked, Priority=0,
            )  # fmt: skip
            await client.uaclient.session.modify_subscription(params)
            fewer.responses.clear()
            for i in range(2):
                server.db.post("LAB:COUNT", 200 + i)
                server.db.post("LAB:FLOW", 50.0 + i)
            await wait_for(lambda: sum(len(r.values) for r in fewer.responses) >= 4, timeout=INTERVAL_MS / 1000 + 10,
                           what="4 changes")  # fmt: skip
            assert [len(r.values) for r in fewer.responses] == sizes, asked
    finally:
        await client.disconnect()
        await server.stop()


async def test_publish_requests_queued_at_the_server_carry_the_rest_without_a_round_trip(server, connect):
    """A client that keeps several Publish requests at the server (as UaExpert and node-opcua do) gets the rest on those."""
    client = await connect()
    sub = await recording(client, ["LAB:COUNT", "LAB:FLOW"], max_notifications=1)
    extra = [asyncio.ensure_future(client.uaclient.session.publish([])) for _ in range(3)]  # 3 more, besides asyncua's own
    try:
        posted = post_interleaved(server, 2)  # 4 notifications, one per response
        answers = await asyncio.wait_for(asyncio.gather(*extra), timeout=INTERVAL_MS / 1000 + 10)
        answered = time.monotonic()
        await wait_for(lambda: sub.responses, what="the response to asyncua's own request")
    finally:
        for f in extra:
            f.cancel()
    responses = sub.responses + [Response(a.Parameters) for a in answers]
    assert sorted(len(r.values) for r in responses) == [1, 1, 1, 1]
    assert [v for r in sorted(responses, key=lambda r: r.sequence) for v in r.values] == posted
    assert answered - sub.responses[0].at < INTERVAL_MS / 1000 / 2, "the rest waited for later intervals"


async def test_data_changes_and_events_go_in_the_order_they_were_queued_so_no_event_waits_behind_data():
    """The subscription itself (no wire): two per response, across items and across data changes and events."""
    sent: list[ua.PublishResult] = []

    async def send(result: ua.PublishResult, request: object) -> None:
        sent.append(result)

    data = ua.CreateSubscriptionResult(SubscriptionId=1, RevisedPublishingInterval=1000.0, RevisedLifetimeCount=100,
                                       RevisedMaxKeepAliveCount=10)  # fmt: skip
    sub = LabctlSubscription(data, AddressSpace(), send, ua.NodeId(1), request_callback=lambda _: object(), max_notifications=2)
    change = lambda handle, value: ua.MonitoredItemNotification(ClientHandle=handle, Value=ua.DataValue(ua.Variant(value)))  # noqa: E731
    event = lambda handle, text: ua.EventFieldList(ClientHandle=handle, EventFields=[ua.Variant(text)])  # noqa: E731
    await sub.enqueue_datachange_event(1, change(1, 1.0), 0)
    await sub.enqueue_event(9, event(9, "alarm A"), 0)
    await sub.enqueue_datachange_event(2, change(2, 2.0), 0)
    await sub.enqueue_datachange_event(1, change(1, 3.0), 0)
    await sub.enqueue_event(9, event(9, "alarm B"), 0)
    assert await sub.publish_results()

    def shown(result: ua.PublishResult) -> list[Any]:
        out: list[Any] = []
        for d in result.NotificationMessage.NotificationData:
            if isinstance(d, ua.DataChangeNotification):
                out += [i.Value.Value.Value for i in d.MonitoredItems]
            else:
                out += [e.EventFields[0].Value for e in d.Events]
        return out

    assert [shown(r) for r in sent] == [[1.0, "alarm A"], [2.0, 3.0], ["alarm B"]]
    assert [r.MoreNotifications for r in sent] == [True, True, False]
    assert [r.NotificationMessage.SequenceNumber for r in sent] == [1, 2, 3]
    assert not sub._triggered_datachanges and not sub._triggered_events


class Requests:
    """The client's Publish requests at the server, handed out as asyncua's processor does."""

    def __init__(self, queued: int) -> None:
        self.queued = [object() for _ in range(queued)]
        self.waiting: LabctlSubscription | None = None
        self.sent: list[ua.PublishResult] = []

    def take(self, subscription_id: int) -> object | None:
        if self.queued:
            return self.queued.pop(0)
        self.waiting = self.subscription  # called back when a request comes
        return None

    async def send(self, result: ua.PublishResult, request: object) -> None:
        self.sent.append(result)

    async def arrive(self) -> None:
        """A new Publish request: to the subscription waiting for one, else queued."""
        if self.waiting is not None:
            self.waiting = None
            assert await self.subscription.publish_results(object())
        else:
            self.queued.append(object())

    def subscribe(self, max_notifications: int) -> LabctlSubscription:
        data = ua.CreateSubscriptionResult(SubscriptionId=1, RevisedPublishingInterval=1000.0, RevisedLifetimeCount=100,
                                           RevisedMaxKeepAliveCount=10)  # fmt: skip
        self.subscription = LabctlSubscription(data, AddressSpace(), self.send, ua.NodeId(1), request_callback=self.take,
                                               max_notifications=max_notifications)  # fmt: skip
        return self.subscription

    def values(self) -> list[list[float]]:
        return [[i.Value.Value.Value for d in r.NotificationMessage.NotificationData for i in d.MonitoredItems] for r in self.sent]


async def change(sub: LabctlSubscription, handle: int) -> None:
    await sub.enqueue_datachange_event(handle, ua.MonitoredItemNotification(ClientHandle=handle, Value=ua.DataValue(ua.Variant(float(handle)))), 0)


async def test_what_is_queued_while_a_cycle_is_sent_waits_for_the_next_cycle():
    """The rest of a cycle goes with the client's next Publish request; a change queued meanwhile is not in it."""
    requests = Requests(queued=1)
    sub = requests.subscribe(max_notifications=2)
    for k in range(3):
        await change(sub, k)
    await sub.publish_results()  # the interval: 2 of the cycle's 3 go, and it waits for a request
    await change(sub, 7)
    await requests.arrive()  # the rest of the cycle, without 7
    assert requests.values() == [[0.0, 1.0], [2.0]] and requests.waiting is None
    await sub.publish_results()  # the next interval: its cycle waits for a request
    await requests.arrive()
    assert requests.values() == [[0.0, 1.0], [2.0], [7.0]]
    assert [r.MoreNotifications for r in requests.sent] == [True, False, False]


async def test_a_cycle_that_came_round_while_the_last_was_sent_starts_when_that_one_ends():
    """A client slow with its Publish requests: the next cycle follows the last at once, not an interval later."""
    requests = Requests(queued=1)
    sub = requests.subscribe(max_notifications=2)
    for k in range(3):
        await change(sub, k)
    await sub.publish_results()
    await change(sub, 7)
    await sub.publish_results()  # the interval came round, the last cycle's rest still waiting for a request
    await requests.arrive()  # that rest, then the next cycle wants a request at once
    assert requests.values() == [[0.0, 1.0], [2.0]] and requests.waiting is sub
    await requests.arrive()
    assert requests.values() == [[0.0, 1.0], [2.0], [7.0]]


def test_the_notification_limit_is_the_clients_within_the_servers():
    assert notification_limit(0, 250) == 250  # 0: the client sets none
    assert notification_limit(10, 250) == 10
    assert notification_limit(1000, 250) == 250
