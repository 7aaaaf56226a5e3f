"""Errors of the historian::

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
