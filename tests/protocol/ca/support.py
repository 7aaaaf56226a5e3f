"""Channel Access test support: a real database and CA service on free loopback ports, and real clients.

* :func:`serve` starts a database (soft PVs from a site file, optionally a test driver)
  and the CA service on a port free for TCP and UDP, with beacons to another free port.
* :func:`serve_server` starts a whole :class:`~labctl.server.app.Server` for a site file: the
  control layer (arbiter) and the CA service wired as in production.
* :class:`PyEpics` runs ``pyepics_worker.py`` in a subprocess pinned to that port (libca
  reads its environment once per process) and talks to it in JSON lines; its answers and
  events are awaited with timeouts, never slept for.
* :class:`GatedDriver` is an instrument whose writes wait for the test.
* :func:`client` is caproto's asyncio client in the test's loop, reporting the user and
  host a test chooses; :class:`Recorder` records its subscriptions' updates.

The fixtures are in ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caproto import SubscriptionType
from caproto.asyncio.client import Context
from labctl.ioc.access import AuditRecord
from labctl.ioc.build import build_database
from labctl.ioc.database import Database
from labctl.ioc.errors import DriverFault, DriverTimeout
from labctl.server.app import Server
from labctl.server.ca.service import CAService
from labctl.server.control import ControlService
from labctl.server.site import SiteConfig, parse_site

from tests.helpers import free_port

WORKER = Path(__file__).with_name("pyepics_worker.py")
TIMEOUT_S = 10.0

#: The PVs most tests serve: one of each type, with metadata.
PVS = """
pvs:
  - name: TEST:TEMP
    type: float64
    description: mixing chamber temperature
    unit: K
    precision: 4
    display: [0, 300]
    drive: [0, 250]
    alarm: {lolo: 1, low: 5, high: 200, hihi: 250, hysteresis: 0.5}
    deadband: {monitor: 0.01, archive: 0.5}
    writable: true
    initial: 10.0
  - name: TEST:COUNT
    type: int
    description: a counter
    unit: counts
    display: [0, 1000]
    drive: [0, 500]
    alarm: {high: 400}
    writable: true
    initial: 7
  - name: TEST:MODE
    type: enum
    description: operating mode
    states: [OFF, ON, AUTO]
    writable: true
    initial: ON
  - name: TEST:ENABLED
    type: bool
    writable: true
    initial: false
  - name: TEST:LABEL
    type: string
    description: a label
    length: 60
    writable: true
    initial: hello
  - name: TEST:SPECTRUM
    type: "float64[]"
    description: a spectrum
    unit: counts
    precision: 2
    display: [0, 100]
    length: 8
    writable: true
    initial: [0, 1, 2, 3, 4, 5, 6, 7]
  - name: TEST:RO
    type: float64
    unit: mbar
    initial: 1.0e-6
"""


def site_yaml(
    port: int | None,
    beacon_port: int | None,
    *,
    access: str = "",
    prefix: str = "",
    extra: str = "",
    pvs: str = PVS,
    interfaces: str | None = "[127.0.0.1]",
    state_dir: str | None = None,
) -> str:
    """A site file serving ``pvs`` over CA on ``port`` (OPC UA and the historian off).

    ``None`` leaves a setting out of the site file (the environment decides).
    """
    access_block = "\n".join("      " + line for line in access.strip().splitlines())
    settings = {"port": port, "beacon_port": beacon_port, "interfaces": interfaces}
    network = "".join(f"    {key}: {value}\n" for key, value in settings.items() if value is not None)
    return f"""
