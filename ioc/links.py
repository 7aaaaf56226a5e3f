"""One instrument's life in the database: connect, scan, lose, reconnect.

An :class:`InstrumentLink` supervises one driver. It connects (with a timeout), then
runs one scan task per scan period, each reading all the channels of that period in one
batched ``driver.read`` call and posting the values with one timestamp. Any driver
error or timeout ends every scan task of the instrument, marks *its* PVs INVALID/COMM
(never a stale good-looking value), closes the driver and reconnects with exponential
backoff. Other instruments are untouched: each link is its own task.

A driver is expected to fail with :class:`~labctl.ioc.errors.DriverError`. Anything else
escaping it -- a ``ZeroDivisionError`` in ``read``, a ``KeyError`` on an answer it did not
expect, a wrong return type -- is a driver bug, and it is treated as a failed link too,
never as the end of the link: the call raises :class:`~labctl.ioc.errors.DriverFailed`
(chained to the original exception), the instrument's PVs go INVALID/READ ("the driver
could not produce a reading"), the traceback is logged once per distinct failure (not
once per retry), and the link closes the driver and reconnects with backoff. A bug met by
a write or a read-back outside the scan (:meth:`InstrumentLink.write`,
:meth:`InstrumentLink.read` from the write path) restarts the link the same way.

The backoff starts again from its shortest delay only once the instrument has produced a
reading, not merely connected, so a driver that connects and then fails at every read is
retried at the backoff's pace rather than in a tight loop; the same goes for the log: the
failure is reported once, and "reading again" once it recovers.

The link's own task runs under a :class:`~labctl.supervision.Supervisor` as a last resort:
if the link's code itself fails (not the driver's), the traceback is logged once, the PVs
go INVALID/READ and the link starts again with backoff. Nothing ends silently.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from labctl.ioc.driver import Driver, readable
from labctl.ioc.errors import DriverError, DriverFailed, DriverFault, DriverTimeout
from labctl.ioc.pv import PVInfo
from labctl.ioc.types import Status

from labctl.backoff import Backoff
from labctl.supervision import Supervisor

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
        """Why the link failed last ("" once the instrument reads again)."""
        self.connects = 0
        """How many times the link has (re)connected."""
        self.failures = 0
        """How many times the link was lost (driver errors, timeouts and driver bugs)."""
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
        self._supervisor: Supervisor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected_event = asyncio.Event()
        self._broken: asyncio.Future[None] | None = None
        """Set by a driver bug met outside the scan tasks (a write, a read-back): restarts the link."""
        self._push_errors: set[str] = set()
        driver.bind_push(self._on_push)

    # ---- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start supervising (connect, scan) in a task of the running loop."""
        self._loop = asyncio.get_running_loop()
        self._supervisor = Supervisor(
            f"instrument {self.name}",
            self._run,
            backoff=Backoff(self.reconnect_min_s, self.reconnect_max_s),
            on_failure=self._crashed,
            logger=log,
        )
        self._supervisor.start()

    async def stop(self) -> None:
        """Stop scanning and close the driver."""
        sup, self._supervisor = self._supervisor, None
        if sup is not None:
            await sup.stop()  # cancels until it takes: a driver may swallow one cancellation
        await self._close()

    @property
    def running(self) -> bool:
        """Whether the link's task is alive (started and not stopped)."""
        return self._supervisor is not None and self._supervisor.running

    async def wait_connected(self, timeout_s: float) -> None:
        """Wait until the link is connected (raises TimeoutError)."""
        await asyncio.wait_for(self._connected_event.wait(), timeout_s)

    async def _run(self) -> None:
        try:
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
                if self.connects == 1:
                    log.info("%s: connected", self.name)
                elif not self.last_error:
                    log.info("%s: connected again", self.name)
                else:  # "reading again" follows once data flows; one line per failure is enough
                    log.debug("%s: connected again", self.name)
                if not self._groups:
                    self._healthy()
                try:
                    await self._scan_all()
                except DriverError as e:
                    self._lost(e, "lost")
                finally:
                    self.connected = False
                    self._connected_event.clear()
                    await self._close()
                await asyncio.sleep(self.backoff.next())
        finally:
            self.connected = False
            self._connected_event.clear()

    def _crashed(self, error: BaseException) -> None:
        """The link's own task failed (a bug here, not in the driver): the supervisor logged it."""
        self.failures += 1
        self.last_error = f"internal error: {type(error).__name__}: {error}"
        self._invalidate(self._pv_names, Status.READ)

    def _healthy(self) -> None:
        """The instrument produced a reading (or has nothing to read): start the backoff again."""
        if self.last_error:
            log.info("%s: reading again after %s", self.name, self.last_error)
            self.last_error = ""
        self.backoff.reset()
        if self._supervisor is not None:
            self._supervisor.healthy()

    def _lost(self, error: DriverError, what: str) -> None:
        message = str(error)
        self.failures += 1
        if message != self.last_error:  # one log line (one traceback) per new failure, not per retry
            if isinstance(error, DriverFailed):
                log.error(
                    "%s: %s: %s; its PVs are INVALID/READ, retrying", self.name, what, message, exc_info=error.__cause__ or error
                )
            else:
                log.warning("%s: %s: %s; its PVs are INVALID/COMM, retrying", self.name, what, message)
        self.last_error = message
        self._invalidate(self._pv_names, Status.READ if isinstance(error, DriverFailed) else Status.COMM)

    def _fault(self, error: DriverError) -> None:
        """A driver bug met outside the scan tasks: end this connection so the link starts again."""
        if isinstance(error, DriverFailed) and self._broken is not None and not self._broken.done():
            self._broken.set_exception(error)

    async def _close(self) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.driver.close()
        except (DriverError, TimeoutError, OSError) as e:
            log.debug("%s: close failed: %s", self.name, e)

    # ---- scanning --------------------------------------------------------------------

    async def _scan_all(self) -> None:
        self._broken = asyncio.get_running_loop().create_future()
        tasks = [asyncio.create_task(self._scan(period, chans)) for period, chans in self._groups.items()]
        try:
            done, _ = await asyncio.wait([*tasks, self._broken], return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            broken, self._broken = self._broken, None
            if broken.done():
                broken.exception()  # retrieved (raised above, or a scan task's failure came first)
            else:
                broken.cancel()
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
        """Read channels once and post their values; raise DriverError on failure.

        A driver bug (:class:`~labctl.ioc.errors.DriverFailed`) also restarts the link.
        """
        try:
            values = await self._call(self.driver.read(channels), f"read {', '.join(channels)}", len(channels))
            if not isinstance(values, Mapping):
                raise DriverFailed(self.name, f"read {', '.join(channels)}: returned {type(values).__name__}, not a mapping")
        except DriverError as e:
            self._fault(e)
            raise
        ts = self._clock()
        for ch in channels:
            names = self._by_channel.get(ch, ())
            if ch in values:
                for name in names:
                    self._post(name, values[ch], ts)
            else:
                log.warning("%s: driver returned no value for channel %s", self.name, ch)
                self._invalidate(names, Status.READ)
        if self.connected and (self.last_error or self.backoff.attempt) and any(ch in values for ch in channels):
            self._healthy()
        return dict(values)

    async def write(self, channel: str, value: Any) -> Any:
        """Write a channel; return the read-back (None if the driver gives none).

        A driver bug (:class:`~labctl.ioc.errors.DriverFailed`) also restarts the link.
        """
        if not self.connected:
            detail = f": {self.last_error}" if self.last_error else ""
            raise DriverFault(self.name, f"not connected (reconnecting){detail}")
        try:
            return await self._call(self.driver.write(channel, value), f"write {channel}")
        except DriverError as e:
            self._fault(e)
            raise

    async def _call(self, aw: Any, what: str, n: int = 1) -> Any:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that arrives as the call completes, and the link would then never stop.
        limit = self.timeout_s * max(1, n) + 0.5
        try:
            async with asyncio.timeout(limit):
                return await aw
        except TimeoutError:
            raise DriverTimeout(self.name, f"{what}: no answer within {limit:.1f} s") from None
        except DriverError:
            raise
        except Exception as e:  # a driver bug: a failed link like any other, with its traceback kept
            raise DriverFailed(self.name, f"{what}: driver failed: {type(e).__name__}: {e}") from e

    # ---- push ------------------------------------------------------------------------

    def _on_push(self, channel: str, value: Any, timestamp: float | None) -> None:
        if self._loop is not None and threading.get_ident() != getattr(self._loop, "_thread_id", None):
            self._loop.call_soon_threadsafe(self._deliver_push, channel, value, timestamp)
        else:
            self._deliver_push(channel, value, timestamp)

    def _deliver_push(self, channel: str, value: Any, timestamp: float | None) -> None:
        try:
            ts = timestamp if timestamp is not None else self._clock()
            for name in self._by_channel.get(channel, ()):
                self._post(name, value, ts)
        except Exception as e:  # runs from the loop's callbacks: nobody else would report it
            signature = f"{type(e).__name__}: {e}"
            if signature not in self._push_errors:
                self._push_errors.add(signature)
                log.error("%s: posting a pushed value of %s failed", self.name, channel, exc_info=e)
            self._invalidate(self._by_channel.get(channel, ()), Status.READ)

