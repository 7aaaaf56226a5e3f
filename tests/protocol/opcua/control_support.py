"""Shared parts of the control-layer tests over OPC UA: one server per test module, real clients.

Starting a server costs about a second, so each control test module runs one (module
scope, its own event loop) and its tests use distinct resources or clean up after
themselves. The suite's task-leak check is re-declared here for that loop. A test module
imports the fixtures it uses (``module_loop_leak_check``, ``open_ua_fixture``,
``open_session_fixture``) and marks itself ``pytest.mark.asyncio(loop_scope="module")``.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from asyncua import Client, ua
from asyncua.ua.ua_binary import struct_from_binary
from labctl.ioc.access import AuditRecord
from labctl.server.app import Server
from labctl.server.passwords import hash_password
from labctl.server.site import parse_site

from tests.helpers import wait_for
from tests.protocol.opcua.conftest import open_client

SITE = "lab"
NAMESPACE = f"urn:labctl:{SITE}"
DI = "http://opcfoundation.org/UA/DI/"

#: user -> (role, password)
USERS = {
    "alice": ("operator", "alice-pw"),
    "bob": ("operator", "bob-pw"),
    "carol": ("operator", "carol-pw"),
    "dave": ("operator", "dave-pw"),
    "erin": ("expert", "erin-pw"),
    "vic": ("viewer", "vic-pw"),
    "root": ("admin", "root-pw"),
}


@functools.cache
def password_hash(user: str) -> str:
    """Hashes are slow on purpose: one per user per test run."""
    return hash_password(USERS[user][1])


def site_text(state_dir: Path, body: str, *, historian: bool = False) -> str:
    """A site with the test users, OPC UA on a free loopback port, no Channel Access."""
    users = "users:\n" + "".join(
        f'  - {{name: {u}, roles: [{role}], password_hash: "{password_hash(u)}"}}\n' for u, (role, _) in USERS.items()
    )
    return f"""
site: {SITE}
server:
  state_dir: "{state_dir}"
  opcua: {{host: 127.0.0.1, port: 0, trust: auto}}
  ca: {{enabled: false}}
historian: {{enabled: {str(historian).lower()}}}
{users}
{body}
"""


class Served:
    """A running server, its audit records, and clients that are closed at the end."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.audit: list[AuditRecord] = []
        server.db.add_audit_sink(self.audit.append)

    @property
    def url(self) -> str:
        return self.server.service("opcua").url  # type: ignore[attr-defined]

    @property
    def db(self) -> Any:
        return self.server.db

    @property
    def control(self) -> Any:
        return self.server.control  # type: ignore[attr-defined]

    def records(self, action: str, **match: Any) -> list[AuditRecord]:
        """Audit records of ``action`` whose fields equal ``match``."""
        return [r for r in self.audit if r.action == action and all(getattr(r, k) == v for k, v in match.items())]

    def mark(self) -> int:
        """Where the audit trail ends now, for :meth:`refusals`."""
        return len(self.audit)

    def refusals(self, since: int) -> list[tuple[str, str, str]]:
        """``(action, user, target)`` of each refusal audited since :meth:`mark` returned ``since``: one record per refusal."""
        return [(r.action, r.user, r.target) for r in self.audit[since:] if not r.accepted]


def module_server(body: str, *, historian: bool = False) -> Callable[..., Any]:
    """A module-scoped fixture running one server for ``body`` (site-file YAML after the users)."""

    @pytest_asyncio.fixture(scope="module", loop_scope="module")
    async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
        state = tmp_path_factory.mktemp("state")
        srv = Server(parse_site(site_text(state, body, historian=historian), "control-test.yaml"))
        s = Served(srv)
        await srv.start()
        try:
            yield s
        finally:
            await srv.stop()

    return served


@pytest_asyncio.fixture(name="no_leaked_tasks", autouse=True, loop_scope="module")
async def module_loop_leak_check() -> AsyncIterator[None]:
    """The suite's leak check, in the module's loop.

    The server outlives the test, so the tasks it runs for the test's clients (their
    connections and sessions) are given a few seconds to end after the clients are gone.
    """
    before = set(asyncio.all_tasks())
    yield
    current = asyncio.current_task()

    def running() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if t not in before and t is not current and not t.done()]

    try:
        await wait_for(lambda: not running(), timeout=5.0, what="the test's tasks to end")
    except TimeoutError:
        pass
    leaked = running()
    if leaked:
        for t in leaked:
            t.cancel()
        await asyncio.gather(*leaked, return_exceptions=True)
        pytest.fail(f"test leaked {len(leaked)} task(s): {[(t.get_name(), t.get_coro()) for t in leaked]}")


