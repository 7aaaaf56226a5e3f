"""Watching PVs: a :class:`Monitor` is an async iterator of their changes.

Theory of operation. :meth:`labctl.clients.session.Session.monitor` makes a
:class:`Monitor`; the first ``async for`` or ``async with`` (or :meth:`Monitor.start`)
reads the PVs' metadata it lacks and creates one OPC UA subscription with a data-change
monitored item per PV (sampling interval 0: every change the server publishes). It
yields :class:`~labctl.clients.values.Sample` -- the current values first, then every
change -- buffered up to ``queue_size`` samples, beyond which the oldest are dropped. A
subscription that ends while the session is open raises
:class:`~labctl.clients.errors.ConnectionLost`.

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
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from asyncua.common.subscription import DataChangeEvent, StatusChangeEvent
from labctl.clients.errors import ConnectionLost, RequestTimeout
from labctl.clients.values import Sample, reading_of

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
        self._by_handle: dict[Any, str] = {}
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
        nodes = [s.client.get_node(s._node_id(n)) for n in self.names]
        queue = max(1, min(self.queue_size, 1000))  # server-side queue per PV between publishes
        await s._call(sub.subscribe_data_change(nodes, queuesize=queue, sampling_interval=0.0))
        self._by_handle = {node.nodeid: name for node, name in zip(nodes, self.names, strict=True)}
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
        while True:
            try:
                event = await self._sub.__anext__()
            except StopAsyncIteration:
                if self._closed or self.session._closed:
                    raise
                raise ConnectionLost(f"{self.session.url}: the subscription was closed") from None
            if isinstance(event, DataChangeEvent):
                name = self._by_handle.get(event.node.nodeid)
                if name is None:
                    continue
                meta = self.session._meta[name]
                return Sample(name, reading_of(meta, event.data.monitored_item.Value))
            if isinstance(event, StatusChangeEvent) and event.notification.Status.is_bad():
                raise ConnectionLost(f"{self.session.url}: subscription ended ({event.notification.Status.name})")

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
