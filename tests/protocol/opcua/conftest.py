"""Fixtures: an in-process labctl server on a free port, and real asyncua clients.

Servers run the real core (soft and derived PVs from a site file) and the real OPC UA
service; Channel Access and the historian are switched off in the site. Instrument PVs
are served from :class:`ScriptedInstrument`, a small driver with behaviour (values,
read-back, refusals) bound through the core's own instrument link.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from labctl.ioc.access import AuditRecord
from labctl.ioc.build import build_database
from labctl.ioc.database import Database
from labctl.ioc.errors import DriverError
from labctl.server.app import Server
from labctl.server.opcua import OpcUaService
from labctl.server.passwords import hash_password
from labctl.server.site import SiteConfig, parse_site

SITE = "lab"
NAMESPACE = f"urn:labctl:{SITE}"

#: Test accounts: one per default role, and one with a site-defined role.
PASSWORDS = {
    "viewer": "viewer-pw",
    "operator": "operator-pw",
    "expert": "expert-pw",
    "admin": "admin-pw",
    "tech": "tech-pw",
}
ROLES = {"viewer": "viewer", "operator": "operator", "expert": "expert", "admin": "admin", "tech": "cryo_tech"}

PVS = """
pvs:
  - {name: "LAB:TEMP", type: float64, unit: K, description: "sample temperature", display: [0, 300], drive: [0, 350],
     writable: true, initial: 4.2, alarm: {high: 100, hihi: 200}}
  - {name: "LAB:COUNT", type: int, unit: s, writable: true, initial: 7, drive: [0, 1000]}
  - {name: "LAB:VALVE", type: bool, writable: true, initial: false, description: "gas valve open"}
  - {name: "LAB:MODE", type: enum, states: ["OFF", "LOW", "HIGH"], writable: true, initial: "LOW"}
  - {name: "LAB:NOTE", type: string, writable: true, initial: "hello", length: 20}
  - {name: "LAB:WAVE", type: "float64[]", unit: V, writable: true, initial: [1.0, 2.0, 3.0], length: 3, display: [-10, 10]}
  - {name: "LAB:PRES", type: float64, unit: mbar, initial: 1.0e-6, description: "read-only gauge"}
  - {name: "LAB:FLOW", type: float64, unit: "sccm", initial: 2.5, writable: true}
  - {name: "LAB:FRESH", type: float64, unit: K, writable: true}
  - {name: "LAB:SLOW", type: float64, writable: true, initial: 0.0, deadband: {monitor: 0.5}}
  - {name: "LAB:HEATER", type: float64, unit: W, writable: true, initial: 0.0, drive: [0, 5], resource: cryostat}
  - {name: "LAB:DOUBLE", type: float64, unit: K, expr: "2 * t", inputs: {t: "LAB:TEMP"}}
"""


@functools.cache
def password_hash(user: str) -> str:
    """Hashes are slow on purpose: make each once per test run."""
    return hash_password(PASSWORDS[user])


def site_text(
    state_dir: Path,
    *,
    pvs: str = PVS,
    anonymous: bool = True,
    security: Sequence[str] = ("None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"),
    users: str | None = None,
    instruments: str = "",
    trust: str = "auto",
) -> str:
    """The YAML of a test site (OPC UA on loopback port 0, no Channel Access, no historian)."""
    if users is None:
        users = "users:\n" + "".join(
            f'  - {{name: {u}, roles: [{ROLES[u]}], password_hash: "{password_hash(u)}"}}\n' for u in PASSWORDS
        )
    return f"""
site: {SITE}
server:
  state_dir: "{state_dir}"
  opcua: {{host: 127.0.0.1, port: 0, anonymous: {str(anonymous).lower()}, security: {list(security)}, trust: {trust}}}
  ca: {{enabled: false}}
historian: {{enabled: false}}
roles:
  cryo_tech: {{description: "writes the cryostat only", write: [cryostat]}}
