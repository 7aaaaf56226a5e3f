"""Watching PVs: a :class:`Monitor` is an async iterator of their changes.

Theory of operation. :meth:`labctl.clients.session.Session.monitor` makes a
:class:`Monitor`; the first ``async for`` or ``async with`` (or :meth:`Monitor.start`)
reads the PVs' metadata it lacks and creates one OPC UA subscription with two data-change
monitored items per PV, its value and its ``AlarmState`` (sampling interval 0: every
change the server publishes). It yields :class:`~labctl.clients.values.Sample` -- the
current values first, then every change -- buffered up to ``queue_size`` samples, beyond
which the oldest are dropped. A subscription that ends while the session is open raises
:class:`~labctl.clients.errors.ConnectionLost`.

Pairing. A reading whose severity changed reaches the client as two notifications, the
value and the ``AlarmState``, both stamped with the reading's time and sent in the same
publish, though not necessarily in that order. The monitor takes each publish whole (all
the notifications that arrived together) and gives a value the alarm state of the
latest ``AlarmState`` notification at or before its time, so one reading is one sample
with its severity; an ``AlarmState`` change that no value of the publish reaches (an
alarm that changes while the value does not) is a sample of its own, with the last value.

Monitors wait. A quiet PV is not an error: iterating waits for the next change as long as
it takes (as ``camonitor`` does; the server's keep-alives and the session's own checks
still end it with ConnectionLost if the server goes away). A caller that wants to give
up asks for it: :meth:`Monitor.next` with ``timeout_s`` raises
:class:`~labctl.clients.errors.RequestTimeout` when no change came within that time, and
the monitor stays usable. Only changes the server publishes arrive: those past the PV's
monitor deadband, alarm changes, and the current value first; a read
(:meth:`~labctl.clients.session.Session.get`) always returns the latest value.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from asyncua import ua
from asyncua.common.subscription import DataChangeEvent, StatusChangeEvent
from labctl.clients.errors import ConnectionLost, RequestTimeout
from labctl.clients.values import Sample, alarm_node_name, reading_of

if TYPE_CHECKING:
    from labctl.clients.session import Session

log = logging.getLogger(__name__)


class Monitor:
    """Samples of some PVs as they change (made by :meth:`labctl.clients.session.Session.monitor`)."""

    def __init__(self, session: Session, names: list[str], queue_size: int, interval_ms: float) -> None:
        self.session = session
        self.names = names
        self.queue_size = queue_size
        self.interval_ms = interval_ms
        self._sub: Any = None
        self._by_handle: dict[Any, tuple[str, bool]] = {}
        """NodeId -> (PV name, whether it is the PV's AlarmState)."""
        self._values: dict[str, ua.DataValue] = {}
        """The latest value notification of each PV."""
        self._alarms: dict[str, ua.DataValue] = {}
        """The AlarmState in force for each PV's latest sample."""
        self._ready: deque[Sample] = deque()
        """Samples of the publish being handed out."""
        self._lost: str | None = None
        """Why the subscription ended, once the samples before it are handed out."""
        self._closed = False

    async def start(self) -> Monitor:
        """Subscribe (done by the first ``async for`` or ``async with`` if not called)."""
        if self._sub is not None:
            return self
        s = self.session
        await s._infos([n for n in dict.fromkeys(self.names) if n not in s._meta])
        sub = await s._call(s.client.create_subscription(self.interval_ms, None, queue_maxsize=self.queue_size))
        self._sub = sub
        s._monitors.add(self)
        nodes, self._by_handle = [], {}
        for name in self.names:
            meta = s._meta.get(name)
            pairs = ((name, False), (alarm_node_name(name), True)) if meta is None or meta.alarm_state else ((name, False),)
            for node_name, is_alarm in pairs:
                node = s.client.get_node(s._node_id(node_name))
                nodes.append(node)
                self._by_handle[node.nodeid] = (name, is_alarm)
        queue = max(1, min(self.queue_size, 1000))  # server-side queue per PV between publishes
        await s._call(sub.subscribe_data_change(nodes, queuesize=queue, sampling_interval=0.0))
        return self

    async def close(self) -> None:
        """Unsubscribe."""
        if self._closed:
            return
        self._closed = True
        self.session._monitors.discard(self)
        if self._sub is not None:
            try:
                await self._sub.delete()
            except Exception as e:  # the session may be gone already; the server drops it then
                log.debug("deleting a subscription: %s", e)

    async def __aenter__(self) -> Monitor:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[Sample]:
        return self

    async def __anext__(self) -> Sample:
        if self._closed:
            raise StopAsyncIteration
        await self.start()
        while not self._ready:
            if self._lost is not None:
                if self._lost == "" and (self._closed or self.session._closed):
                    raise StopAsyncIteration
                raise ConnectionLost(f"{self.session.url}: {self._lost or 'the subscription was closed'}")
            try:
                first = await self._sub.__anext__()
            except StopAsyncIteration:
                self._lost = ""
                continue
            self._take([first, *self._arrived()])
        return self._ready.popleft()

    def _arrived(self) -> list[Any]:
        """The events that came with the one just taken (the rest of its publish), without waiting.

        asyncua (pinned) queues every notification of a publish at once on the
        subscription's iterator queue; a None there means the subscription ended.
        """
        queue = self._sub._event_queue  # noqa: SLF001 -- see the docstring
        out: list[Any] = []
        while queue is not None and not queue.empty():
            event = queue.get_nowait()
            if event is None:
                self._lost = ""
                break
            out.append(event)
        return out

    def _take(self, events: list[Any]) -> None:
        """Turn one publish's events into samples: each value with the alarm state in force at its time (module docstring)."""
        changes: list[tuple[str, bool, ua.DataValue]] = []
        for event in events:
            if isinstance(event, DataChangeEvent):
                known = self._by_handle.get(event.node.nodeid)
                if known is not None:
                    changes.append((*known, event.data.monitored_item.Value))
            elif isinstance(event, StatusChangeEvent) and event.notification.Status.is_bad():
                self._lost = f"subscription ended ({event.notification.Status.name})"
        latest_value: dict[str, Any] = {}
        alarms: dict[str, list[ua.DataValue]] = {}
        for name, is_alarm, dv in changes:
            if is_alarm:
                alarms.setdefault(name, []).append(dv)
            else:
                latest_value[name] = _time(dv)
        taken: set[int] = set()  # AlarmState notifications a value of this publish took
        for name, is_alarm, dv in changes:
            meta = self.session._meta[name]
            if not is_alarm:
                at, mine = _time(dv), alarms.get(name, [])
                applicable = [a for a in mine if not _after(_time(a), at)]
                if applicable:  # the latest at or before the value's time
                    chosen = max(applicable, key=lambda a: (_time(a) is not None, _time(a) or 0))
                    taken.update(id(a) for a in applicable)
                    self._alarms[name] = chosen
                elif name not in self._alarms and mine:  # the first publish: the state in force, whatever its time
                    taken.update(id(a) for a in mine)
                    self._alarms[name] = mine[-1]
                self._values[name] = dv
                self._ready.append(Sample(name, reading_of(meta, dv, self._alarms.get(name))))
                continue
            newest = latest_value.get(name)
            if id(dv) in taken or (newest is not None and not _after(_time(dv), newest)):
                continue  # a value of this publish took it
            before = self._alarms.get(name)
            self._alarms[name] = dv
            last = self._values.get(name)
            if last is not None and _state(before) != _state(dv):  # the alarm changed, the value did not: a sample of its own
                alone = ua.DataValue(last.Value, last.StatusCode, SourceTimestamp=dv.SourceTimestamp, ServerTimestamp=dv.ServerTimestamp)
                self._ready.append(Sample(name, reading_of(meta, alone, dv)))

    async def next(self, timeout_s: float | None = None) -> Sample:
        """The next sample, waiting for it as long as it takes, or at most ``timeout_s``.

        Raises:
            RequestTimeout: no sample within ``timeout_s`` (the monitor stays usable).
            ConnectionLost: the subscription or the session ended.
            StopAsyncIteration: the monitor was closed.
        """
        if timeout_s is None:
            return await self.__anext__()
        try:
            return await asyncio.wait_for(self.__anext__(), timeout_s)
        except TimeoutError:
            raise RequestTimeout(f"no change of {', '.join(self.names)} within {timeout_s:g} s") from None


def _time(dv: ua.DataValue | None) -> Any:
    """A notification's SourceTimestamp (None if it has none)."""
    return None if dv is None else dv.SourceTimestamp


def _state(dv: ua.DataValue | None) -> Any:
    """An AlarmState notification's value (None if there is none)."""
    return None if dv is None or dv.Value is None else dv.Value.Value


def _after(a: Any, b: Any) -> bool:
    """Whether time ``a`` is later than ``b`` (a missing time is never later)."""
    return a is not None and b is not None and a > b
