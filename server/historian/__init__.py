"""The historian: every archived PV change in SQLite or TimescaleDB, spooled while the database is away.

Modules, from the bottom up: :mod:`~labctl.server.historian.encoding` (value and time encodings),
:mod:`~labctl.server.historian.schema` (tables, upgrades), :mod:`~labctl.server.historian.catalogue` (the PV
catalogue), :mod:`~labctl.server.historian.timescale` (TimescaleDB specifics), :mod:`~labctl.server.historian.backend`
(engines and error classes), :mod:`~labctl.server.historian.rollup` (aggregates and rollup cells),
:mod:`~labctl.server.historian.spool` (store-and-forward), :mod:`~labctl.server.historian.ingest` (the
batching worker), :mod:`~labctl.server.historian.query` (reads) and :mod:`~labctl.server.historian.service`
(the service and its async query API). Beside them, in a site's PostgreSQL database:
:mod:`~labctl.server.historian.directory` (the site directory's tables: servers, PV owners,
accounts) and :mod:`~labctl.server.historian.accounts` (account changes, audited).
"""

from labctl.server.archive import Bucket, HistorianError, HistorianUnavailable, SchemaTooNew
from labctl.server.historian.query import RawPage
from labctl.server.historian.service import Historian, HistorianService

__all__ = ["Bucket", "Historian", "HistorianError", "HistorianService", "HistorianUnavailable", "RawPage", "SchemaTooNew"]
