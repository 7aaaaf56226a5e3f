"""Subscriptions that send a bounded number of notifications per PublishResponse, oldest first.

Theory of operation. asyncua's server subscription (:class:`InternalSubscription`) puts
every notification queued since the last publish into one PublishResponse: it ignores
the client's ``MaxNotificationsPerPublish`` (CreateSubscription and ModifySubscription),
and a client that watches 10 000 PVs at a 100 ms publishing interval gets a thousand
notifications in one message. Nothing of it is usable before all of it is encoded,
sent and decoded: with asyncua as the client that is ~15 ms at a thousand notifications,
added to every value's latency, the oldest value's included.

:class:`LabctlSubscription` sends at most :attr:`~LabctlSubscription.max_notifications`
notifications per PublishResponse: the client's ``MaxNotificationsPerPublish`` when it
asked for one (0: no limit, OPC UA Part 4, 5.13.2), and never more than the server's
``server.opcua.limits.notifications_per_publish``. When more are queued, the response
says so (``MoreNotifications``) and the next one follows at once: with the next Publish
request the client has queued, or as soon as it sends one (asyncua's processor calls the
subscription back then), not at the next publishing interval; what is queued meanwhile
waits for the next cycle, as it would have in one response. The notifications go in
the order they were queued, across monitored items and across data changes and events
(asyncua groups them by item), so those that waited longest are in the first, small
response, and an alarm event does not wait behind a stream of data changes. Status
changes (the subscription's end) go in the first response, as before.

:class:`LabctlSubscriptionService` is asyncua's subscription service making these;
its ``create_subscription`` is asyncua 2.1's (pinned) with that class changed, and its
``modify_subscription`` takes a new ``MaxNotificationsPerPublish`` (asyncua's keeps
everything as created, which the specification allows for the rest).
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections.abc import Callable
from operator import itemgetter
from typing import Any

from asyncua import ua
from asyncua.common import utils
from asyncua.server.internal_subscription import InternalSubscription
from asyncua.server.subscription_service import SubscriptionService


def notification_limit(requested: int, server_limit: int) -> int:
    """The notifications per PublishResponse: the client's ``requested`` (0: none asked), within ``server_limit``."""
    return min(requested, server_limit) if requested > 0 else server_limit


def _take(queued: dict[int, list[tuple[int, Any]]], last: int) -> list[Any]:
    """The notifications queued up to number ``last``, in the order they were queued; they leave ``queued``.

    ``queued`` maps a monitored item's id to its ``(number, notification)`` pairs, numbered
    as they were queued: what is taken of each item is a first part of its own.
    """
    taken: list[tuple[int, Any]] = []
    for mid in list(queued):
        entries = queued[mid]
        k = bisect_right(entries, last, key=itemgetter(0))
        taken += entries[:k]
        if k == len(entries):
            del queued[mid]
        elif k:
            del entries[:k]
    taken.sort(key=itemgetter(0))
    return [n for _, n in taken]