resources:
  - {{name: cryostat, lockable: false}}
{users}
{instruments}
{pvs}
"""


def make_site(tmp_path: Path, **kw: Any) -> SiteConfig:
    """A validated test site whose state lives under ``tmp_path``."""
    return parse_site(site_text(tmp_path / "state", **kw), "test-site.yaml")


class AuditLog(list):
    """Every audit record the database emits."""

    def of(self, action: str) -> list[AuditRecord]:
        return [r for r in self if r.action == action]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    """A started server for the default test site."""
    srv = Server(make_site(tmp_path))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
def service(server: Server) -> OpcUaService:
    return server.service("opcua")  # type: ignore[return-value]


@pytest.fixture
def audit(server: Server) -> AuditLog:
    log = AuditLog()
    server.db.add_audit_sink(log.append)
    return log


@pytest.fixture
async def connect_to() -> AsyncIterator[Any]:
    """``await connect_to(url, user=None, *, password=None, security=None)``: a connected asyncua client, closed at the end."""
    clients: list[Client] = []

    async def _connect(url: str, user: str | None = None, *, password: str | None = None, security: str | None = None) -> Client:
        client = await open_client(url, user, password, security=security)
        clients.append(client)
        return client

    yield _connect
    for c in clients:
        await c.disconnect()


@pytest.fixture
def connect(service: OpcUaService, connect_to: Any) -> Any:
    """``await connect(user=None, *, password=None, security=None)`` to the default test server."""

    async def _connect(user: str | None = None, **kw: Any) -> Client:
        return await connect_to(service.url, user, **kw)

    return _connect


async def open_client(url: str, user: str | None = None, password: str | None = None, *, security: str | None = None) -> Client:
    """A connected asyncua client (``security``: None, ``Sign`` or ``SignAndEncrypt``, Basic256Sha256)."""
    client = Client(url, timeout=10)
    client.session_timeout = 600_000
    client.application_uri = "urn:labctl:test-client"
    if user is not None:
        client.set_user(user)
        client.set_password(password if password is not None else PASSWORDS[user])
    if security is not None:
        from asyncua.crypto import uacrypto
        from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
        from labctl.clients.connection import application_certificate

        cert, key = application_certificate()
        mode = ua.MessageSecurityMode.Sign if security == "Sign" else ua.MessageSecurityMode.SignAndEncrypt
        await client.set_security(
            SecurityPolicyBasic256Sha256, uacrypto.CertProperties(cert, "der"), uacrypto.CertProperties(key, "der"), mode=mode
        )
    try:
        await client.connect()
    except BaseException:
        await client.disconnect()
        raise
    return client


async def ns(client: Client) -> int:
    return await client.get_namespace_index(NAMESPACE)


async def pv_node(client: Client, name: str) -> Any:
    return client.get_node(ua.NodeId(name, await ns(client)))


# ---- instruments ------------------------------------------------------------------------


class ScriptedInstrument:
    """An instrument with behaviour: channels hold values, writes read back, refusals on demand."""

    def __init__(self, name: str, values: dict[str, Any]) -> None:
        self.name = name
        self.values = dict(values)
        self.fail_writes: DriverError | None = None

    def channels(self) -> Sequence[str]:
        return list(self.values)

    async def connect(self) -> None:
        return None

    async def read(self, channels: Sequence[str]) -> dict[str, Any]:
        return {c: self.values[c] for c in channels}

    async def write(self, channel: str, value: Any) -> Any:
        if self.fail_writes is not None:
            raise self.fail_writes
        self.values[channel] = value
        return value

    async def close(self) -> None:
        return None

    def bind_push(self, push: Any) -> None:
        return None


INSTRUMENT = """
instruments:
  - name: ctl
    driver: scpi
    resource: "TCPIP::192.0.2.1::5025::SOCKET"
    scan_s: 0.1
    lock_resource: cryostat
    pvs:
      - {name: "CTL:TEMP", type: float64, unit: K, channel: temperature, description: "controller temperature"}
      - {name: "CTL:SETP", type: float64, unit: K, channel: setpoint, writable: true, drive: [0, 300]}
"""


@dataclass
class Host:
    """What a service needs of :class:`labctl.server.app.Server` (database, site, directories),
    for sites whose instruments are :class:`ScriptedInstrument` rather than registry drivers."""

    site: SiteConfig
    db: Database
    state_dir: Path
    base_dir: Path


@pytest.fixture
async def instrument_server(tmp_path: Path) -> AsyncIterator[tuple[OpcUaService, ScriptedInstrument, Database]]:
    """The OPC UA service over a site with a scripted instrument ``ctl`` (channels temperature, setpoint)."""
    site = make_site(tmp_path, instruments=INSTRUMENT)
    db = build_database(site)
    inst = ScriptedInstrument("ctl", {"temperature": 4.0, "setpoint": 1.0})
    link = db.attach(inst, timeout_s=1.0)
    host = Host(site, db, tmp_path / "state", tmp_path)
    host.state_dir.mkdir(parents=True, exist_ok=True)
    service = OpcUaService(host)  # type: ignore[arg-type]
    await service.start()
    await db.start()
    await link.wait_connected(5.0)
    try:
        yield service, inst, db
    finally:
        await db.stop()
        await service.stop()
