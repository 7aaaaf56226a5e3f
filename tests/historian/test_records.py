"""The historian as the control layer's store: jobs (logs, results) and alarm states, on every backend.

Records are saved as the control layer saves them (every transition), read back by a new
historian on the same database -- as after a restart -- and, while the database is away,
restored from the spool and back-filled later. Also: the schema upgrade from version 1
and the audit listing's filters.
"""

from __future__ import annotations

import dataclasses

import pytest
from labctl.ioc.access import AuditRecord
from labctl.ioc.alarms import Alarm, AlarmEvent
from labctl.ioc.jobs import Job, JobState, Result
from labctl.ioc.types import Identity, Severity, Status
from labctl.server.historian.schema import SCHEMA_VERSION, V2_TABLES, schema_version
from sqlalchemy import create_engine, inspect, select, text, update

from tests.helpers import free_port
from tests.historian.support import make_db


def a_job(job_id: int = 7, submitted_at: float = 1_700_000_000.25, owner: str = "alice") -> Job:
    return Job(
        id=job_id,
        procedure="sweep",
        owner=owner,
        roles=("operator",),
        params={"points": [1.0, 2.5], "label": "run 1", "n": 3},
        priority=2,
        resources=("cryostat",),
        submitted_at=submitted_at,
    )


def run_through(h, job: Job) -> None:
    """Save a job as the job manager does: queued, running with log lines and results, done."""
    t = job.submitted_at
    job.log.append((t, "queued by alice with priority 2"))
    h.save_job(job)
    job.state, job.started_at = JobState.RUNNING, t + 1
    job.log.append((t + 1, "running"))
    h.save_job(job)
    for k in range(3):
        job.results.append(Result(t + 2 + k, "CRYO:RAW", 0.5 * k, int(Severity.NO_ALARM), int(Status.NO_ALARM), f"point {k}"))
        job.log.append((t + 2 + k, f"read CRYO:RAW [point {k}]"))
        h.save_job(job)
    job.results.append(Result(t + 6, "CRYO:TRACE", (1.0, 2.0), int(Severity.MINOR), int(Status.HIGH), ""))
    job.results.append(Result(t + 6, "CRYO:NOTE", "hello", 0, 0, ""))
    job.state, job.ended_at = JobState.DONE, t + 7
    job.log.append((t + 7, "done"))
    h.save_job(job)


def an_alarm_event(source: str = "CRYO:TEMP", **changes) -> AlarmEvent:
    alarm = Alarm(
        source, Severity.MINOR, Status.HIGH, Severity.MAJOR, acked=True, value=12.5, since=1_700_000_100.5,
        message=f"{source} HIGH (MINOR): 12.5 K",
    )  # fmt: skip
    return AlarmEvent("acknowledged", dataclasses.replace(alarm, **changes), 1_700_000_101.0, "olga", "seen")


async def test_jobs_and_alarm_states_survive_a_restart(archive_url, start_historian):
    h1 = await start_historian(make_db(), archive_url)
    job = a_job()
    run_through(h1, job)
    other = a_job(8, owner="bob")
    h1.save_job(other)  # still queued when the server "stopped"
    h1.save_alarm(an_alarm_event())
    h1.save_alarm(an_alarm_event(acked=False))  # a later state of the same source wins
    shelved = an_alarm_event("CRYO:RAW", shelved_until=1_700_003_700.0, shelved_by="erin", shelve_reason="sensor swap")
    h1.save_alarm(shelved)
    assert await h1.flush()
    await h1.stop()

    h2 = await start_historian(make_db(), archive_url)
    restored = h2.load_jobs()
    assert [j.id for j in restored] == [7, 8]
    got = restored[0]
    assert got == job, "every field, the log and the results as saved"
    assert got.results[3].value == (1.0, 2.0) and got.params == {"points": [1.0, 2.5], "label": "run 1", "n": 3}
    assert restored[1].state is JobState.QUEUED and restored[1].owner == "bob"
    alarms = {a.source: a for a in h2.load_alarms()}
    assert alarms["CRYO:TEMP"] == an_alarm_event(acked=False).alarm
    assert alarms["CRYO:RAW"].shelved_until == 1_700_003_700.0 and alarms["CRYO:RAW"].shelve_reason == "sensor swap"
    # results by job id, from the database
    assert await h2.read_job(7) == job
    assert await h2.read_job(99) is None
    assert [j.id for j in await h2.read_jobs()] == [8, 7]
    assert [(j.id, j.log, j.results) for j in await h2.read_jobs(owner="bob")] == [(8, [], [])]
    # a restored job goes on being saved without repeating what is archived
    restored[1].state, restored[1].error = JobState.FAILED, "the server stopped while the job was queued"
    restored[1].log.append((1_700_000_300.0, "failed: the server stopped while the job was queued"))
    h2.save_job(restored[1])
    assert await h2.flush()
    assert (await h2.read_job(8)).log == [(1_700_000_300.0, "failed: the server stopped while the job was queued")]
    assert h2.stats()["duplicates"] == 0