@pytest_asyncio.fixture(name="open_ua", loop_scope="module")
async def open_ua_fixture() -> AsyncIterator[Callable[..., Any]]:
    """``await open_ua(url, user)``: a connected plain asyncua client, disconnected at the end."""
    opened: list[Client] = []

    async def _open(url: str, user: str | None = None) -> Client:
        client = await open_client(url, user, USERS[user][1] if user else None)
        opened.append(client)
        return client

    yield _open
    for c in opened:
        try:
            await c.disconnect()
        except Exception:  # already disconnected by the test
            pass


@pytest_asyncio.fixture(name="open_session", loop_scope="module")
async def open_session_fixture() -> AsyncIterator[Callable[..., Any]]:
    """``await open_session(url, user)``: a labctl client session, closed at the end."""
    from labctl.clients.session import connect

    opened: list[Any] = []

    async def _open(url: str, user: str | None = None) -> Any:
        s = await connect(url, user, USERS[user][1] if user else None, "None")
        opened.append(s)
        return s

    yield _open
    for s in opened:
        await s.close()


async def indexes(client: Client) -> tuple[int, int]:
    """The site's and DI's namespace indexes."""
    return await client.get_namespace_index(NAMESPACE), await client.get_namespace_index(DI)


async def call(client: Client, path: str, method: str, *args: ua.Variant) -> ua.CallMethodResult:
    """Call ``Objects/<site>/<path>/<method>`` by NodeId; the raw result (status not checked)."""
    idx = await client.get_namespace_index(NAMESPACE)
    req = ua.CallMethodRequest()
    req.ObjectId = ua.NodeId(f"/{SITE}/{path}", idx)
    req.MethodId = ua.NodeId(f"/{SITE}/{path}/{method}", idx)
    req.InputArguments = list(args)
    (res,) = await client.uaclient.call([req])
    return res


async def call_diagnosed(client: Client, path: str, method: str, *args: ua.Variant) -> tuple[ua.CallMethodResult, dict[str, Any] | None]:
    """:func:`call`, asking for the operation's diagnostics: the raw result and the refusal the server sent as data (or None)."""
    idx = await client.get_namespace_index(NAMESPACE)
    req = ua.CallMethodRequest()
    req.ObjectId = ua.NodeId(f"/{SITE}/{path}", idx)
    req.MethodId = ua.NodeId(f"/{SITE}/{path}/{method}", idx)
    req.InputArguments = list(args)
    request = ua.CallRequest()
    request.Parameters.MethodsToCall = [req]
    request.RequestHeader.ReturnDiagnostics = 0x80  # Part 4 DiagnosticsMask: operation-level AdditionalInfo
    response = struct_from_binary(ua.CallResponse, await client.uaclient.protocol.send_request(request))
    response.ResponseHeader.ServiceResult.check()
    (res,) = response.Results
    infos = [i for i in response.DiagnosticInfos or [] if i is not None and i.AdditionalInfo]
    return res, (json.loads(infos[0].AdditionalInfo) if infos else None)


async def call_json(client: Client, method: str, *args: ua.Variant) -> Any:
    """A Control method's JSON answer (the call must succeed)."""
    res = await call(client, "Control", method, *args)
    res.StatusCode.check()
    return json.loads(res.OutputArguments[0].Value)


async def refusal(client: Client, which: str = "LastCallRefusal") -> str:
    """This client's session's last refusal sentence."""
    idx = await client.get_namespace_index(NAMESPACE)
    return await client.get_node(ua.NodeId(f"/{SITE}/Session/{which}", idx)).read_value()


def s(v: str) -> ua.Variant:
    return ua.Variant(v, ua.VariantType.String)


def d(v: float) -> ua.Variant:
    return ua.Variant(float(v), ua.VariantType.Double)


def i32(v: int) -> ua.Variant:
    return ua.Variant(v, ua.VariantType.Int32)


def i64(v: int) -> ua.Variant:
    return ua.Variant(v, ua.VariantType.Int64)


def b(v: bool) -> ua.Variant:
    return ua.Variant(v, ua.VariantType.Boolean)
