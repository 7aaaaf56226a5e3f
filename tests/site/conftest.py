"""Fixtures of the site tests: several real servers on one real PostgreSQL database.

Each test gets a fresh database on the session's throwaway cluster (:mod:`tests.pg`), or a
private cluster it may stop and start (an outage). Servers run in-process (core, historian
on the site's database, site directory, OPC UA on a free loopback port; Channel Access off)
with short heartbeats, so "down" is a second away: ``heartbeat_s`` 0.2, ``lapse_s`` 1.0,
accounts re-read every 0.2 s. ``labctl`` commands run in-process through
:func:`labctl.server.cli.main` in a worker thread (:func:`run_labctl`), or as subprocesses
where the command as people run it matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client
from labctl.server.app import Server
from labctl.server.cli import main
from labctl.server.historian import directory as sql
from labctl.server.historian.backend import open_backend
from labctl.server.site import parse_site
from labctl.server.siteinfo import ServerEntry

SITE = "lab"
HEARTBEAT_S = 0.2
LAPSE_S = 1.0


def site_yaml(
    name: str,
    pvs: Sequence[str],
    url: str,
    state_dir: Path,
    *,
    accounts: str = "site_file",
    opcua: bool = True,
    ca: str = "{enabled: false}",
    extra: str = "",
    lapse_s: float = LAPSE_S,
) -> str:
    """A site file of one server: soft float PVs ``pvs``, its historian and directory in ``url``.

    ``lapse_s``: a test that counts the directory's readings gives its servers a lapse no slow
    machine reaches, since a server whose heartbeat lapsed registers again (and that is read).
    """
    pv_lines = "".join(f'  - {{name: "{pv}", type: float64, initial: 1.0, writable: true}}\n' for pv in pvs)
    opcua_cfg = (
        "{host: 127.0.0.1, port: 0, trust: auto, security: [None, Basic256Sha256_SignAndEncrypt]}" if opcua else "{enabled: false}"
    )
    return f"""
site: {SITE}
server:
  state_dir: "{state_dir}"
  name: {name}
  accounts: {accounts}
  directory: {{heartbeat_s: {HEARTBEAT_S}, lapse_s: {lapse_s}, accounts_refresh_s: {HEARTBEAT_S}}}
  opcua: {opcua_cfg}
  ca: {ca}
historian: {{url: "{url}", batch_age_s: 0.05}}
autosave: {{enabled: false}}
{extra}
pvs:
{pv_lines}"""


@pytest.fixture
def make_server(tmp_path: Path) -> Callable[..., Server]:
    """``make_server(name, pvs, url, **site_yaml kwargs)`` -> a Server (not started) with its own state directory."""

    def make(name: str, pvs: Sequence[str], url: str, **kw: Any) -> Server:
        text = site_yaml(name, pvs, url, tmp_path / name, **kw)
        return Server(parse_site(text, f"{name}.yaml"), base_dir=tmp_path, source=f"{name}.yaml")

    return make


@pytest.fixture
async def start_server(make_server: Callable[..., Server]) -> AsyncIterator[Callable[..., Any]]:
    """``await start_server(name, pvs, url, **kw)`` -> a started Server; those still running are stopped at the end.

    Request the database's fixture before this one, so the servers stop before their database is dropped.
    """
    started: list[Server] = []

    async def start(name: str, pvs: Sequence[str], url: str, **kw: Any) -> Server:
        server = make_server(name, pvs, url, **kw)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        if not server._stopped.is_set():
            await server.stop()


def read_directory(url: str) -> dict[str, ServerEntry]:
    """The site's servers by name, read from the database now (blocking)."""
    backend = open_backend(url, pool_size=1)
    try:
        with backend.engine.connect() as conn:
            return {e.name: e for e in sql.read_servers(conn)}
    finally:
        backend.dispose()


def read_owners(url: str) -> dict[str, str]:
    """PV name -> owning server, read from the database now (blocking)."""
    backend = open_backend(url, pool_size=1)
    try:
        with backend.engine.connect() as conn:
            return sql.read_owners(conn)
    finally:
        backend.dispose()


def query(url: str, statement: str, **params: Any) -> list[Any]:
    """Rows of one SQL statement on the site's database (blocking)."""
    from sqlalchemy import text

    backend = open_backend(url, pool_size=1)
    try:
        with backend.engine.connect() as conn:
            return conn.execute(text(statement), params).all()
    finally:
        backend.dispose()


async def directory(url: str) -> dict[str, ServerEntry]:
    """:func:`read_directory` off the event loop."""
    return await asyncio.to_thread(read_directory, url)


def _labctl(argv: list[str], stdin: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        saved, sys.stdin = sys.stdin, io.StringIO(stdin)
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse refusing the command line
            rc = int(e.code or 0)
        finally:
            sys.stdin = saved
    return rc, out.getvalue(), err.getvalue()


async def run_labctl(*argv: str, stdin: str = "") -> tuple[int, str, str]:
    """``labctl ARGV`` in-process on a worker thread: (exit status, standard output, standard error)."""
    return await asyncio.to_thread(_labctl, list(argv), stdin)


async def login(url: str, user: str, password: str) -> Client:
    """An asyncua client logged in as ``user`` (the password encrypted with the server's certificate)."""
    client = Client(url, timeout=10)
    client.session_timeout = 600_000
    client.application_uri = "urn:labctl:test-client"
    client.set_user(user)
    client.set_password(password)
    try:
        await client.connect()
    except BaseException:
        with contextlib.suppress(Exception):
            await client.disconnect()
        raise
    return client
