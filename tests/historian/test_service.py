"""The historian as a service of the server: wiring, URLs, starting without its database."""

from __future__ import annotations

import logging

import pytest
from labctl.server.app import Server
from labctl.server.historian import HistorianError, HistorianService
from labctl.server.site import parse_site

from tests.helpers import free_port
from tests.historian.support import future_minute, make_db


def site_text(state_dir, historian: str = "") -> str:
    return f"""
site: service_test
server:
  state_dir: "{state_dir}"
  opcua: {{enabled: false}}
  ca: {{enabled: false}}
{historian}
pvs:
  - {{name: "LAB:SETPOINT", type: float64, writable: true, initial: 1.0}}
"""


async def test_the_server_starts_the_historian_first_with_the_default_sqlite_archive(tmp_path):
    text = site_text(tmp_path / "var").replace("opcua: {enabled: false}", "opcua: {enabled: true, host: 127.0.0.1, port: 0, trust: auto}")
    server = Server(parse_site(text, "site.yaml"))
    names = [s.name for s in server.services]
    assert names.index("historian") < names.index("opcua")  # storage before the protocols that read it
    assert isinstance(server.service("historian"), HistorianService)
    async with server:
        h = server.service("historian")
        assert f"historian sqlite:///{tmp_path}/var/history.sqlite (SQLite (WAL))" in server.endpoints()
        t = future_minute()
        server.db.post("LAB:SETPOINT", 2.5, t)
        assert await h.flush()
        assert (await h.read_last("LAB:SETPOINT")).value == 2.5
    assert (tmp_path / "var" / "history.sqlite").exists()
    assert (tmp_path / "var" / "spool").is_dir()


def test_a_disabled_historian_is_not_built(tmp_path):
    server = Server(parse_site(site_text(tmp_path, "historian: {enabled: false}"), "site.yaml"))
    assert all(s.name != "historian" for s in server.services)


async def test_it_starts_without_its_database_spools_and_never_shows_the_password(tmp_path, start_historian, caplog):
    caplog.set_level(logging.INFO)
    db = make_db()
    url = f"postgresql+psycopg://labctl:s3cret@127.0.0.1:{free_port()}/archive"  # nothing listens there
    h = await start_historian(db, url, batch_age_s=0.05)
    assert h.endpoints() == [f"historian postgresql+psycopg://labctl:***@127.0.0.1:{url.split(':')[3]} (PostgreSQL without TimescaleDB)"]
    db.post("CRYO:RAW", 1.5, future_minute())
    assert await h.flush() is False  # spooled, not archived
    stats = h.stats()
    assert not stats["database_up"] and stats["spool_samples"] >= 1 and stats["lost"] == 0
    assert any("unreachable" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert not any("s3cret" in r.getMessage() for r in caplog.records)
    await h.stop()
    assert list((tmp_path / "state" / "spool").glob("*.json"))  # kept for the next start


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://db.example/archive", "backend 'mysql' is not supported"),
        ("sqlite://", "in-memory SQLite"),
        ("sqlite:///:memory:", "in-memory SQLite"),
        ("postgresql+psycopg2://db.example/archive", "driver 'psycopg2' is not supported"),
        ("not a url", "not a database URL"),
    ],
)
async def test_a_bad_url_is_refused_with_a_reason(url, message, start_historian):
    with pytest.raises(HistorianError, match=message):
        await start_historian(make_db(), url)


async def test_queries_need_a_running_historian(tmp_path):
    from labctl.server.historian import Historian
    from labctl.server.historian.config import HistorianConfig

    h = Historian(make_db(), HistorianConfig(), tmp_path)
    assert h.endpoints() == [f"historian sqlite:///{tmp_path}/history.sqlite (not started)"]
    with pytest.raises(HistorianError, match="not running"):
        await h.read_last("CRYO:RAW")
    await h.stop()  # stopping what never started is harmless
