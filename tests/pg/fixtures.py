"""Pytest fixtures for throwaway PostgreSQL clusters (:mod:`tests.pg.cluster`).

Declare the plugin once in ``tests/conftest.py`` (``tests`` is a package)::

    pytest_plugins = ["tests.pg.fixtures"]

which provides these fixtures:

``pg_cluster`` (session)
    the shared :class:`~tests.pg.cluster.PgCluster`; ``.url`` is
    ``postgresql+psycopg://postgres@127.0.0.1:<port>/labctl_test``, ``.conninfo()`` the
    libpq string for psycopg. TimescaleDB is preloaded when installed; tests that need it
    use the fixtures below, which turn its absence into a skip (locally) or failure (CI).
``timescaledb_cluster`` (session)
    the same cluster, but requires TimescaleDB: skips locally with the command to run,
    FAILS under ``CI=true``.
``pg_database`` / ``timescaledb_database`` (function)
    a fresh database on that cluster per test (with the ``timescaledb`` extension created
    for the latter), as a :class:`~tests.pg.cluster.PgDatabase` (``.url``, ``.conninfo``,
    ``.name``); dropped after.
``pg_cluster_factory`` (function)
    ``factory(**kwargs) -> PgCluster``: a private, started cluster for tests that stop and
    restart the server (database outage tests); all are removed after the test.

For anything else: ``from tests.pg.cluster import PgCluster`` and ``from
tests.pg.availability import require_timescaledb, timescaledb_available``.

(PYTEST_DONT_REWRITE: this module has no assertions; the marker lets a conftest or test
module import it before or after it is declared in ``pytest_plugins`` without pytest's
"already imported so cannot be rewritten" warning, which the suite turns into an error.)
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator

import pytest

from tests.pg.availability import INSTALL_TIMESCALEDB, require_postgres, require_timescaledb, skip_or_fail
from tests.pg.cluster import PgCluster, PgDatabase

_db_counter = itertools.count(1)


def _db_name(request: pytest.FixtureRequest) -> str:
    stem = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")
    return f"t{next(_db_counter)}_{stem}"[:63]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """Session-wide throwaway PostgreSQL 15 cluster (TimescaleDB preloaded when installed)."""
    require_postgres()
    with PgCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def timescaledb_cluster(pg_cluster: PgCluster) -> PgCluster:
    """``pg_cluster``, requiring TimescaleDB: skip locally / FAIL under CI=true when missing."""
    require_timescaledb()
    if not pg_cluster.timescaledb:  # pragma: no cover - installed after the session started
        skip_or_fail(f"TimescaleDB was installed after the test cluster started; re-run. ({INSTALL_TIMESCALEDB})")
    return pg_cluster


@pytest.fixture
def pg_database(pg_cluster: PgCluster, request: pytest.FixtureRequest) -> Iterator[PgDatabase]:
    """A fresh, empty database on ``pg_cluster`` for one test (``.url``, ``.conninfo``)."""
    pg_cluster.start()  # a previous test may have stopped it
    db = pg_cluster.create_database(_db_name(request))
    yield db
    if pg_cluster.is_running():
        pg_cluster.drop_database(db.name)


@pytest.fixture
def timescaledb_database(timescaledb_cluster: PgCluster, request: pytest.FixtureRequest) -> Iterator[PgDatabase]:
    """A fresh database with the timescaledb extension created, for one test."""
    timescaledb_cluster.start()
    db = timescaledb_cluster.create_database(_db_name(request), timescaledb=True)
    yield db
    if timescaledb_cluster.is_running():
        timescaledb_cluster.drop_database(db.name)


@pytest.fixture
def pg_cluster_factory() -> Iterator[Callable[..., PgCluster]]:
    """``factory(**PgCluster kwargs)`` -> a started private cluster, removed after the test.
    For tests that stop/restart the server. ``timescaledb=True`` skips/fails like
    ``timescaledb_cluster`` when it is missing."""
    require_postgres()
    clusters: list[PgCluster] = []

    def factory(**kwargs: object) -> PgCluster:
        if kwargs.get("timescaledb"):
            require_timescaledb()
        cluster = PgCluster(**kwargs)  # type: ignore[arg-type]
        clusters.append(cluster)
        return cluster.start()

    yield factory
    for cluster in clusters:
        cluster.cleanup()
