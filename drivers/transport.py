"""Transports: how a driver's command strings reach an instrument and the replies come back.

Theory of operation
-------------------
A driver never touches pyvisa. It speaks command strings through a :class:`Transport`,
which owns the link and keeps three promises:

* **Serialised and paired.** Each transport has one :class:`asyncio.Lock`. A query's
  write and read happen under it, so no task can slip a command between another
  task's write and read. A driver that needs several exchanges to stay together (a
  batched read, a write and its read-back, the Pfeiffer ACK/ENQ hand-shake) holds
  :meth:`Transport.locked` around them; the lock is re-entrant for the task that holds
  it, so the individual calls inside do not deadlock.
* **Never blocks the event loop.** :class:`VisaTransport` runs every pyvisa call in
  its own one-thread executor -- a VISA resource must not be used from two threads
  (pyvisa #726, #842) -- awaited under ``asyncio.timeout(timeout_s)``. Not
  ``asyncio.wait_for``: on Python 3.11 it waits through a future of its own, one more
  turn of the event loop before the answer reaches the caller (under a fan-out load a turn
  is milliseconds, and a write makes several). The VISA timeout is set a little shorter
  than ``timeout_s`` so the worker thread itself gives up and is free for the next call.
* **Typed failures.** pyvisa errors become :class:`~labctl.ioc.errors.DriverFault`, timeouts
  :class:`~labctl.ioc.errors.DriverTimeout`; both name the instrument and the command.

Implementations:

* :class:`VisaTransport` -- a real (``@py``, ``@ivi``) or pyvisa-sim (``@sim``)
  resource.
* :class:`SimulationTransport` -- answers from a Python object with
  ``handle(command) -> str | None`` (a simulated plant such as
  :class:`labctl.drivers.cryostat.CryostatPlant`); no threads.
* :class:`FaultyTransport` -- wraps another transport and, on demand, stops answering
  (every call raises DriverTimeout), like httpx's ``MockTransport``: an injected fault
  for tests and for the demo.

A timed-out or failed VISA exchange can leave a late reply in the instrument's output
buffer, which the next query would read as its own answer. :class:`VisaTransport`
therefore marks itself *dirty* after any failure -- and when a driver reports, through
:meth:`Transport.mark_unsynchronized`, that a reply did not fit its query -- and drains
stale input before its next exchange.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pyvisa
import pyvisa.constants
import pyvisa.errors
from labctl.ioc.errors import DriverFault, DriverTimeout

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The VISA timeout is this fraction of the transport's timeout, so the worker thread
#: returns on its own shortly after the transport's timeout has given up.
VISA_TIMEOUT_FRACTION = 0.8
#: VISA timeout while draining stale replies: long enough for bytes already sent.
DRAIN_TIMEOUT_MS = 20
#: At most this many stale messages are discarded in one drain.
DRAIN_MAX_MESSAGES = 16


class Transport(abc.ABC):
    """A link to one instrument: paired, serialised, asynchronous command I/O.

    Subclasses implement :meth:`open`, :meth:`close`, :meth:`_query` and
    :meth:`_write`; callers use
    :meth:`query`, :meth:`write` and :meth:`locked`.

    Args:
        instrument: The instrument name (it starts every error message).
        timeout_s: How long one exchange may take before DriverTimeout.
    """

    def __init__(self, instrument: str, *, timeout_s: float = 2.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self.instrument = instrument
        self.timeout_s = timeout_s
        self._lock = asyncio.Lock()
        self._holder: asyncio.Task[Any] | None = None

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """Hold the link for a sequence of exchanges (re-entrant for the holding task)."""
        task = asyncio.current_task()
        if task is not None and self._holder is task:
            yield
            return
        async with self._lock:
            self._holder = task
            try:
                yield
            finally:
                self._holder = None

    @abc.abstractmethod
    async def open(self) -> None:
        """Open the link (idempotent)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the link. Never raises; closing a closed link does nothing."""

    def mark_unsynchronized(self) -> None:  # noqa: B027 -- optional: only links with a receive buffer act on it
        """Say that replies may be out of step (a reply did not fit its query).

        The default does nothing; a link with a receive buffer discards stale input
        before its next exchange.
        """

    async def query(self, command: str, *, raw: bool = False) -> str:
        """Send ``command`` and return the reply without its termination.

        Args:
            command: The command text.
            raw: Send the text without the write termination (a bare control
                character such as the Pfeiffer ENQ).

        Raises:
            DriverFault: the link failed.
            DriverTimeout: no reply within ``timeout_s``.
        """
        async with self.locked():
            return await self._query(command, raw)

    async def write(self, command: str) -> None:
        """Send ``command``; no reply is read.

        Raises:
            DriverFault: the link failed.
            DriverTimeout: the write did not complete within ``timeout_s``.
        """
        async with self.locked():
            await self._write(command)

    async def write_then_query(self, command: str, query: str) -> str:
        """Send ``command``, then ``query``, and return the query's reply (a write and its read-back).

        The same as :meth:`write` then :meth:`query` under one hold of the lock; a link
        with an I/O thread does both in one turn of that thread, so a write with a
        read-back hands over to the thread (and waits for the GIL there and back) once,
        not twice.

        Raises:
            DriverFault: the link failed.
            DriverTimeout: no reply within ``timeout_s``.
        """
        async with self.locked():
            return await self._write_then_query(command, query)

    async def _write_then_query(self, command: str, query: str) -> str:
        await self._write(command)
        return await self._query(query, False)

    @abc.abstractmethod
    async def _query(self, command: str, raw: bool) -> str:
        """Do one query; the caller holds the lock."""

    @abc.abstractmethod
    async def _write(self, command: str) -> None:
        """Do one write; the caller holds the lock."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.instrument}>"


