"""One instrument's life in the database: connect, scan, lose, reconnect.

An :class:`InstrumentLink` supervises one driver. It connects (with a timeout), then
runs one scan task per scan period, each reading all the channels of that period in one
batched ``driver.read`` call and posting the values with one timestamp. Any driver
error or timeout ends every scan task of the instrument, marks *its* PVs INVALID/COMM
(never a stale good-looking value), closes the driver and reconnects with exponential
backoff. Other instruments are untouched: each link is its own task.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from labctl.ioc.driver import Driver, readable
from labctl.ioc.errors import DriverError, DriverFault, DriverTimeout
from labctl.ioc.pv import PVInfo
from labctl.ioc.types import Status

from labctl.backoff import Backoff

log = logging.getLogger(__name__)

#: post(pv name, value, timestamp) and invalidate(pv names, status, message)
PostFn = Callable[[str, Any, float], None]
InvalidateFn = Callable[[Sequence[str], Status], None]


class InstrumentLink:
    """Supervises one driver: connection, periodic scans, reconnection with backoff."""

    def __init__(
        self,
        driver: Driver,
        pvs: Sequence[PVInfo],
        *,
        post: PostFn,
        invalidate: InvalidateFn,
        clock: Callable[[], float],
        timeout_s: float = 2.0,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
    ) -> None:
        self.driver = driver
        self.name = driver.name
        self.timeout_s = timeout_s
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.backoff = Backoff(reconnect_min_s, reconnect_max_s)
        """Delays between connection attempts (reset once connected)."""
        self.connected = False
        self.last_error: str = ""
        self.connects = 0
        """How many times the link has (re)connected."""
        self._post = post
        self._invalidate = invalidate
        self._clock = clock
        self._pv_names = [p.name for p in pvs]
        self._by_channel: dict[str, list[str]] = defaultdict(list)
        groups: dict[float, list[str]] = defaultdict(list)
        for p in pvs:
            assert p.channel is not None and p.scan_s is not None
            if p.channel not in self._by_channel and readable(driver, p.channel):
                groups[p.scan_s].append(p.channel)
            self._by_channel[p.channel].append(p.name)
        self._groups = dict(groups)
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected_event = asyncio.Event()
        driver.bind_push(self._on_push)

    # ---- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start supervising (connect, scan) in a task of the running loop."""
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name=f"instrument {self.name}")

    async def stop(self) -> None:
        """Stop scanning and close the driver."""
        task, self._task = self._task, None
        if task is not None:
            while not task.done():  # cancel until it takes: a driver may swallow one cancellation
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
        await self._close()

    async def wait_connected(self, timeout_s: float) -> None:
        """Wait until the link is connected (raises TimeoutError)."""
        await asyncio.wait_for(self._connected_event.wait(), timeout_s)

    async def _run(self) -> None:
        self.backoff.reset()
        while True:
            try:
                await self._call(self.driver.connect(), "connect")
            except DriverError as e:
                self._lost(e, "cannot connect")
                await asyncio.sleep(self.backoff.next())
                continue
            self.connected = True
            self.connects += 1
            self._connected_event.set()
            if self.last_error:
                log.info("%s: connected again", self.name)
            else:
                log.info("%s: connected", self.name)
            self.last_error = ""
            self.backoff.reset()
            try:
                await self._scan_all()
            except DriverError as e:
                self._lost(e, "lost")
            finally:
                self.connected = False
                self._connected_event.clear()
                await self._close()
            await asyncio.sleep(self.backoff.next())

    def _lost(self, error: DriverError, what: str) -> None:
        message = str(error)
        if message != self.last_error:  # one log line per new failure, not per retry
            log.warning("%s: %s: %s; its PVs are INVALID/COMM, retrying", self.name, what, message)
        self.last_error = message
        self._invalidate(self._pv_names, Status.COMM)

    async def _close(self) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.driver.close()
        except (DriverError, TimeoutError, OSError) as e:
            log.debug("%s: close failed: %s", self.name, e)

    # ---- scanning --------------------------------------------------------------------

    async def _scan_all(self) -> None:
        tasks = [asyncio.create_task(self._scan(period, chans)) for period, chans in self._groups.items()]
        if not tasks:
            await asyncio.Event().wait()  # nothing to scan: stay connected until stopped
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _scan(self, period: float, channels: list[str]) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            await self.read(channels)
            due += period
            now = loop.time()
            if due < now:  # overran: skip the missed periods rather than bursting
                due = now
            await asyncio.sleep(due - now)

    async def read(self, channels: Sequence[str]) -> dict[str, Any]:
        """Read channels once and post their values; raise DriverError on failure."""
        values = await self._call(self.driver.read(channels), f"read {', '.join(channels)}", len(channels))
        ts = self._clock()
        for ch in channels:
            names = self._by_channel.get(ch, ())
            if ch in values:
                for name in names:
                    self._post(name, values[ch], ts)
            else:
                log.warning("%s: driver returned no value for channel %s", self.name, ch)
                self._invalidate(names, Status.READ)
        return values

    async def write(self, channel: str, value: Any) -> Any:
        """Write a channel; return the read-back (None if the driver gives none)."""
        if not self.connected:
            detail = f": {self.last_error}" if self.last_error else ""
            raise DriverFault(self.name, f"not connected (reconnecting){detail}")
        return await self._call(self.driver.write(channel, value), f"write {channel}")

    async def _call(self, aw: Any, what: str, n: int = 1) -> Any:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that arrives as the call completes, and the link would then never stop.
        limit = self.timeout_s * max(1, n) + 0.5
        try:
            async with asyncio.timeout(limit):
                return await aw
        except TimeoutError:
            raise DriverTimeout(self.name, f"{what}: no answer within {limit:.1f} s") from None

    # ---- push ------------------------------------------------------------------------

    def _on_push(self, channel: str, value: Any, timestamp: float | None) -> None:
        if self._loop is not None and threading.get_ident() != getattr(self._loop, "_thread_id", None):
            self._loop.call_soon_threadsafe(self._deliver_push, channel, value, timestamp)
        else:
            self._deliver_push(channel, value, timestamp)

    def _deliver_push(self, channel: str, value: Any, timestamp: float | None) -> None:
        ts = timestamp if timestamp is not None else self._clock()
        for name in self._by_channel.get(channel, ()):
            self._post(name, value, ts)