site: catest
historian: {{enabled: false}}
server:
  state_dir: "{state_dir or "./var"}"
  opcua: {{enabled: false}}
  ca:
    prefix: "{prefix}"
{network}    access:
{access_block or "      rules: []"}
{extra}
{pvs}
"""


@dataclass
class Host:
    """What the CA service reads from its server: the database and the site."""

    db: Database
    site: SiteConfig


@dataclass
class Served:
    """A running database + CA service, and the audit records they produced."""

    db: Database
    service: CAService
    site: SiteConfig
    audit: list[AuditRecord] = field(default_factory=list)

    @property
    def port(self) -> int:
        """The server port clients search on."""
        return self.service.port


@asynccontextmanager
async def serve(site_text: str, *, drivers: Sequence[Any] = ()) -> AsyncIterator[Served]:
    """Run a database and the CA service for ``site_text`` until the block ends."""
    site = parse_site(site_text, "test-site.yaml")
    db = build_database(site)
    served = Served(db, CAService(Host(db, site)), site)
    db.add_audit_sink(served.audit.append)
    for driver in drivers:
        db.attach(driver, timeout_s=5.0)
    await served.service.start()
    try:
        await db.start()
        yield served
    finally:
        await db.stop()
        await served.service.stop()


@dataclass
class ServedServer:
    """A running whole server, and the audit records it produced."""

    server: Server
    audit: list[AuditRecord] = field(default_factory=list)

    @property
    def db(self) -> Database:
        """The process database."""
        return self.server.db

    @property
    def service(self) -> CAService:
        """The CA service."""
        service = self.server.service("ca")
        assert isinstance(service, CAService)
        return service

    @property
    def control(self) -> ControlService:
        """The control layer (arbiter, jobs...)."""
        return self.server.control

    @property
    def port(self) -> int:
        """The server port clients search on."""
        return self.service.port


@asynccontextmanager
async def serve_server(site_text: str) -> AsyncIterator[ServedServer]:
    """Run a whole server (control layer and CA service) for ``site_text`` until the block ends."""
    served = ServedServer(Server(parse_site(site_text, "test-site.yaml")))
    served.db.add_audit_sink(served.audit.append)
    async with served.server:
        yield served


class WorkerError(AssertionError):
    """The pyepics worker failed a request or ended."""


class PyEpics:
    """A pyepics/libca client in a subprocess (see ``pyepics_worker.py``)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._answers: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next = 0
        self._stderr: list[str] = []
        self._reader = asyncio.create_task(self._read(), name="pyepics stdout")
        self._err_reader = asyncio.create_task(self._read_stderr(), name="pyepics stderr")

    @classmethod
    async def start(cls, port: int, env: dict[str, str] | None = None) -> PyEpics:
        """Start a worker whose libca searches 127.0.0.1 on ``port`` only."""
        environ = dict(os.environ)
        environ.update(
            {
                "EPICS_CA_ADDR_LIST": "127.0.0.1",
                "EPICS_CA_AUTO_ADDR_LIST": "NO",
                "EPICS_CA_SERVER_PORT": str(port),
                "EPICS_CA_REPEATER_PORT": str(free_port()),
                "EPICS_CA_CONN_TMO": "5",
                "PYTHONUNBUFFERED": "1",
            }
        )
        environ.update(env or {})
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=environ,
            cwd=str(WORKER.parent),
        )
        worker = cls(proc)
        await worker.event(lambda e: e["event"] == "ready", timeout=30.0)
        return worker

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            message = json.loads(line)
            if "id" in message:
                self._answers.pop(message["id"]).set_result(message)
            else:
                await self.events.put(message)
        for fut in self._answers.values():
            fut.set_exception(WorkerError(f"the pyepics worker ended: {''.join(self._stderr)[-2000:]}"))

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self._stderr.append(line.decode(errors="replace"))

    async def request(self, op: str, *, timeout: float = TIMEOUT_S, **kw: Any) -> dict[str, Any]:
        """Send one request and return the worker's answer (``ok`` true or false)."""
        assert self.proc.stdin is not None
        self._next += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._answers[self._next] = fut
        self.proc.stdin.write((json.dumps({"id": self._next, "op": op, **kw}) + "\n").encode())
        await self.proc.stdin.drain()
        return await asyncio.wait_for(fut, timeout)

    async def call(self, op: str, *, timeout: float = TIMEOUT_S, **kw: Any) -> dict[str, Any]:
        """Like :meth:`request`, but a failed request fails the test with the worker's error."""
        answer = await self.request(op, timeout=timeout, **kw)
        if not answer["ok"]:
            raise WorkerError(f"{op} {kw}: {answer['error']}\n{answer.get('trace', '')}")
        return answer

    async def event(
        self, predicate: Callable[[dict[str, Any]], bool] = lambda e: True, timeout: float = TIMEOUT_S
    ) -> dict[str, Any]:
        """The next event satisfying ``predicate`` (earlier ones that do not are dropped)."""

        async def wait() -> dict[str, Any]:
            while True:
                event = await self.events.get()
                if predicate(event):
                    return event

        try:
            return await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise WorkerError(
                f"no matching event within {timeout} s; stderr: {''.join(self._stderr)[-2000:]}"
            ) from None

    async def close(self) -> None:
        """End the worker (EOF on stdin) and wait for it."""
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 15.0)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        await asyncio.gather(self._reader, self._err_reader, return_exceptions=True)