# ---- VISA ---------------------------------------------------------------------------


class VisaTransport(Transport):
    """A pyvisa resource driven from its own one-thread executor.

    Args:
        instrument: The instrument name.
        resource_name: The VISA resource (``TCPIP0::10.0.0.5::7777::SOCKET``...).
        library: ``@py``, ``@ivi``, ``@sim`` or None (pyvisa's default).
        sim_file: The pyvisa-sim definition file (required with ``@sim``).
        timeout_s: How long one exchange may take.
        write_termination: Appended to every command.
        read_termination: Ends every reply (and is stripped).
        serial: Attributes set on serial (``ASRL``) resources only, e.g.
            ``{"baud_rate": 57600, "data_bits": 7, "parity": Parity.odd}``.
        encoding: Text encoding of commands and replies.
    """

    def __init__(
        self,
        instrument: str,
        resource_name: str,
        *,
        library: str | None = None,
        sim_file: str | Path | None = None,
        timeout_s: float = 2.0,
        write_termination: str = "\r\n",
        read_termination: str = "\r\n",
        serial: Mapping[str, Any] | None = None,
        encoding: str = "ascii",
    ) -> None:
        super().__init__(instrument, timeout_s=timeout_s)
        if library == "@sim" and sim_file is None:
            raise ValueError(f"{instrument}: a '@sim' resource needs a pyvisa-sim definition file")
        self.resource_name = resource_name
        self.library = library
        self.sim_file = Path(sim_file) if sim_file is not None else None
        self.write_termination = write_termination
        self.read_termination = read_termination
        self.serial = dict(serial or {})
        self.encoding = encoding
        self.visa_timeout_ms = max(1, int(timeout_s * 1000 * VISA_TIMEOUT_FRACTION))
        self._io: ThreadPoolExecutor | None = None
        self._resource: Any = None
        self._dirty = False

    @property
    def simulated(self) -> bool:
        """Whether this is a pyvisa-sim resource."""
        return self.library == "@sim"

    @property
    def is_open(self) -> bool:
        """Whether the resource is open."""
        return self._resource is not None

    def mark_unsynchronized(self) -> None:
        """Discard stale replies before the next exchange."""
        self._dirty = True

    def _library_spec(self) -> str:
        if self.simulated:
            return f"{self.sim_file}@sim"
        return self.library or ""

    async def open(self) -> None:
        """Open the resource in the worker thread (idempotent).

        Raises:
            DriverFault: no VISA library, no such resource, or the resource refused.
            DriverTimeout: opening took longer than ``timeout_s``.
        """
        if self._resource is not None:
            return
        if self._io is None:
            self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"visa-{self.instrument}")
        self._resource = await self._run(f"opening {self.resource_name!r}", self._open_blocking, opening=True)

    def _open_blocking(self) -> Any:
        # The ResourceManager is shared per VISA library inside pyvisa (closing it would
        # close every other instrument's resource too), so we only ever close our
        # resource, never the manager.
        manager = pyvisa.ResourceManager(self._library_spec())
        resource = manager.open_resource(
            self.resource_name,
            read_termination=self.read_termination,
            write_termination=self.write_termination,
            timeout=self.visa_timeout_ms,
        )
        resource.encoding = self.encoding
        if resource.interface_type == pyvisa.constants.InterfaceType.asrl:
            for attribute, value in self.serial.items():
                setattr(resource, attribute, value)
        return resource

    async def close(self) -> None:
        """Close the resource and stop the worker thread. Never raises."""
        resource, io = self._resource, self._io
        self._resource, self._io = None, None
        if io is None:
            return
        if resource is not None:
            loop = asyncio.get_running_loop()
            try:
                # In the worker thread, after any call still running there.
                async with asyncio.timeout(self.timeout_s):
                    await loop.run_in_executor(io, self._close_blocking, resource)
            except TimeoutError:
                log.warning("%s: closing %s timed out; its worker thread is abandoned", self.instrument, self.resource_name)
        io.shutdown(wait=False, cancel_futures=True)

    def _close_blocking(self, resource: Any) -> None:
        try:
            resource.close()
        except (pyvisa.errors.Error, OSError) as e:
            # Closing a link that already failed: nothing left to save.
            log.info("%s: closing %s: %s", self.instrument, self.resource_name, e)

    async def _query(self, command: str, raw: bool) -> str:
        return await self._run(repr(command), self._query_blocking, command, raw)

    async def _write(self, command: str) -> None:
        await self._run(repr(command), self._write_blocking, command)

    async def _write_then_query(self, command: str, query: str) -> str:
        return await self._run(f"{command!r} then {query!r}", self._write_then_query_blocking, command, query)

    def _write_then_query_blocking(self, command: str, query: str) -> str:
        resource = self._ready()
        resource.write(command)
        return resource.query(query)

    def _query_blocking(self, command: str, raw: bool) -> str:
        resource = self._ready()
        # pyvisa-sim only acts on a message once its end-of-message arrives, so a raw
        # control character is terminated there; real instruments get the bare byte.
        if raw and not self.simulated:
            resource.write_raw(command.encode(self.encoding))
            return resource.read()
        return resource.query(command)

    def _write_blocking(self, command: str) -> None:
        self._ready().write(command)

    def _ready(self) -> Any:
        resource = self._resource
        if resource is None:
            raise pyvisa.errors.InvalidSession()
        if self._dirty:
            self._drain(resource)
            self._dirty = False
        return resource

    def _drain(self, resource: Any) -> None:
        """Discard replies left over from an exchange that failed or timed out."""
        saved = resource.timeout
        resource.timeout = DRAIN_TIMEOUT_MS
        try:
            for _ in range(DRAIN_MAX_MESSAGES):
                try:
                    stale = resource.read_raw()
                except pyvisa.errors.VisaIOError as e:
                    if e.error_code == pyvisa.constants.StatusCode.error_timeout:
                        break
                    raise
                log.warning("%s: discarded a stale reply %r", self.instrument, stale)
        finally:
            resource.timeout = saved

    async def _run(self, what: str, fn: Callable[..., T], *args: Any, opening: bool = False) -> T:
        io = self._io
        if io is None or (not opening and self._resource is None):
            raise DriverFault(self.instrument, f"{what}: the link is not open")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                return await loop.run_in_executor(io, fn, *args)
        except TimeoutError:
            self._dirty = True
            raise DriverTimeout(self.instrument, f"no answer to {what} within {self.timeout_s:g} s") from None
        except pyvisa.errors.VisaIOError as e:
            self._dirty = True
            if e.error_code == pyvisa.constants.StatusCode.error_timeout:
                raise DriverTimeout(
                    self.instrument, f"no answer to {what} within {self.visa_timeout_ms} ms (VISA timeout)"
                ) from None
            raise DriverFault(self.instrument, f"{what} failed: {e.description}") from e
        except pyvisa.errors.InvalidSession:
            raise DriverFault(self.instrument, f"{what}: the link is closed") from None
        except (pyvisa.errors.Error, OSError, ValueError) as e:
            # OSError: no VISA library or a socket error; ValueError: a malformed
            # resource name or a reply that does not decode.
            self._dirty = True
            raise DriverFault(self.instrument, f"{what} failed: {e}") from e

    def __repr__(self) -> str:
        return f"<VisaTransport {self.instrument} {self.resource_name} {self._library_spec() or 'default'}>"


