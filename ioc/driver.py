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
* A channel the instrument answers for but cannot measure now -- a source-meter's
  measured voltage while its output is off, a gauge switched off -- is not a fault of the
  link and not a value either: the driver returns a :class:`NoReading` for it (never a
  NaN standing for "nothing"), and the database posts it as INVALID with the status the
  driver gives (``DISABLE`` for a channel switched off), keeping the PV's last value
  (:func:`labctl.ioc.pv.held_value`). Derived PVs computed from it go INVALID too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from labctl.ioc.types import Status

#: push(channel, value, timestamp or None)
PushCallback = Callable[[str, Any, "float | None"], None]


@dataclass(frozen=True, slots=True)
class NoReading:
    """What a driver returns, in place of a value, for a channel that has no reading now.

    The database posts it as an INVALID reading with ``status`` and the PV's last value
    (a PV that never had one shows its type's zero, as an EPICS record that never
    processed shows VAL 0), so a client sees severity INVALID, status DISABLE (OPC UA
    ``BadOutOfService``) rather than a NaN that looks like a measurement.
    """

    status: Status = Status.DISABLE
    """Why there is no reading: ``DISABLE`` (the channel is switched off), ``READ`` (the sensor failed)..."""
    reason: str = ""
    """What a person reads: ``output off``, ``sensor off``."""

    def __post_init__(self) -> None:
        if self.status is Status.NO_ALARM:
            raise ValueError("a NoReading needs a status that says why (DISABLE, READ...), not NO_ALARM")


def disabled(reason: str = "") -> NoReading:
    """The reading of a channel that is switched off: INVALID/DISABLE."""
    return NoReading(Status.DISABLE, reason)


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
        """Read several channels at once; return channel -> value (python types) or :class:`NoReading`."""
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