class LabctlSubscription(InternalSubscription):
    """asyncua's subscription, sending at most :attr:`max_notifications` notifications per PublishResponse.

    Each data change and event is queued with a number, in the order it came; a response
    takes the lowest numbered, across both kinds and every monitored item, so nothing
    waits behind newer notifications (an alarm event behind a stream of data changes).
    """

    def __init__(self, *args: Any, max_notifications: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_notifications = max_notifications
        """Most data changes and events in one PublishResponse."""
        self._numbered = 0
        """The number of the last notification queued."""
        self._cycle_last = 0
        """The number of the last notification the current publishing cycle sends: later ones wait for the next."""
        self._last = 0
        """The number of the last notification the response being made takes."""
        self._cycle_due = False
        """Whether a publishing interval came round while a cycle was still being sent: the next starts when it ends."""

    def _owes(self) -> bool:
        """Whether the current cycle still has notifications to send (each item's oldest is its first)."""
        return self._publishing_enabled and any(
            entries[0][0] <= self._cycle_last
            for queue in (self._triggered_datachanges, self._triggered_events)
            for entries in queue.values()
        )

    def _more_now(self) -> bool:
        """Whether there is more to send at once: the rest of the cycle, or the cycle that came round meanwhile."""
        if self._cycle_due and not self._owes():
            self._cycle_due, self._cycle_last = False, self._numbered
        return self._owes()

    async def publish_results(self, requestdata: Any = None) -> bool:
        """asyncua's, then at once again while the cycle's notifications are left (each with a Publish request of its own).

        A cycle starts when the previous one has sent everything it had: it sends what is
        queued then, and what comes meanwhile waits for the next cycle, as in asyncua. When
        the interval comes round before a cycle is sent (a client slow to send Publish
        requests), the next cycle starts as soon as that one ends, not an interval later.
        """
        if not self._owes():
            self._cycle_last = self._numbered
        elif requestdata is None:  # the publishing interval came round while the last cycle is still being sent
            self._cycle_due = True
        sent = await super().publish_results(requestdata)
        more = sent
        while more and not self._closing and self._more_now():
            # with the next queued Publish request, or asyncua's processor calls back when one comes
            more = await super().publish_results()
        return sent  # whether ``requestdata`` (or a queued request) was used: the processor must not use it again

    async def _enqueue_event(self, mid: int, eventdata: Any, size: int, queue: dict[int, list[Any]]) -> None:
        self._numbered += 1
        await super()._enqueue_event(mid, (self._numbered, eventdata), size, queue)

    def _pop_publish_result(self) -> ua.PublishResult:
        self._last = self._cycle_last
        if self._publishing_enabled:
            owed = [n for queue in (self._triggered_datachanges, self._triggered_events)
                    for entries in queue.values() for n, _ in entries if n <= self._cycle_last]  # fmt: skip
            if len(owed) > self.max_notifications:
                self._last = heapq.nsmallest(self.max_notifications, owed)[-1]
        result = super()._pop_publish_result()
        result.MoreNotifications = self._owes()
        return result

    def _pop_triggered_datachanges(self, result: ua.PublishResult) -> None:
        if self._triggered_datachanges:
            items = _take(self._triggered_datachanges, self._last)
            if items:
                result.NotificationMessage.NotificationData.append(ua.DataChangeNotification(MonitoredItems=items))

    def _pop_triggered_events(self, result: ua.PublishResult) -> None:
        if self._triggered_events:
            events = _take(self._triggered_events, self._last)
            if events:
                result.NotificationMessage.NotificationData.append(ua.EventNotificationList(Events=events))


class LabctlSubscriptionService(SubscriptionService):
    """asyncua's subscription service, with :class:`LabctlSubscription` and the server's notification limit.

    ``iserver`` is labctl's internal server: its ``limits`` (``server.opcua.limits``) bound every client.
    """

    def _server_limit(self) -> int:
        return self.iserver.limits.notifications_per_publish  # type: ignore[union-attr]

    async def create_subscription(
        self,
        params: ua.CreateSubscriptionParameters,
        callback: Callable[..., Any],
        session_id: ua.NodeId,
        request_callback: Callable[..., Any] | None = None,
    ) -> ua.CreateSubscriptionResult:
        """asyncua 2.1's, making a :class:`LabctlSubscription` with the notification limit."""
        max_subs = self.iserver.max_subscriptions if self.iserver else 1_000
        if len(self.subscriptions) >= max_subs:
            self.logger.warning("Refusing subscription: at max_subscriptions=%s", max_subs)
            raise utils.ServiceError(ua.StatusCodes.BadTooManySubscriptions)
        result = ua.CreateSubscriptionResult()
        result.RevisedPublishingInterval = params.RequestedPublishingInterval
        result.RevisedLifetimeCount = self._clamp_lifetime_count(params.RequestedLifetimeCount)
        result.RevisedMaxKeepAliveCount = self._clamp_keep_alive_count(params.RequestedMaxKeepAliveCount)
        self._sub_id_counter += 1
        result.SubscriptionId = self._sub_id_counter
        no_acks_limit = self.iserver.max_unacked_messages_per_subscription if self.iserver else 5000
        max_queue_size = self.iserver.max_monitored_item_queue_size if self.iserver else 10_000
        subscription = LabctlSubscription(
            result,
            self.aspace,
            callback,
            session_id,
            request_callback=request_callback,
            delete_callback=lambda: self.subscriptions.pop(result.SubscriptionId, None),
            no_acks_limit=no_acks_limit,
            max_queue_size=max_queue_size,
            publishing_enabled=params.PublishingEnabled,
            max_notifications=notification_limit(params.MaxNotificationsPerPublish, self._server_limit()),
        )
        await subscription.start()
        self.subscriptions[result.SubscriptionId] = subscription
        return result

    def modify_subscription(self, params: ua.ModifySubscriptionParameters) -> ua.ModifySubscriptionResult:
        """asyncua's (the rest as created), taking the new ``MaxNotificationsPerPublish``."""
        result = super().modify_subscription(params)
        subscription = self.subscriptions.get(params.SubscriptionId)
        if isinstance(subscription, LabctlSubscription):
            subscription.max_notifications = notification_limit(params.MaxNotificationsPerPublish, self._server_limit())
        return result