# ---- simulation ---------------------------------------------------------------------


class Simulation(Protocol):
    """Something that answers instrument commands in-process."""

    def handle(self, command: str) -> str | None:
        """Act on ``command``; return the reply, or None if it has none.

        Raises ValueError (with the reason) for a command it does not accept.
        """
        ...


class SimulationTransport(Transport):
    """Answers from a Python simulation object; no threads, no termination characters.

    A query with no reply, a write that produces one, and a command the simulation
    refuses all raise DriverFault at once: a simulation that disagrees with its driver
    is a bug to see, not a timeout to wait for.

    Args:
        instrument: The instrument name.
        simulation: The object answering commands.
        timeout_s: Kept for :class:`FaultyTransport`, which waits this long when told
            to behave like a dead instrument.
    """

    def __init__(self, instrument: str, simulation: Simulation, *, timeout_s: float = 2.0) -> None:
        super().__init__(instrument, timeout_s=timeout_s)
        self.simulation = simulation
        self._open = False

    async def open(self) -> None:
        """Mark the link open."""
        self._open = True

    async def close(self) -> None:
        """Mark the link closed."""
        self._open = False

    def _handle(self, command: str) -> str | None:
        if not self._open:
            raise DriverFault(self.instrument, f"{command!r}: the link is not open")
        try:
            return self.simulation.handle(command)
        except ValueError as e:
            raise DriverFault(self.instrument, f"the simulation refused {command!r}: {e}") from None

    async def _query(self, command: str, raw: bool) -> str:
        reply = self._handle(command)
        if reply is None:
            raise DriverFault(self.instrument, f"the simulation has no reply to {command!r}")
        return reply

    async def _write(self, command: str) -> None:
        reply = self._handle(command)
        if reply is not None:
            raise DriverFault(self.instrument, f"the simulation replied {reply!r} to the write {command!r}")


