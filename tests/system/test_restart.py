"""Jobs and alarm states survive a server restart: the control layer keeps them in the historian.

Real Servers (core, historian on SQLite, control layer; OPC UA where a client reads a job)
started one after the other on the same state directory, as an operator restarts labctl.
A crash is the historian stopping before the rest, so the archive's last word on a
running job is "running".
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from labctl.clients.session import connect
from labctl.ioc.jobs import JobState
from labctl.ioc.types import Identity, Severity, Status
from labctl.server.app import Server
from labctl.server.passwords import hash_password
from labctl.server.site import parse_site

from tests.helpers import wait_for

OP = Identity("olga", frozenset({"operator"}), "test")
EXPERT = Identity("erin", frozenset({"expert"}), "test")
PASSWORD = "olga-pw"


@functools.cache
def password_hash() -> str:
    return hash_password(PASSWORD)


def site(state_dir: Path, opcua: bool = False) -> str:
    opcua_cfg = "{host: 127.0.0.1, port: 0, trust: auto}" if opcua else "{enabled: false}"
    return f"""
site: restart
server: {{state_dir: "{state_dir}", opcua: {opcua_cfg}, ca: {{enabled: false}}}}
historian: {{batch_age_s: 0.05}}
users:
  - {{name: olga, roles: [operator], password_hash: "{password_hash()}"}}
resources: [{{name: bench}}]
pvs:
  - {{name: "B:TEMP", type: float64, unit: K, writable: true, initial: 150.0, resource: bench,
     alarm: {{high: 100, hihi: 200, latch: true}}}}
  - {{name: "B:PRES", type: float64, unit: mbar, writable: true, initial: 20.0, resource: bench, alarm: {{high: 10}}}}
procedures:
  measure:
    resources: [bench]
    params: {{label: {{type: string, default: "x"}}}}
    steps:
      - read: {{pvs: ["B:TEMP", "B:PRES"], label: "{{label}}"}}
      - log: "measured {{label}}"
  hold:
    resources: [bench]
    steps:
      - sleep: 600