@asynccontextmanager
async def pyepics(port: int, env: dict[str, str] | None = None) -> AsyncIterator[PyEpics]:
    """A pyepics worker for the server on ``port``."""
    worker = await PyEpics.start(port, env)
    try:
        yield worker
    finally:
        await worker.close()


class GatedDriver:
    """A test instrument whose writes wait until the test opens the gate.

    Its channels hold values in memory; ``write`` records the call, waits for
    :meth:`release`, then stores the value and returns it as the read-back.
    """

    def __init__(self, name: str, values: dict[str, Any]) -> None:
        self.name = name
        self.values = dict(values)
        self.writing = asyncio.Event()
        """Set when a write reached the driver (and is held)."""
        self.written: list[tuple[str, Any]] = []
        self.answering = True
        """False: every read times out, as an instrument that stopped answering."""
        self._gate = asyncio.Event()
        self._push: Any = None

    def release(self) -> None:
        """Let held and future writes finish."""
        self._gate.set()

    def channels(self) -> Sequence[str]:
        return list(self.values)

    async def connect(self) -> None:
        return None

    async def read(self, channels: Sequence[str]) -> dict[str, Any]:
        if not self.answering:
            raise DriverTimeout(self.name, "no answer")
        return {c: self.values[c] for c in channels}

    async def write(self, channel: str, value: Any) -> Any:
        self.written.append((channel, value))
        self.writing.set()
        await self._gate.wait()
        if value == -1:
            raise DriverFault(self.name, "the instrument rejected the value")
        self.values[channel] = value
        return value

    async def close(self) -> None:
        return None

    def bind_push(self, push: Any) -> None:
        self._push = push


# ---- caproto's asyncio client ------------------------------------------------------


@asynccontextmanager
async def client(port: int, caproto_env: Any, user: str = "alice", host: str = "lab-pc") -> AsyncIterator[Context]:
    """A caproto client reporting ``user``@``host``, searching the server on ``port``."""
    caproto_env(port)
    ctx = Context(client_name=user, host_name=host, timeout=10.0)
    try:
        yield ctx
    finally:
        await ctx.disconnect()


async def connect(ctx: Context, name: str) -> Any:
    """The connected PV ``name``."""
    (pv,) = await ctx.get_pvs(name, timeout=10.0)
    await pv.wait_for_connection(timeout=10.0)
    return pv


class Recorder:
    """Subscriptions whose updates are recorded, awaitable by condition."""

    def __init__(self) -> None:
        self.got: dict[str, list[tuple[Any, int, int]]] = {}
        self._changed = asyncio.Condition()
        self._subs: list[tuple[Any, Any]] = []  # caproto holds callbacks weakly: keep them

    def add(self, pv: Any, key: str, mask: SubscriptionType) -> None:
        self.got[key] = []
        sub = pv.subscribe(data_type="time", mask=mask)

        async def record(sub: Any, response: Any) -> None:  # a coroutine: caproto runs them in order
            value = response.data[0] if len(response.data) == 1 else response.data.tolist()
            value = value.item() if hasattr(value, "item") else value
            self.got[key].append((value, int(response.metadata.severity), int(response.metadata.status)))
            async with self._changed:
                self._changed.notify_all()

        sub.add_callback(record)
        self._subs.append((sub, record))

    async def until(self, predicate: Any, timeout: float = 10.0) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    async def close(self) -> None:
        for sub, _ in self._subs:
            await sub.clear()