# ---- fault injection ----------------------------------------------------------------


class FaultyTransport(Transport):
    """Wraps a transport; on demand it stops answering, like an instrument that died.

    While answering it passes everything through. After :meth:`stop_answering` every
    query and write waits (by default the transport's ``timeout_s``, as a dead
    instrument would make us wait) and raises DriverTimeout; :meth:`resume` brings it
    back. Opening and closing always pass through, so a reconnect "succeeds" and then
    fails at its first exchange, as with a real instrument that hangs.

    Args:
        inner: The transport to wrap.
        sleep: How to wait (tests pass a recorder instead of :func:`asyncio.sleep`).
    """

    def __init__(self, inner: Transport, *, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        super().__init__(inner.instrument, timeout_s=inner.timeout_s)
        self.inner = inner
        self._sleep = sleep
        self._stopped = False
        self._wait_s: float | None = None
        self.refused = 0
        """How many calls failed since the last :meth:`stop_answering`."""

    @property
    def answering(self) -> bool:
        """Whether calls pass through."""
        return not self._stopped

    def stop_answering(self, *, wait_s: float | None = None) -> None:
        """Make every call raise DriverTimeout.

        Args:
            wait_s: How long each call waits before raising: None for the
                transport's ``timeout_s`` (realistic), 0 to raise at once (tests).
        """
        if wait_s is not None and wait_s < 0:
            raise ValueError(f"wait_s must not be negative, got {wait_s!r}")
        self._stopped = True
        self._wait_s = wait_s
        self.refused = 0

    def resume(self) -> None:
        """Pass calls through again."""
        self._stopped = False

    def mark_unsynchronized(self) -> None:
        """Pass the hint to the wrapped transport."""
        self.inner.mark_unsynchronized()

    async def open(self) -> None:
        """Open the wrapped transport."""
        await self.inner.open()

    async def close(self) -> None:
        """Close the wrapped transport."""
        await self.inner.close()

    async def _fail(self, command: str) -> None:
        wait_s = self.timeout_s if self._wait_s is None else self._wait_s
        if wait_s > 0:
            await self._sleep(wait_s)
        self.refused += 1
        raise DriverTimeout(self.instrument, f"no answer to {command!r} within {self.timeout_s:g} s (injected fault)")

    async def _query(self, command: str, raw: bool) -> str:
        if self._stopped:
            await self._fail(command)
        return await self.inner.query(command, raw=raw)

    async def _write(self, command: str) -> None:
        if self._stopped:
            await self._fail(command)
        await self.inner.write(command)

    async def _write_then_query(self, command: str, query: str) -> str:
        if self._stopped:
            await self._fail(command)
        return await self.inner.write_then_query(command, query)

    def __repr__(self) -> str:
        state = "answering" if self.answering else "stopped"
        return f"<FaultyTransport {state} around {self.inner!r}>"
