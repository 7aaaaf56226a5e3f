"""What the rest of the server may know of the archive: processed-history buckets and the archive's errors.

The historian (:mod:`labctl.server.historian`) archives and answers history queries; the
protocol adapters serve those answers (OPC UA HistoryRead) without depending on the
historian's internals: they see the shape of an answer (:class:`Bucket`) and its errors,
defined here, and the query methods of the historian service they are handed.

Errors::

    LabctlError                         (ioc.errors)
    ├── UnknownPV                       no PV (live or archived) has that name
    └── HistorianError                  the historian cannot do what was asked
        ├── HistorianUnavailable        its database is unreachable right now (samples are spooled)
        └── SchemaTooNew                the database was created by a newer labctl

``HistorianError`` itself means *the request was wrong* (a bad URL, an interval of zero,
processed history of a string PV); ``HistorianUnavailable`` means *the peer is away* and
the same request may succeed later.
"""

from __future__ import annotations

from dataclasses import dataclass

from labctl.ioc.errors import LabctlError
from labctl.ioc.types import Severity, Status


class HistorianError(LabctlError):
    """The historian cannot do what was asked; the message says why."""


class HistorianUnavailable(HistorianError):
    """The historian's database cannot be reached now; try again later."""


class SchemaTooNew(HistorianError):
    """The database's schema version is newer than this labctl understands."""

    def __init__(self, found: int, supported: int) -> None:
        self.found = found
        self.supported = supported
        super().__init__(
            f"the historian database has schema version {found}, but this labctl supports up to {supported}; "
            "upgrade labctl (or point historian.url at another database)"
        )


@dataclass(frozen=True, slots=True)
class Bucket:
    """The aggregates of one processing interval ``[start, end)`` (seconds since the epoch).

    ``count`` ... ``last_time`` summarise the valid samples *inside* the interval (severity
    below INVALID, a number present; OPC UA's Count, Minimum, Maximum, Average, Start and
    End): a bucket without one has ``count == 0`` and None there. Values are floats
    whatever the PV's type.

    The *held* fields (filled only when a read asks for them, ``held=True``) follow the
    archive's history semantics: a value holds until the next sample (zero-order hold,
    OPC UA "stepped"). ``held`` is the value in force at the interval's start (the last
    sample at or before it, with its time, severity and status), ``time_mean`` the mean
    weighted by how long each value held within the interval, counting only the time with
    a valid value (``valid_time`` seconds), and ``severity``/``status`` the bucket's
    quality: INVALID only when the PV had no valid value at any moment of the interval
    (status UDF when nothing was known, else the INVALID reading's status), otherwise the
    worst alarm severity of the valid values in force.
    """

    start: float
    end: float
    count: int
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    first: float | None = None
    last: float | None = None
    first_time: float | None = None
    last_time: float | None = None
    held: float | None = None
    """The value in force at ``start`` (None: INVALID there, or nothing archived before)."""
    held_time: float | None = None
    """The time of the sample that set ``held`` (None: nothing archived at or before ``start``)."""
    held_severity: Severity | None = None
    """Severity of the reading in force at ``start`` (None: unknown)."""
    held_status: Status | None = None
    """Status of the reading in force at ``start`` (None: unknown)."""
    time_mean: float | None = None
    """The time-weighted mean over the valid part of the interval (None: no valid value in it)."""
    valid_time: float = 0.0
    """Seconds of the interval during which the PV had a valid value."""
    severity: Severity | None = None
    """The bucket's quality (see above); None when the held fields were not asked for."""
    status: Status | None = None
    """The status going with ``severity``."""
