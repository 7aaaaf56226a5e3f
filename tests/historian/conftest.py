"""Fixtures of the historian tests: archive URLs for every backend, a running historian.

The databases are real: SQLite files in the test's temporary directory, and a fresh
database per test on throwaway PostgreSQL clusters of :mod:`tests.pg.cluster` (declared
once as a plugin by the top-level conftest) -- one with TimescaleDB preloaded, and one
without, for plain PostgreSQL.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from labctl.ioc.database import Database
from labctl.server.historian import Historian
from labctl.server.historian.config import HistorianConfig

from tests.historian.support import make_db
from tests.pg.availability import require_postgres
from tests.pg.cluster import PgCluster


@pytest.fixture(scope="session")
def plain_pg_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL cluster *without* TimescaleDB preloaded (the extension cannot be enabled)."""
    require_postgres()
    with PgCluster(timescaledb=False) as cluster:
        yield cluster


@pytest.fixture
def plain_pg_url(plain_pg_cluster: PgCluster) -> Iterator[str]:
    """A fresh database on the plain PostgreSQL cluster, for one test."""
    name = f"plain{next(_databases)}"
    plain_pg_cluster.start()
    db = plain_pg_cluster.create_database(name)
    yield db.url
    if plain_pg_cluster.is_running():
        plain_pg_cluster.drop_database(name)


_databases = itertools.count(1)


@pytest.fixture(params=["sqlite", "postgresql", pytest.param("timescaledb", marks=pytest.mark.timescaledb)])
def archive_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One URL per backend: a SQLite file, or a fresh database on plain PostgreSQL or on TimescaleDB."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/archive/history.sqlite"
    if request.param == "postgresql":
        return request.getfixturevalue("plain_pg_url")
    return request.getfixturevalue("timescaledb_database").url


@pytest.fixture
def db() -> Database:
    """A fresh process database of :data:`SITE`."""
    return make_db()


@pytest.fixture
async def start_historian(tmp_path: Path) -> AsyncIterator[Callable]:
    """``await start(db, url, **config)`` -> a started Historian; all are stopped after the test."""
    started: list[Historian] = []

    async def start(db: Database, url: str, state_dir: Path | None = None, **config) -> Historian:
        h = Historian(db, HistorianConfig(url=url, **config), state_dir or tmp_path / "state")
        await h.start()
        started.append(h)
        return h

    yield start
    for h in reversed(started):
        await h.stop()
