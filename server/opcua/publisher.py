"""From database updates to OPC UA data changes: one subscription feeds every client.

Theory of operation. :class:`Publisher` subscribes once to the database (mask
VALUE|ALARM: changes that passed the monitor deadband, and alarm changes). Its callback
runs inline in :meth:`labctl.ioc.database.Database.post`, which must not await, so it does
only synchronous work: build the DataValue, store it in the node's Value attribute, and,
if any monitored item watches the node, queue it. When the reading's severity or status
changed, the node's ``AlarmState`` variable gets the new one the same way, queued
before the value (both go out in the same publish, stamped with the reading's time,
:mod:`labctl.server.opcua.values`). A task drains the queue in order and
hands each DataValue to the node's monitored items, which asyncua then batches per
subscription and publishing interval; it lets the rest of the loop run every
:data:`DRAIN_SLICE_S`, so a burst does not hold up writes. The queue is bounded: under overload the oldest
notifications are dropped and counted (:attr:`Publisher.dropped`) rather than letting
memory grow or slowing the scan.

Reads are always current. The deadband decides what monitored items are sent, never
what a Read returns (as MDEL in an EPICS record): every PV node's Value attribute gets a
value callback (:meth:`Publisher.current`) that asyncua calls for each Read (and for a
new monitored item's first value). It compares the reading the node shows with the one
the core holds -- the same object unless a post since then was filtered out by the
deadband, or was a scan of an unchanged value with a newer time -- and rebuilds the
DataValue only then. So a Read right after a write inside the deadband returns the
written value, and a scanned PV's SourceTimestamp is the time of its latest scan, while
the cost of a post that passes no deadband stays what the core spends on it: nothing
here runs for it.

asyncua's monitored items deep-copy every DataValue they receive (about 40 % of the
cost of a notification) to guard against callers mutating it afterwards. The
DataValues made here are never mutated, so :func:`install_copy_fastpath` lets values
whose leaves are immutable (numbers, strings, lists of them) skip the deep copy; see
``docs/decisions/opcua-notification-copy.md``.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import logging
import time
from collections import deque
from typing import Any

from asyncua import ua
from asyncua.server import monitored_item_service
from asyncua.server.address_space import AttributeValue
from labctl.ioc.database import Database
from labctl.ioc.subscription import Callback
from labctl.ioc.types import EventMask, Reading, Update
from labctl.server.opcua.address_space import PVNode
from labctl.server.opcua.values import alarm_state_value, data_value

from labctl.backoff import Backoff
from labctl.supervision import supervise

log = logging.getLogger(__name__)

#: Most notifications waiting for the drain task before the oldest are dropped.
MAX_PENDING = 100_000
#: The drain task yields to the rest of the event loop after this long (seconds): a burst
#: of thousands of notifications (asyncua's monitored items do not suspend) would
#: otherwise hold the loop for tens of milliseconds, and every write waiting on it.
DRAIN_SLICE_S = 0.001


class Publisher:
    """Feeds database updates into the address space and its monitored items."""

    def __init__(self, db: Database, nodes: dict[str, PVNode], *, max_pending: int = MAX_PENDING) -> None:
        self.db = db
        self.nodes = nodes
        self.dropped = 0
        """Notifications dropped because the queue was full."""
        self._queue: deque[tuple[AttributeValue, ua.DataValue]] = deque()
        self._shown: dict[str, Reading] = {}
        """The reading each node's Value was built from (compared with the core's by identity)."""
        self._alarms: dict[str, tuple[int, int]] = {}
        """The (severity, status) each node's AlarmState shows."""
        self._max = max_pending
        self._wake = asyncio.Event()
        self._subscription: Callback | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Subscribe to the database and start draining (call with the nodes holding current readings)."""
        self._subscription = self.db.subscribe(self._on_update, mask=EventMask.VALUE | EventMask.ALARM)
        read = self.db.read
        for name, node in self.nodes.items():
            reading = self._shown[name] = read(name)
            self._alarms[name] = (reading.severity, reading.status)
            node.value.value_callback = functools.partial(self.current, node)
        self._task = supervise("opcua-publisher", self._drain, backoff=Backoff(0.05, 5.0)).task  # restarted if it fails

    async def stop(self) -> None:
        """Unsubscribe and stop the drain task."""
        if self._subscription is not None:
            self.db.unsubscribe(self._subscription)
            self._subscription = None
            for node in self.nodes.values():  # the nodes keep the last value they showed
                self.current(node)
                node.value.value_callback = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _on_update(self, update: Update) -> None:
        node = self.nodes.get(update.name)
        if node is None:  # not in the address space (none such today: the PV set is fixed at start)
            return
        reading = update.reading
        alarm = (reading.severity, reading.status)
        if node.alarm is not None and self._alarms.get(update.name) != alarm:
            self._alarms[update.name] = alarm
            self._store(node.alarm, alarm_state_value(reading))
        self._store(node.value, data_value(node.info, reading))
        self._shown[update.name] = reading

    def _store(self, attr: AttributeValue, dv: ua.DataValue) -> None:
        """Make ``dv`` the attribute's value and queue it for the monitored items watching it."""
        attr.value = dv
        if attr.datachange_callbacks:
            if len(self._queue) >= self._max:
                self._queue.popleft()
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 10_000 == 0:
                    log.warning("OPC UA clients fall behind: %d notifications dropped so far", self.dropped)
            self._queue.append((attr, dv))
            self._wake.set()

    def current(self, node: PVNode, _nodeid: ua.NodeId | None = None, _attr: ua.AttributeIds | None = None) -> ua.DataValue:
        """The node's Value as of the core's latest reading (asyncua's value callback of a PV node).

        Rebuilds the DataValue only if the core holds a newer reading than the node shows
        (one the deadband kept from the monitored items, or a scan of an unchanged value).
        """
        name = node.info.name
        reading = self.db.read(name)
        attr = node.value
        if self._shown.get(name) is not reading:
            attr.value = data_value(node.info, reading)
            self._shown[name] = reading
        return attr.value

    async def _drain(self) -> None:
        queue = self._queue
        clock = time.perf_counter
        while True:
            await self._wake.wait()
            self._wake.clear()
            slice_end = clock() + DRAIN_SLICE_S
            n = 0
            while queue:
                attr, dv = queue.popleft()
                for handle, callback in list(attr.datachange_callbacks.items()):
                    try:
                        await callback(handle, dv)
                    except Exception:  # one monitored item's failure must not stop the others
                        log.exception("OPC UA data change notification failed")
                n += 1
                if n % 32 == 0 and clock() > slice_end:
                    await asyncio.sleep(0)  # let the rest of the loop run (a write's answer among it)
                    slice_end = clock() + DRAIN_SLICE_S


