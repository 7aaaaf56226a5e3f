"""The throwaway PostgreSQL 15 / TimescaleDB cluster of tests/pg/ works as the
historian tests need it: reachable by URL, TimescaleDB (Apache edition) loadable,
hypertables, COPY ingest, time_bucket, and data surviving the server going away."""

import datetime as dt
import os
import pwd
import re

import psycopg
import pytest

from tests.pg.availability import postgres_available, require_postgres, require_timescaledb, timescaledb_available
from tests.pg.cluster import PgCluster

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def test_cluster_url_and_settings(pg_cluster):
    m = re.fullmatch(r"postgresql\+psycopg://postgres@127\.0\.0\.1:(\d+)/labctl_test", pg_cluster.url)
    assert m and int(m.group(1)) == pg_cluster.port
    with psycopg.connect(pg_cluster.conninfo()) as conn:
        version, db, listen, fsync, sockdir = conn.execute(
            "SELECT version(), current_database(), current_setting('listen_addresses'),"
            " current_setting('fsync'), current_setting('unix_socket_directories')"
        ).fetchone()
    assert version.startswith("PostgreSQL 15.")
    assert (db, listen, fsync) == ("labctl_test", "127.0.0.1", "off")
    assert sockdir == str(pg_cluster.base)
    if os.geteuid() == 0:  # postgres refuses root: the server runs as the postgres account
        assert pg_cluster.datadir.stat().st_uid == pwd.getpwnam(os.environ.get("LABCTL_PG_OS_USER", "postgres")).pw_uid


def test_sqlalchemy_url(pg_database):
    sqlalchemy = pytest.importorskip("sqlalchemy")
    engine = sqlalchemy.create_engine(pg_database.url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT current_database()")).scalar_one() == pg_database.name
    finally:
        engine.dispose()


def test_fresh_database_per_test(pg_database):
    with psycopg.connect(pg_database.conninfo) as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0] == pg_database.name
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0] == 0


@pytest.mark.timescaledb
def test_timescaledb_hypertable_copy_time_bucket(timescaledb_cluster, pg_database):
    with psycopg.connect(pg_database.conninfo, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        license_, extversion = conn.execute(
            "SELECT current_setting('timescaledb.license'), extversion FROM pg_extension WHERE extname = 'timescaledb'"
        ).fetchone()
        print(f"TimescaleDB {extversion}, edition {license_!r}")
        assert license_ == "apache"
        assert extversion == timescaledb_cluster.timescaledb_version

        conn.execute("CREATE TABLE sample (time timestamptz NOT NULL, pv text NOT NULL, value double precision)")
        conn.execute("SELECT create_hypertable('sample', by_range('time', INTERVAL '1 hour'))")

        # 3 hours of 1 Hz samples for two PVs, through binary COPY as the historian ingests
        n = 3 * 3600
        with conn.cursor() as cur:
            with cur.copy("COPY sample (time, pv, value) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["timestamptz", "text", "float8"])
                for i in range(n):
                    t = T0 + dt.timedelta(seconds=i)
                    copy.write_row((t, "CRYO:MXC:TEMP", float(i)))
                    copy.write_row((t, "CRYO:4K:TEMP", 4.0))
        assert conn.execute("SELECT count(*) FROM sample").fetchone()[0] == 2 * n
        assert conn.execute("SELECT count(*) FROM show_chunks('sample')").fetchone()[0] == 3

        rows = conn.execute(
            "SELECT time_bucket('15 minutes', time) AS bucket, count(*), avg(value), min(value), max(value)"
            " FROM sample WHERE pv = %s GROUP BY bucket ORDER BY bucket",
            ("CRYO:MXC:TEMP",),
        ).fetchall()
        assert len(rows) == 12
        assert rows[0] == (T0, 900, 449.5, 0.0, 899.0)
        assert rows[-1][0] == T0 + dt.timedelta(hours=2, minutes=45)
        assert all(count == 900 for _, count, *_ in rows)


@pytest.mark.timescaledb
def test_apache_edition_has_no_compression(timescaledb_cluster, pg_database):
    """What the historian's 'detect and fall back' meets: TSL features are refused."""
    with psycopg.connect(pg_database.conninfo, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        conn.execute("CREATE TABLE s (time timestamptz NOT NULL, value float8)")
        conn.execute("SELECT create_hypertable('s', by_range('time'))")
        with pytest.raises(
            psycopg.errors.FeatureNotSupported, match=r"not supported under the current \"apache\" license"
        ):
            conn.execute("ALTER TABLE s SET (timescaledb.compress)")


@pytest.mark.timescaledb
def test_timescaledb_database_fixture(timescaledb_database):
    with psycopg.connect(timescaledb_database.conninfo) as conn:
        assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
        assert conn.execute("SELECT current_database()").fetchone()[0] == timescaledb_database.name


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_stop_start_keeps_data(pg_cluster_factory, mode):
    cluster = pg_cluster_factory()
    url, port = cluster.url, cluster.port
    with cluster.connect() as conn:
        conn.execute("CREATE TABLE t (i int)")
        conn.execute("INSERT INTO t SELECT generate_series(1, 1000)")
    held = psycopg.connect(cluster.conninfo(), autocommit=True)
    try:
        cluster.stop(mode)  # the database goes away ...
        assert not cluster.is_running()
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT 1")  # ... under an open connection
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(cluster.conninfo(), connect_timeout=2)  # ... and for new ones
    finally:
        held.close()

    cluster.start()  # ... and comes back, same port and URL, data kept
    assert (cluster.url, cluster.port) == (url, port)
    with cluster.connect() as conn:
        assert conn.execute("SELECT count(*), sum(i) FROM t").fetchone() == (1000, 500500)
        conn.execute("INSERT INTO t VALUES (0)")
    cluster.restart()
    with cluster.connect() as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 1001


def test_cleanup_removes_everything():
    require_postgres()
    cluster = PgCluster(timescaledb=False)
    cluster.start()
    base = cluster.base
    assert base.is_dir() and cluster.is_running()
    cluster.cleanup()
    assert not base.exists() and not cluster.is_running()
    cluster.cleanup()  # idempotent


def _fake_bindir(tmp_path):
    """A PostgreSQL 'installation' without TimescaleDB."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("postgres", "initdb"):
        (bindir / tool).write_text("#!/bin/sh\nexit 1\n")
    (bindir / "pg_config").write_text(
        f"#!/bin/sh\necho {tmp_path}/share; echo {tmp_path}/lib; echo 'PostgreSQL 15.0'\n"
    )
    (bindir / "pg_config").chmod(0o755)
    return bindir


def test_availability_messages(tmp_path):
    ok, why = postgres_available(tmp_path / "nowhere")
    assert not ok and "apt-get install postgresql-15" in why
    ok, why = timescaledb_available(_fake_bindir(tmp_path))
    assert not ok and "bash scripts/install-timescaledb.sh" in why
    ok, version = timescaledb_available()
    assert not ok or re.fullmatch(r"\d+\.\d+\.\d+", version)


def test_missing_timescaledb_skips_locally_fails_in_ci(tmp_path, monkeypatch):
    monkeypatch.setenv("LABCTL_PG_BINDIR", str(_fake_bindir(tmp_path)))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="scripts/install-timescaledb.sh"):
        require_timescaledb()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_timescaledb()
