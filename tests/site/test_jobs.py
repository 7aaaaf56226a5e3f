"""Jobs of a site: ids unique across its servers, each server restoring only its own, every job readable anywhere.

Real servers in-process on a fresh PostgreSQL database each; jobs are submitted in-process
(as the protocols do, with an identity) and read back through another server with the
``labctl jobs`` and ``labctl job`` commands. The id blocks' bookkeeping on its own
(:class:`~labctl.server.historian.jobids.JobIds`) needs no database. Also: the upgrade of
a version-2 archive, on PostgreSQL and SQLite.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from labctl.ioc.jobs import JobElsewhere, JobIdsUnavailable, JobState
from labctl.ioc.types import Identity
from labctl.server.app import Server
from labctl.server.historian.jobids import LOW_WATER, Block, JobIds
from labctl.server.historian.schema import JOB_ID_BLOCK, SCHEMA_VERSION
from labctl.server.passwords import hash_password
from labctl.server.site import parse_site
from sqlalchemy import create_engine, text

from tests.helpers import wait_for
from tests.site.conftest import query, run_labctl, site_yaml

ROOT = Identity("root", frozenset({"admin"}), "test")
ADMIN_PW = "admin-pw-1"


@pytest.fixture(scope="module")
def admin_hash() -> str:
    return hash_password(ADMIN_PW)


def procedures(prefix: str, admin_hash: str) -> str:
    """An admin account, a quick procedure (set and read) and one that waits for ``<prefix>:GO`` > 5."""
    return f"""
users:
  - {{name: admin, roles: [admin], password_hash: "{admin_hash}"}}
procedures:
  quick:
    steps:
      - set: {{pv: "{prefix}:X", value: 2.5}}
      - read: {{pvs: ["{prefix}:X"], label: "from {prefix}"}}
  slow:
    steps:
      - wait: {{until: "go > 5", inputs: {{go: "{prefix}:GO"}}, timeout_s: 120}}