_IMMUTABLE = (float, int, bool, str, bytes, type(None))


def _snapshot(dv: ua.DataValue) -> ua.DataValue:
    """What a monitored item must keep of a DataValue: itself when its leaves are immutable."""
    var = dv.Value
    value = var.Value if var is not None else None
    if type(value) in _IMMUTABLE:
        return dv
    if type(value) is list and all(type(x) in _IMMUTABLE for x in value):
        return dataclasses.replace(dv, Value=dataclasses.replace(var, Value=list(value)))
    return copy.deepcopy(dv)


def install_copy_fastpath() -> None:
    """Make asyncua's monitored items copy a DataValue only when copying protects something.

    Idempotent. Checked against the pinned asyncua: if the method it replaces changes,
    it leaves asyncua alone and says so.
    """
    cls: Any = monitored_item_service.MonitoredItemValues
    current = cls.set_current_datavalue
    if getattr(current, "_labctl", False):
        return
    code = current.__code__
    if "deepcopy" not in code.co_names or code.co_argcount != 2:
        log.warning("asyncua's MonitoredItemValues changed; keeping its deep copy of every notification")
        return

    def set_current_datavalue(self: Any, cur_val: ua.DataValue) -> None:
        self.old_dvalue = self.current_dvalue
        self.current_dvalue = _snapshot(cur_val)

    set_current_datavalue._labctl = True  # type: ignore[attr-defined]
    cls.set_current_datavalue = set_current_datavalue
