"""Procedures always finish safe, as people run labctl: cancel, stop and kill -9 during a sweep.

A real ``labctl serve`` in a subprocess (fast simulated cryostat, SQLite history and
jobs) and the client library over OPC UA. A sweep turns the mixing-chamber heater on and
waits; its cleanup turns it off. Each way the job can end -- cancelled, the server
stopped (SIGTERM), the server killed (SIGKILL, then started again on the same state
directory) -- the heater ends Off and the job record says how the job ended. The demo's
``iv_curve`` returns finite voltages and currents that follow the source-meter's setpoints.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sqlite3
import sys
from pathlib import Path

import pytest
from labctl.clients.session import connect
from labctl.server.passwords import hash_password

from tests.helpers import wait_for
from tests.served import Served, site_servers
from tests.sites import FAST_CRYOSTAT

ROOT = Path(__file__).resolve().parents[2]
LABCTL = [sys.executable, "-m", "labctl"]
PASSWORD = "olga-pw"
OFF, ON = 0, 4


def site_text() -> str:
    return f"""
site: sweep
server: {{opcua: {{host: 127.0.0.1}}}}
historian: {{url: "sqlite:///{{state_dir}}/history.sqlite", batch_age_s: 0.05}}
users:
  - {{name: olga, roles: [operator], password_hash: "{hash_password(PASSWORD)}"}}
resources: [{{name: cryostat}}]
""" + FAST_CRYOSTAT + """pvs:
  - {name: "LAB:GATE", type: bool, writable: true, initial: false}
procedures:
  sweep:
    resources: [cryostat]
    steps:
      - set: {pv: "CRYO:MXC:HTR:RANGE", value: "r4"}
      - wait: {until: "g", inputs: {g: "LAB:GATE"}, timeout_s: 600}
    cleanup:
      - set: {pv: "CRYO:MXC:HTR:RANGE", value: "Off"}
"""


@pytest.fixture
def serve(tmp_path):
    site = tmp_path / "sweep.yaml"
    site.write_text(site_text())
    with site_servers(site, tmp_path / "var", tmp_path) as start:
        yield start


async def sweeping(url: str) -> int:
    """Submit the sweep and wait until it has turned the heater on; its job id."""
    s = await connect(url, "olga", PASSWORD, security="None")
    try:
        job_id = await s.submit("sweep", {})

        async def heater_on() -> bool:
            return (await s.job(job_id)).state == "running" and (await s.get("CRYO:MXC:HTR:RANGE")).value == ON

        await _until(heater_on, "the sweep to turn the heater on")
        return job_id
    finally:
        await s.close()


async def _until(check, what: str, timeout: float = 30.0) -> None:
    await wait_for(check, timeout=timeout, what=what)


def server_state(server: Served) -> Path:
    return Path(server.proc.args[server.proc.args.index("--state-dir") + 1])


def archived_state(archive: Path, job_id: int) -> str | None:
    """The job's state as the archive holds it (what a kill -9 leaves)."""
    with contextlib.closing(sqlite3.connect(archive)) as conn:
        row = conn.execute("select state from job where id = ?", (job_id,)).fetchone()
    return row[0] if row else None


def cleanup_lines(job) -> list[str]:
    return [line for _, line in job.log if line.startswith("cleanup")]


async def test_a_cancelled_sweep_turns_the_heater_off_and_says_it_was_cancelled(serve):
    server = serve()
    job_id = await sweeping(server.url)
    async with await connect(server.url, "olga", PASSWORD, security="None") as s:
        await s.cancel(job_id)

        async def ended() -> bool:
            return (await s.job(job_id)).state != "running"

        await _until(ended, "the job to end")
        job = await s.job(job_id)
        assert job.state == "cancelled" and job.log[-1][1] == "cancelled: by olga"
        assert cleanup_lines(job)[-1] == "cleanup: done"
        assert (await s.get("CRYO:MXC:HTR:RANGE")).value == OFF
    assert server.stop() == 0


async def test_stopping_the_server_runs_the_cleanup_before_the_instruments_close(serve):
    server = serve()
    job_id = await sweeping(server.url)
    assert server.stop(signal.SIGTERM) == 0
    assert not any("Traceback" in line for line in server.lines), "\n".join(server.lines)
    again = serve()
    async with await connect(again.url, "olga", PASSWORD, security="None") as s:
        job = await s.job(job_id)
        assert job.state == "cancelled" and job.log[-1][1] == "cancelled: server stopping"
        assert cleanup_lines(job)[-1] == "cleanup: done"
        assert "set CRYO:MXC:HTR:RANGE = 'Off'" in [line for _, line in job.log]
        # the archive's last word on the heater before the restart is Off
        history = await s.history("CRYO:MXC:HTR:RANGE", job.submitted_at)
        before = [v for t, v in zip(history.times.tolist(), history.values.tolist(), strict=True) if t <= job.ended_at]
        assert before[-1] == OFF


async def test_after_a_kill_the_next_start_fails_the_job_and_runs_its_cleanup(serve):
    server = serve()
    job_id = await sweeping(server.url)
    archive = server_state(server) / "history.sqlite"
    await wait_for(lambda: archived_state(archive, job_id) == "running", timeout=10, what="the running job archived")
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    again = serve()
    async with await connect(again.url, "olga", PASSWORD, security="None") as s:

        async def cleaned() -> bool:
            return cleanup_lines(await s.job(job_id))[-1:] == ["cleanup: done"]

        await _until(cleaned, "the cleanup after the restart")
        job = await s.job(job_id)
        assert job.state == "failed" and "stopped while the job was running" in job.error
        assert (await s.get("CRYO:MXC:HTR:RANGE")).value == OFF
        writes = [r for r in await s.audit(job.submitted_at, pv="CRYO:MXC:HTR:RANGE") if r.get("action") == "write"]
        assert writes[-1]["new"] in (OFF, "Off") and writes[-1]["accepted"] is True
    assert again.stop() == 0


async def test_the_demo_iv_curve_follows_the_source_meter_setpoints(tmp_path):
    server = Served([*LABCTL, "serve", str(ROOT / "config/demo.yaml")], tmp_path / "var", cwd=tmp_path)
    try:
        server.wait_ready()
        async with await connect(server.url, "operator", "operator-demo", security="None") as s:
            volts = [0.0, 0.25, 0.5, 1.0]
            job_id = await s.submit("iv_curve", {"volts": volts})

            async def ended() -> bool:
                return (await s.job(job_id)).state not in ("queued", "running")

            await _until(ended, "the iv curve")
            job = await s.job(job_id)
            assert job.state == "done", job.error
            measured_v = [r[2] for r in job.results if r[1] == "SMU1:VOLT"]
            measured_i = [r[2] for r in job.results if r[1] == "SMU1:CURR"]
            assert all(math.isfinite(x) for x in measured_v + measured_i)
            assert measured_v == pytest.approx(volts, abs=1e-3)
            assert measured_i == pytest.approx([v / 10_000 for v in volts], abs=1e-6)
            assert cleanup_lines(job)[-1] == "cleanup: done"
            assert (await s.get("SMU1:OUT")).value is False
    finally:
        assert server.stop() == 0
