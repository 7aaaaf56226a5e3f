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

    Only valid samples count (severity below INVALID, a number present). An empty bucket
    has ``count == 0`` and None elsewhere. Values are floats whatever the PV's type.
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
