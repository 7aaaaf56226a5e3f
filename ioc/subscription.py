"""Subscriptions to the process database.

Two kinds, both fed by :meth:`labctl.ioc.database.Database.post` with the updates whose
event bits they share -- changes past the monitor deadband (VALUE), past the archive
deadband (LOG), alarm changes (ALARM) -- never with a post that passed no deadband. What
a subscriber did not hear of is still current in :meth:`~labctl.ioc.database.Database.read`
(reads are never filtered), and :meth:`~labctl.ioc.database.Database.next_reading` waits
for the next post whatever it carries:

* **Callbacks** (:class:`Callback`) run inline on the event loop for every matching
  update. They are for the server's own consumers that must see every update and are
  fast: a protocol adapter handing the value to its library, the historian appending to
  its batch. A callback must not block or await; one that raises is logged and kept.
* **Monitors** (:class:`Monitor`) are async iterators with a bounded buffer that keeps
  the *latest* update per PV, as an EPICS IOC does under overload: a slow consumer loses
  intermediate values (counted in :attr:`Monitor.dropped`), never blocks the scan or the
  other subscribers, and never grows without bound (at most one pending update per PV).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass

from labctl.ioc.types import EventMask, Update

log = logging.getLogger(__name__)

_AND = int.__and__


@dataclass(eq=False)
class Callback:
    """A callback subscriber: ``fn(update)`` for updates whose mask shares a bit with ``mask``."""

    fn: Callable[[Update], None]
    mask: EventMask
    names: frozenset[str] | None
    closed: bool = False

    def __post_init__(self) -> None:
        self._bits = int(self.mask)

    def wants(self, update: Update) -> bool:
        """Whether this subscriber receives ``update``."""
        # int's own operator: IntFlag's costs a microsecond, and this runs per post and subscriber.
        return _AND(update.mask, self._bits) != 0 and (self.names is None or update.name in self.names)

    def deliver(self, update: Update) -> None:
        """Call the function; log (once per failure) and keep going if it raises."""
        try:
            self.fn(update)
        except Exception:  # a consumer's bug must not stop the scan or other consumers
            log.exception("subscriber %r failed on an update of %s", self.fn, update.name)


class Monitor:
    """An async iterator of updates, keeping only the latest pending update per PV."""

    def __init__(self, names: Collection[str] | None, mask: EventMask, on_close: Callable[[Monitor], None]) -> None:
        self.names = frozenset(names) if names is not None else None
        self.mask = mask
        self._bits = int(mask)
        self.dropped = 0
        """Updates replaced by a newer one before the consumer took them."""
        self._pending: dict[str, Update] = {}
        self._ready = asyncio.Event()
        self._closed = False
        self._on_close = on_close

    def wants(self, update: Update) -> bool:
        """Whether this monitor receives ``update``."""
        return _AND(update.mask, self._bits) != 0 and (self.names is None or update.name in self.names)

    def deliver(self, update: Update) -> None:
        """Queue ``update``, replacing a pending one of the same PV (masks are merged)."""
        old = self._pending.pop(update.name, None)
        if old is not None:
            self.dropped += 1
            update = Update(update.name, update.reading, update.mask | old.mask)
        self._pending[update.name] = update
        self._ready.set()

    def pending(self) -> int:
        """Updates waiting to be taken."""
        return len(self._pending)

    async def get(self) -> Update:
        """The next update (oldest PV first). Raises StopAsyncIteration once closed."""
        while not self._pending:
            if self._closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        name = next(iter(self._pending))
        return self._pending.pop(name)

    def get_nowait(self) -> list[Update]:
        """Take every pending update at once."""
        out = list(self._pending.values())
        self._pending.clear()
        return out

    def close(self) -> None:
        """Stop the subscription; a waiting consumer gets StopAsyncIteration."""
        if not self._closed:
            self._closed = True
            self._ready.set()
            self._on_close(self)

    def __aiter__(self) -> AsyncIterator[Update]:
        return self

    async def __anext__(self) -> Update:
        return await self.get()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Monitor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
