"""The interface between the process database and an instrument.

A driver knows one instrument model. It is created from its
:class:`~labctl.ioc.config.instruments.InstrumentConfig` and speaks in *channels*: strings the driver
defines (``temperature:A``, ``voltage_setpoint``...) to which the site file binds PVs.
The database owns scanning, timeouts, reconnection and alarm state; a driver only turns
channel reads and writes into instrument I/O.

Rules every driver keeps:

* ``read`` is batched: one call fills several channels, so a driver may answer them
  with one instrument query where the protocol allows.
* Failures raise :class:`~labctl.ioc.errors.DriverFault` or :class:`~labctl.ioc.errors.DriverTimeout`;
  the database then marks that instrument's PVs INVALID/COMM and reconnects with backoff.
* Blocking I/O never runs on the event loop (the VISA transport uses a worker thread).
* A driver that can push values (an instrument that streams) calls the ``push``
  callback given to :meth:`Driver.bind_push`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

#: push(channel, value, timestamp or None)
PushCallback = Callable[[str, Any, "float | None"], None]


@runtime_checkable
class Driver(Protocol):
    """What the database needs from an instrument driver."""

    name: str
    """The instrument name from the site file."""

    def channels(self) -> Sequence[str]:
        """The channels this driver serves (used to validate the site file's bindings)."""
        ...

    async def connect(self) -> None:
        """Open the link and check the instrument answers (raise DriverError if not)."""
        ...

    async def read(self, channels: Sequence[str]) -> dict[str, Any]:
        """Read several channels at once; return channel -> value (python types)."""
        ...

    async def write(self, channel: str, value: Any) -> Any:
        """Write one channel; return the read-back value, or None if the channel has none."""
        ...

    async def close(self) -> None:
        """Close the link. Must not raise; may be called on a link that already failed."""
        ...

    def bind_push(self, push: PushCallback) -> None:
        """Receive the callback for values the instrument pushes (may ignore it)."""
        ...


def readable(driver: Driver, channel: str) -> bool:
    """Whether a channel can be read; a driver may define ``readable(channel)`` for write-only ones."""
    check = getattr(driver, "readable", None)
    return True if check is None else bool(check(channel))
