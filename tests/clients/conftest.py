"""Fixtures: a real labctl server (core + OPC UA) on a free loopback port for the client library and CLI."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from labctl.server.app import Server
from labctl.server.passwords import hash_password
from labctl.server.site import parse_site

PASSWORDS = {"viewer": "viewer-pw", "operator": "operator-pw"}


@functools.cache
def password_hash(user: str) -> str:
    return hash_password(PASSWORDS[user])


def site_text(state_dir: Path) -> str:
    return f"""
site: bench
server:
  state_dir: "{state_dir}"
  opcua: {{host: 127.0.0.1, port: 0, trust: auto}}
  ca: {{enabled: false}}
historian: {{enabled: false}}
users:
  - {{name: viewer, roles: [viewer], password_hash: "{password_hash('viewer')}"}}
  - {{name: operator, roles: [operator], password_hash: "{password_hash('operator')}"}}
pvs:
  - {{name: "B:TEMP", type: float64, unit: K, description: "bench temperature", display: [0, 300], drive: [0, 350],
     writable: true, initial: 4.2, alarm: {{high: 100, hihi: 200}}}}
  - {{name: "B:COUNT", type: int, writable: true, initial: 7}}
  - {{name: "B:ON", type: bool, writable: true, initial: false}}
  - {{name: "B:MODE", type: enum, states: ["OFF", "LOW", "HIGH"], writable: true, initial: "OFF"}}
  - {{name: "B:NOTE", type: string, writable: true, initial: "hello"}}
  - {{name: "B:WAVE", type: "float64[]", unit: V, writable: true, initial: [1.0, 2.0]}}
  - {{name: "B:PRES", type: float64, unit: mbar, initial: 1.0e-6, description: "gauge"}}
  - {{name: "B:NEW", type: float64, writable: true}}
"""


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    srv = Server(parse_site(site_text(tmp_path / "state"), "bench.yaml"))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
def url(server: Server) -> str:
    return server.service("opcua").url  # type: ignore[attr-defined]