"""


def archived(results: list) -> list[tuple]:
    """Results as the archive keeps them: times to the microsecond."""
    return [(round(r.time * 1_000_000), r.pv, r.value, r.severity, r.status, r.label) for r in results]


def make_server(tmp_path: Path, opcua: bool = False) -> Server:
    return Server(parse_site(site(tmp_path / "var", opcua), "restart.yaml"))


async def crash(server: Server) -> None:
    """Stop as after a crash: the historian goes first, so nothing after this moment is archived."""
    historian = server.service("historian")
    assert await historian.flush()
    await historian.stop()
    await server.stop()


async def test_jobs_survive_a_restart_and_a_job_running_at_a_crash_is_failed(tmp_path):
    first = make_server(tmp_path)
    names = [s.name for s in first.services]
    assert names.index("historian") < names.index("control"), "the store starts before the control layer restores from it"
    await first.start()
    jobs = first.control.jobs
    done = jobs.submit("measure", {"label": "cold"}, OP)
    await wait_for(lambda: done.state is JobState.DONE, what="measure done")
    running = jobs.submit("hold", {}, OP)
    await wait_for(lambda: running.state is JobState.RUNNING, what="hold running")
    expected_results = archived(done.results)
    await crash(first)

    second = make_server(tmp_path)
    async with second:
        jobs = second.control.jobs
        got = jobs.get(done.id)
        assert (got.state, got.owner, got.procedure, got.params) == (JobState.DONE, "olga", "measure", {"label": "cold"})
        assert archived(got.results) == expected_results
        assert [(r.pv, r.value, r.label) for r in got.results] == [("B:TEMP", 150.0, "cold"), ("B:PRES", 20.0, "cold")]
        assert any(line == "measured cold" for _, line in got.log)
        failed = jobs.get(running.id)
        assert failed.state is JobState.FAILED and failed.error == "the server stopped while the job was running"
        assert failed.ended_at is not None
        historian = second.service("historian")
        assert await historian.flush()
        record = await historian.read_job(running.id)
        assert (record.state, record.error) == (JobState.FAILED, failed.error)
        assert archived((await historian.read_job(done.id)).results) == expected_results
        # numbering goes on after the restored jobs; a job running at a clean stop ends cancelled
        third_job = jobs.submit("hold", {}, OP)
        assert third_job.id == running.id + 1
        await wait_for(lambda: third_job.state is JobState.RUNNING, what="hold running")

    third = make_server(tmp_path)
    async with third:
        cancelled = third.control.jobs.get(third_job.id)
        assert cancelled.state is JobState.CANCELLED
        assert [j.state for j in third.control.jobs.list()] == [JobState.CANCELLED, JobState.FAILED, JobState.DONE]


async def test_a_client_reads_a_jobs_results_by_id_after_a_restart(tmp_path):
    first = make_server(tmp_path, opcua=True)
    async with first:
        job = first.control.jobs.submit("measure", {"label": "warm"}, OP)
        await wait_for(lambda: job.state is JobState.DONE, what="measure done")

    second = make_server(tmp_path, opcua=True)
    async with second:
        async with await connect(second.service("opcua").url, "olga", PASSWORD) as s:
            detail = await s.job(job.id)
    assert (detail.id, detail.state, detail.owner) == (job.id, "done", "olga")
    assert [(pv, value, label) for _, pv, value, _, _, label in detail.results] == [("B:TEMP", 150.0, "warm"), ("B:PRES", 20.0, "warm")]


async def test_acknowledged_latched_and_shelved_alarm_states_survive_a_restart(tmp_path):
    first = make_server(tmp_path)
    async with first:
        db, alarms = first.db, first.control.alarms
        # B:PRES starts in a MINOR alarm; an operator acknowledges it
        assert alarms.table.get("B:PRES").unacknowledged
        alarms.acknowledge("B:PRES", OP, "known leak")
        # B:TEMP (latching) went MAJOR and came back to MINOR: latched MAJOR, unacknowledged
        db.post("B:TEMP", 250.0)
        db.post("B:TEMP", 150.0)
        temp = alarms.table.get("B:TEMP")
        assert (temp.latched, temp.current, temp.acked) == (Severity.MAJOR, Severity.MINOR, False)
        # an expert shelves it for an hour
        shelved_until = alarms.shelve("B:TEMP", EXPERT, 3600, "sensor being replaced").shelved_until
        assert await first.service("historian").flush()

    second = make_server(tmp_path)
    async with second:
        table = second.control.alarms.table
        pres = table.get("B:PRES")
        assert (pres.current, pres.status, pres.acked) == (Severity.MINOR, Status.HIGH, True), "still acknowledged"
        temp = table.get("B:TEMP")
        assert (temp.latched, temp.current, temp.acked) == (Severity.MAJOR, Severity.MINOR, False), "still latched"
        assert temp.shelved_until == pytest.approx(shelved_until, abs=1e-6)  # kept to the microsecond
        assert (temp.shelved_by, temp.shelve_reason) == ("erin", "sensor being replaced")
        assert temp.latch, "the site file's settings stay in charge"
        # the summary counts what was restored: B:TEMP is shelved, B:PRES is acknowledged
        assert second.db.read("ALARM:UNACKED:MAJOR").value == 0 and second.db.read("ALARM:UNACKED:MINOR").value == 0
        assert second.db.read("ALARM:ACTIVE:MINOR").value == 1
        # acknowledging goes on from the restored state
        second.control.alarms.unshelve("B:TEMP", EXPERT)
        second.control.alarms.acknowledge("B:TEMP", OP)
        assert table.get("B:TEMP").latched is Severity.MINOR


async def test_without_a_historian_jobs_are_not_kept(tmp_path):
    text = site(tmp_path / "var").replace("historian: {batch_age_s: 0.05}", "historian: {enabled: false}")
    for _ in range(2):
        server = Server(parse_site(text, "restart.yaml"))
        async with server:
            assert server.control.jobs.list() == []
            job = server.control.jobs.submit("measure", {}, OP)
            await wait_for(lambda job=job: job.state is JobState.DONE, what="measure done")
