"""The historian: every archived PV change in SQLite or TimescaleDB, spooled while the database is away.

Modules, from the bottom up: :mod:`~server.historian.schema` (tables, encodings, upgrades),
:mod:`~server.historian.timescale` (TimescaleDB specifics), :mod:`~server.historian.backend`
(engines and error classes), :mod:`~server.historian.rollup` (aggregates and rollup cells),
:mod:`~server.historian.spool` (store-and-forward), :mod:`~server.historian.ingest` (the
batching worker), :mod:`~server.historian.query` (reads) and :mod:`~server.historian.service`
(the service and its async query API).
"""

from server.historian.errors import HistorianError, HistorianUnavailable, SchemaTooNew
from server.historian.query import Bucket, RawPage
from server.historian.service import Historian, HistorianService

__all__ = ["Bucket", "Historian", "HistorianError", "HistorianService", "HistorianUnavailable", "RawPage", "SchemaTooNew"]