async def test_a_reused_job_id_never_overwrites_the_archived_job(archive_url, start_historian):
    h = await start_historian(make_db(), archive_url)
    first = a_job(3, submitted_at=1_700_000_000.0)
    run_through(h, first)
    assert await h.flush()
    impostor = a_job(3, submitted_at=1_700_009_999.0, owner="mallory")
    impostor.log.append((1_700_009_999.0, "an extra line"))  # one more line than the archived job has
    run_through(h, impostor)
    assert await h.flush()
    assert await h.read_job(3) == first, "neither overwritten nor extended"


async def test_records_wait_in_the_spool_and_are_restored_from_it(tmp_path, start_historian):
    state = tmp_path / "state"
    away = f"postgresql+psycopg://labctl@127.0.0.1:{free_port()}/archive"  # nothing listens there
    h1 = await start_historian(make_db(), away, state_dir=state, batch_age_s=0.05)
    job = a_job()
    run_through(h1, job)
    h1.save_alarm(an_alarm_event())
    assert await h1.flush() is False  # spooled
    await h1.stop()

    h2 = await start_historian(make_db(), away, state_dir=state, batch_age_s=0.05)  # still away: from the spool
    assert h2.load_jobs() == [job]
    assert [a.source for a in h2.load_alarms()] == ["CRYO:TEMP"]
    await h2.stop()

    # the database is there now (any backend takes a spool): restored at once, back-filled after
    h3 = await start_historian(make_db(), f"sqlite:///{tmp_path}/archive.sqlite", state_dir=state, batch_age_s=0.05)
    assert h3.load_jobs() == [job]
    assert await h3.flush()
    assert await h3.read_job(7) == job


async def test_schema_upgrade_from_version_1_adds_the_record_tables(archive_url, start_historian):
    h = await start_historian(make_db(), archive_url)
    await h.stop()
    engine = create_engine(h.url)
    try:
        with engine.begin() as conn:  # make it a version-1 archive
            for table in V2_TABLES:
                conn.execute(text(f"DROP TABLE {table.name}"))
            conn.execute(update(schema_version).values(version=1))
        h2 = await start_historian(make_db(), archive_url)
        job = a_job()
        run_through(h2, job)
        assert await h2.flush()
        assert await h2.read_job(7) == job
        names = set(inspect(engine).get_table_names())
        assert {t.name for t in V2_TABLES} <= names
        with engine.connect() as conn:
            assert conn.execute(select(schema_version.c.version)).scalar() == SCHEMA_VERSION
    finally:
        engine.dispose()


async def test_audit_listing_filters_by_user_target_and_action(archive_url, start_historian):
    db = make_db()
    h = await start_historian(db, archive_url)
    alice = Identity("alice", frozenset({"operator"}), "opcua", "pc1")
    bob = Identity("bob", frozenset({"operator"}), "ca", "pc2")
    t = db.clock()
    for who, action, target in [(alice, "write", "CRYO:RAW"), (bob, "write", "CRYO:RAW"), (alice, "lock.grant", "cryostat"),
                                (bob, "write", "CRYO:TEMP"), (alice, "write", "CRYO:TEMP")]:  # fmt: skip
        db.audit(AuditRecord.of(t, action, who, target))
        t += 0.001
    assert await h.flush()
    since = t - 1

    def shown(records):
        return [(r.user, r.action, r.target) for r in records]

    assert shown(await h.read_audit(since, user="alice")) == [
        ("alice", "write", "CRYO:RAW"), ("alice", "lock.grant", "cryostat"), ("alice", "write", "CRYO:TEMP")]  # fmt: skip
    assert shown(await h.read_audit(since, user="bob", target="CRYO:TEMP")) == [("bob", "write", "CRYO:TEMP")]
    assert shown(await h.read_audit(since, action="lock.grant")) == [("alice", "lock.grant", "cryostat")]
    assert await h.read_audit(since, user="nobody") == []


@pytest.mark.parametrize("kind", ["job", "alarm"])
async def test_saving_before_start_or_after_stop_is_reported_not_raised(kind, tmp_path, start_historian, caplog):
    h = await start_historian(make_db(), f"sqlite:///{tmp_path}/a.sqlite")
    await h.stop()
    if kind == "job":
        h.save_job(a_job())
    else:
        h.save_alarm(an_alarm_event())
    assert any("not recorded: the historian is not running" in r.getMessage() for r in caplog.records)