"""


async def _ended(server: Server, job_id: int) -> bool:
    return server.control.jobs.jobs[job_id].state.final  # type: ignore[attr-defined]


# ---- the ids of one server (no database) --------------------------------------------------------------------


def test_job_ids_go_on_in_their_block_reserve_the_next_ahead_and_survive_a_start_without_the_database(tmp_path):
    ids = JobIds(tmp_path, "postgresql+psycopg://db/lab", "alpha")
    ids.restore(None, None, [])
    assert ids.left == 0 and ids.wants_block and ids.take() is None
    ids.add_block(Block(1001, 1000 + JOB_ID_BLOCK))
    assert [ids.take(), ids.take()] == [1001, 1002]
    # a restart with the database: after the highest id archived or restored, or the cursor's if further
    again = JobIds(tmp_path, "postgresql+psycopg://db/lab", "alpha")
    again.restore(Block(1001, 2000), archived=1001, used=[7, 1001])
    assert again.next == 1003  # the cursor file says 1002 was handed out
    again.restore(Block(1001, 2000), archived=1500, used=[])
    assert again.next == 1501
    # a start without the database goes on after the cursor; another database's or server's cursor is not used
    offline = JobIds(tmp_path, "postgresql+psycopg://db/lab", "alpha")
    assert offline.restore_offline(used=[]) and offline.take() == 1003
    assert not JobIds(tmp_path, "postgresql+psycopg://other/lab", "alpha").restore_offline(used=[])
    assert not JobIds(tmp_path, "postgresql+psycopg://db/lab", "beta").restore_offline(used=[])
    # near the end of a block the next one is wanted, kept as the spare, and used once the block is spent
    offline.restore(Block(1001, 2000), archived=2001 - LOW_WATER, used=[])
    assert offline.wants_block
    offline.add_block(Block(5001, 6000))
    assert not offline.wants_block
    handed = [offline.take() for _ in range(LOW_WATER)]
    assert handed[-2:] == [2000, 5001] and offline.spare is None
    assert json.loads((tmp_path / "job-ids.json").read_text())["next"] == 5002


# ---- servers of one site ----------------------------------------------------------------------------------


async def test_job_ids_are_unique_in_the_site_and_every_job_is_read_through_any_server(pg_database, start_server, admin_hash, monkeypatch):
    url = pg_database.url
    monkeypatch.setenv("LABCTL_PASSWORD", ADMIN_PW)
    alpha = await start_server("alpha", ["A:X", "A:GO"], url, extra=procedures("A", admin_hash))
    beta = await start_server("beta", ["B:X", "B:GO"], url, extra=procedures("B", admin_hash))
    a1 = alpha.control.submit_job("quick", {}, ROOT)  # type: ignore[attr-defined]
    b1 = beta.control.submit_job("quick", {}, ROOT)  # type: ignore[attr-defined]
    a2 = alpha.control.submit_job("quick", {}, ROOT)  # type: ignore[attr-defined]
    assert (a1.server, b1.server, a2.server) == ("alpha", "beta", "alpha")
    assert a2.id == a1.id + 1 and abs(b1.id - a1.id) >= JOB_ID_BLOCK - 1, "each server numbers within its own block"
    blocks = await asyncio.to_thread(query, url, "SELECT server, first_id, last_id FROM job_id_block ORDER BY first_id")
    assert {r.server for r in blocks} == {"alpha", "beta"}
    assert all(r.last_id - r.first_id == JOB_ID_BLOCK - 1 for r in blocks)
    for server, job in ((alpha, a1), (alpha, a2), (beta, b1)):
        await wait_for(lambda s=server, j=job: _ended(s, j.id), timeout=10, what=f"job {job.id} done")
        assert job.state is JobState.DONE
    for server in (alpha, beta):
        assert await server.service("historian").flush()  # type: ignore[attr-defined]
    rows = await asyncio.to_thread(query, url, "SELECT id, server, state FROM job ORDER BY id")
    assert {(r.id, r.server, r.state) for r in rows} == {(a1.id, "alpha", "done"), (a2.id, "alpha", "done"), (b1.id, "beta", "done")}

    # beta lists alpha's jobs and shows their results (the CLI, over OPC UA, logged in on beta)
    beta_url = beta.service("opcua").url  # type: ignore[attr-defined]
    await wait_for(lambda: a2.id in beta.control.jobs.others, timeout=10, what="beta mirrors alpha's jobs")  # type: ignore[attr-defined]
    cli = ("--url", beta_url, "--user", "admin", "--json")
    rc, out, err = await run_labctl("jobs", *cli)
    assert rc == 0, err
    assert sorted(j["id"] for j in json.loads(out)) == sorted([a1.id, a2.id, b1.id])
    rc, out, err = await run_labctl("job", str(a1.id), *cli)
    assert rc == 0, err
    shown = json.loads(out)
    assert (shown["id"], shown["state"]) == (a1.id, "done")
    assert [(r["pv"], r["value"], r["label"]) for r in shown["results"]] == [("A:X", 2.5, "from A")]
    # ... but cancels it only where it runs
    with pytest.raises(JobElsewhere) as refused:
        beta.control.cancel_job(a1.id, ROOT)  # type: ignore[attr-defined]
    assert refused.value.server == "alpha" and "cancel it through that server" in str(refused.value)


async def test_a_starting_server_restores_only_its_own_jobs_and_goes_on_in_its_block(pg_database, start_server, make_server, admin_hash):
    url = pg_database.url
    alpha = await start_server("alpha", ["A:X", "A:GO"], url, extra=procedures("A", admin_hash))
    beta = await start_server("beta", ["B:X", "B:GO"], url, extra=procedures("B", admin_hash))
    running = beta.control.submit_job("slow", {}, ROOT)  # type: ignore[attr-defined]
    first = alpha.control.submit_job("quick", {}, ROOT)  # type: ignore[attr-defined]
    await wait_for(lambda: _ended(alpha, first.id), timeout=10, what="alpha's job done")
    await wait_for(lambda: running.state is JobState.RUNNING, timeout=10, what="beta's job running")
    assert await beta.service("historian").flush()  # type: ignore[attr-defined]
    await alpha.stop()

    again = make_server("alpha", ["A:X", "A:GO"], url, extra=procedures("A", admin_hash))
    await again.start()
    try:
        jobs = again.control.jobs  # type: ignore[attr-defined]
        assert set(jobs.jobs) == {first.id}, "only its own jobs"
        assert jobs.jobs[first.id].state is JobState.DONE
        await wait_for(lambda: running.id in jobs.others, timeout=10, what="beta's job mirrored")
        assert jobs.others[running.id].state is JobState.RUNNING
        (row,) = await asyncio.to_thread(query, url, "SELECT state, error FROM job WHERE id = :i", i=running.id)
        assert (row.state, row.error) == ("running", ""), "beta's running job is left alone"
        assert running.state is JobState.RUNNING
        nxt = again.control.submit_job("quick", {}, ROOT)  # type: ignore[attr-defined]
        assert nxt.id == first.id + 1, "alpha goes on in its block"
    finally:
        await again.stop()
    beta.db.post("B:GO", 10.0)
    await wait_for(lambda: _ended(beta, running.id), timeout=10, what="beta's job done")
    assert running.state is JobState.DONE


async def test_a_server_started_without_the_database_goes_on_after_its_cursor(pg_cluster_factory, tmp_path, admin_hash):
    cluster = pg_cluster_factory()
    url = cluster.url

    def make() -> Server:
        text_ = site_yaml("alpha", ["A:X", "A:GO"], url, tmp_path / "alpha", extra=procedures("A", admin_hash))
        return Server(parse_site(text_, "alpha.yaml"), base_dir=tmp_path, source="alpha.yaml")

    alpha = make()
    await alpha.start()
    try:
        done = alpha.control.submit_job("quick", {}, ROOT)  # type: ignore[attr-defined]
        await wait_for(lambda: _ended(alpha, done.id), timeout=10, what="job done")
        assert await alpha.service("historian").flush()  # type: ignore[attr-defined]
    finally:
        await alpha.stop()
    await asyncio.to_thread(cluster.stop)
    alpha = make()
    await alpha.start()  # the database is away: restored from the spool only, ids from the cursor
    try:
        nxt = alpha.control.submit_job("quick", {}, ROOT)  # type: ignore[attr-defined]
        assert nxt.id == done.id + 1
        await wait_for(lambda: _ended(alpha, nxt.id), timeout=10, what="job done")
        await asyncio.to_thread(cluster.start)
        historian = alpha.service("historian")
        await wait_for(historian.flush, timeout=30, what="the spool back-filled")  # type: ignore[attr-defined]
    finally:
        await alpha.stop()
    rows = await asyncio.to_thread(query, url, "SELECT id, server, state FROM job ORDER BY id")
    assert [(r.id, r.server, r.state) for r in rows] == [(done.id, "alpha", "done"), (nxt.id, "alpha", "done")]


async def test_a_first_start_without_the_database_refuses_submissions_until_it_can_reserve_ids(pg_cluster_factory, tmp_path, admin_hash):
    cluster = pg_cluster_factory()
    url = cluster.url
    await asyncio.to_thread(cluster.stop)
    text_ = site_yaml("alpha", ["A:X", "A:GO"], url, tmp_path / "alpha", extra=procedures("A", admin_hash))
    alpha = Server(parse_site(text_, "alpha.yaml"), base_dir=tmp_path, source="alpha.yaml")
    await alpha.start()
    try:
        with pytest.raises(JobIdsUnavailable) as refused:
            alpha.control.submit_job("quick", {}, ROOT)  # type: ignore[attr-defined]
        assert refused.value.kind == "unavailable" and "submit again once it is back" in str(refused.value)
        await asyncio.to_thread(cluster.start)

        def submitted() -> bool:
            try:
                return alpha.control.submit_job("quick", {}, ROOT) is not None  # type: ignore[attr-defined]
            except JobIdsUnavailable:
                return False

        await wait_for(submitted, timeout=30, what="ids reserved once the database is back")
    finally:
        await alpha.stop()


# ---- upgrading an archive of version 2 ------------------------------------------------------------------------


def _make_version_2(url: str) -> None:
    """Turn a fresh archive into one of schema version 2 holding job 37 (queued when its server stopped)."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE job_id_block"))
            if engine.dialect.name == "postgresql":
                conn.execute(text("DROP SEQUENCE job_id_seq"))
            conn.execute(text("DROP INDEX job_server"))
            conn.execute(text("ALTER TABLE job DROP COLUMN server"))
            conn.execute(text("UPDATE historian_schema SET version = 2 WHERE component = 'historian'"))
            conn.execute(
                text(
                    "INSERT INTO job (id, procedure, owner, roles, params, priority, resources, state, paused, submitted_us, "
                    "error, updated_us) VALUES (37, 'quick', 'root', '[\"admin\"]', '{}', 0, '[]', 'queued', false, 1, '', 1)"
                )
            )
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
async def test_a_version_2_archive_is_upgraded_and_its_jobs_adopted(backend, pg_database, start_server, tmp_path, admin_hash):
    url = pg_database.url if backend == "postgresql" else f"sqlite:///{tmp_path}/archive.sqlite"
    server = await start_server("alpha", ["A:X", "A:GO"], url, extra=procedures("A", admin_hash))
    await server.stop()
    await asyncio.to_thread(_make_version_2, url)

    alpha = await start_server("alpha", ["A:X", "A:GO"], url, extra=procedures("A", admin_hash))
    jobs = alpha.control.jobs  # type: ignore[attr-defined]
    assert jobs.jobs[37].state is JobState.FAILED and jobs.jobs[37].server == "alpha"
    nxt = alpha.control.submit_job("quick", {}, ROOT)  # type: ignore[attr-defined]
    assert nxt.id == 38, "new ids start above the archived ones"
    assert await alpha.service("historian").flush()  # type: ignore[attr-defined]
    rows = await asyncio.to_thread(query, url, "SELECT id, server, state FROM job ORDER BY id")
    assert [(r.id, r.server) for r in rows] == [(37, "alpha"), (38, "alpha")] and rows[0].state == "failed"
    version = await asyncio.to_thread(query, url, "SELECT version FROM historian_schema WHERE component = 'historian'")
    assert version[0][0] == SCHEMA_VERSION
