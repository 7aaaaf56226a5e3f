"""Fixtures for the user interfaces: real labctl servers on free loopback ports.

Terminal UI (``tui_*``): the simulated demo site in-process on the test's loop (Pilot
tests), a restartable one for the reconnect test, and for snapshot tests a small site of
soft PVs with a frozen clock served from a thread of its own (``snap_compare`` runs the
app with ``App.run``, which needs the test's thread for its own event loop).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from labctl.server.app import Overrides, Server
from labctl.server.passwords import hash_password
from labctl.server.site import SiteConfig, parse_site

from tests.helpers import wait_for

DEMO_SITE = Path(__file__).resolve().parents[2] / "config" / "demo.yaml"
#: The demo's accounts (config/demo.yaml): password = "<user>-demo".
TUI_DEMO_PASSWORDS = {u: f"{u}-demo" for u in ("viewer", "operator", "expert", "admin")}


class TuiDemo:
    """The simulated demo server, restartable on the same port with the same state."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.port = 0
        self.server: Server | None = None

    @property
    def url(self) -> str:
        return self.srv.service("opcua").url  # type: ignore[attr-defined]

    @property
    def srv(self) -> Server:
        assert self.server is not None, "the demo server is stopped"
        return self.server

    async def start(self) -> Server:
        overrides = Overrides(opcua_host="127.0.0.1", opcua_port=self.port, no_ca=True, state_dir=str(self.state_dir))
        self.server = Server.from_file(DEMO_SITE, overrides)
        await self.server.start()
        self.port = int(self.url.rsplit(":", 1)[1])
        return self.server

    async def stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            await server.stop()


@pytest.fixture
async def tui_demo(tmp_path: Path) -> AsyncIterator[TuiDemo]:
    """The demo site (simulated cryostat, source-meter, magnet, supply) served over OPC UA."""
    demo = TuiDemo(tmp_path / "state")
    await demo.start()
    try:
        yield demo
    finally:
        await demo.stop()


@pytest.fixture
def tui_app(tui_demo: TuiDemo) -> Callable[..., Any]:
    """``tui_app(user="operator", **kw)``: a LabctlApp for the demo server (not yet running)."""
    from labctl.clients.tui.app import LabctlApp

    def make(user: str | None = "operator", **kw: Any) -> LabctlApp:
        kw.setdefault("reconnect_min_s", 0.05)
        kw.setdefault("reconnect_max_s", 0.5)
        kw.setdefault("theme", "textual-dark")
        password = TUI_DEMO_PASSWORDS[user] if user else None
        return LabctlApp(tui_demo.url, user, password, "None", **kw)

    return make


# ---- snapshot site --------------------------------------------------------------------------

#: The frozen clock of the snapshot site (2025-06-15 15:06:40 UTC).
TUI_T0 = 1_750_000_000.0
TUI_SNAP_PASSWORDS = {"operator": "operator-pw", "expert": "expert-pw"}


@functools.cache
def _hash(user: str) -> str:
    return hash_password(TUI_SNAP_PASSWORDS[user])


def tui_snap_site(state_dir: Path) -> SiteConfig:
    """A small site of soft and derived PVs: a value per type, alarms of each severity, two lockable resources."""
    users = "".join(f'  - {{name: {u}, roles: [{u}], password_hash: "{_hash(u)}"}}\n' for u in TUI_SNAP_PASSWORDS)
    text = f"""
site: lab
server:
  state_dir: "{state_dir}"
  opcua: {{host: 127.0.0.1, port: 0, trust: auto}}
  ca: {{enabled: false}}
historian: {{enabled: false}}
users:
{users}
resources:
  - {{name: stage, description: "sample stage", lockable: true}}
  - {{name: laser, description: "pump laser", lockable: true}}
pvs:
  - {{name: "LAB:TEMP", type: float64, unit: K, description: "sample temperature", display: [0, 300], drive: [0, 350],
     writable: true, initial: 4.2, alarm: {{high: 100, hihi: 200}}}}
  - {{name: "LAB:SHIELD", type: float64, unit: K, description: "radiation shield", initial: 150.5, alarm: {{high: 100, hihi: 200}}}}
  - {{name: "LAB:OVEN", type: float64, unit: C, description: "bake-out oven", initial: 250.0, alarm: {{high: 150, hihi: 200}}}}
  - {{name: "LAB:GAUGE", type: float64, unit: mbar, description: "chamber gauge", initial: 1.0e-6}}
  - {{name: "LAB:MODE", type: enum, states: ["OFF", "LOW", "HIGH"], writable: true, initial: "LOW", description: "heater mode"}}
  - {{name: "LAB:VALVE", type: bool, writable: true, initial: false, description: "gas valve open"}}
  - {{name: "LAB:NOTE", type: string, writable: true, initial: "ready", description: "operator note"}}
  - {{name: "LAB:WAVE", type: "float64[]", unit: V, writable: true, initial: [1.0, 2.0, 3.0], description: "waveform"}}
  - {{name: "STAGE:X", type: float64, unit: mm, writable: true, initial: 12.5, drive: [0, 100], resource: stage, description: "stage x"}}
  - {{name: "STAGE:Y", type: float64, unit: mm, writable: true, initial: 40.0, drive: [0, 100], resource: stage, description: "stage y"}}
  - {{name: "LASER:POWER", type: float64, unit: W, writable: true, initial: 0.5, drive: [0, 2], resource: laser, description: "laser power"}}
  - {{name: "LAB:TEMP:MK", type: float64, unit: mK, expr: "t * 1000", inputs: {{t: "LAB:TEMP"}}, description: "sample temperature, mK"}}
procedures:
  note:
    description: write a note and read the stage position
    resources: [stage]
    params:
      text: {{type: string, default: "hello", description: "the note"}}
    steps:
      - set: {{pv: "LAB:NOTE", value: "=text"}}
      - read: {{pvs: ["STAGE:X", "STAGE:Y"], label: "position"}}
      - log: "note {{text}} written"
interlocks:
  - {{name: oven_hot, description: "bake-out oven too hot", pv: "LAB:OVEN", trip: 300, resume: 200, reset: manual}}
"""
    return parse_site(text, "tui-snapshot.yaml")


class ThreadedServer:
    """A labctl server running on an event loop in its own thread (for tests whose thread runs the app)."""

    def __init__(self, site: SiteConfig, prepare: Callable[[Server], None] | None = None) -> None:
        self.site = site
        self.prepare = prepare
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tui-test-server", daemon=True)
        self.server: Server | None = None

    def call(self, fn: Callable[[], Any], timeout_s: float = 30.0) -> Any:
        """Run ``fn()`` on the server's loop and return its result (awaited if a coroutine)."""

        async def run() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout_s)

    def start(self) -> None:
        self.thread.start()

        async def start() -> None:
            self.server = Server(self.site)
            if self.prepare is not None:
                self.prepare(self.server)
            await self.server.start()

        self.call(start)

    def stop(self) -> None:
        async def stop() -> None:
            if self.server is not None:
                await self.server.stop()
            # as asyncio.run ends a loop: closing transports get their turn, leftovers are cancelled
            await asyncio.sleep(0)
            leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in leftovers:
                t.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)
            await self.loop.shutdown_asyncgens()

        self.call(stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.service("opcua").url  # type: ignore[attr-defined]


def freeze(server: Server) -> None:
    """Stamp every reading with :data:`TUI_T0` and keep the clock there (before start)."""
    db = server.db
    db.clock = lambda: TUI_T0
    for name in db.names():
        r = db.read(name)
        if r.valid and not db.info(name).expr:  # derived PVs follow their inputs
            db.post(name, r.value, timestamp=TUI_T0)


@pytest.fixture
def tui_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time is UTC (the UI shows local times)."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def tui_snap_server(tmp_path: Path, tui_utc: None) -> Iterator[ThreadedServer]:
    """The snapshot site with a frozen clock, a broken gauge, the laser locked by expert and one job done."""
    from labctl.ioc.types import Identity, Status

    def prepare(server: Server) -> None:
        freeze(server)
        server.db.invalidate(["LAB:GAUGE"], Status.COMM, timestamp=TUI_T0)

    srv = ThreadedServer(tui_snap_site(tmp_path / "state"), prepare)
    srv.start()
    expert = Identity("expert", frozenset({"expert"}), "opcua", "127.0.0.1")
    control = srv.call(lambda: srv.server.control)  # type: ignore[union-attr]
    srv.call(lambda: control.request_lock("laser", expert, duration_s=600, client="console"))
    operator = Identity("operator", frozenset({"operator"}), "opcua", "127.0.0.1")
    job = srv.call(lambda: control.jobs.submit("note", {"text": "aligned"}, operator))
    srv.call(lambda: wait_for(lambda: job.state.final, what="the job to end"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def tui_snap_app(tui_snap_server: ThreadedServer) -> Callable[..., Any]:
    """``tui_snap_app(**kw)``: a LabctlApp of operator on the snapshot site."""
    from labctl.clients.tui.app import LabctlApp

    def make(**kw: Any) -> LabctlApp:
        kw.setdefault("theme", "textual-dark")
        return LabctlApp(tui_snap_server.url, "operator", TUI_SNAP_PASSWORDS["operator"], "None", **kw)

    return make


#: PVs of the big site (20 groups of 100, as a lab with many channels).
TUI_BIG_COUNT = 2000


@pytest.fixture
async def tui_big_server(tmp_path: Path) -> AsyncIterator[Server]:
    """A site of :data:`TUI_BIG_COUNT` soft PVs (read-only numbers), served in-process."""
    users = "".join(f'  - {{name: {u}, roles: [{u}], password_hash: "{_hash(u)}"}}\n' for u in TUI_SNAP_PASSWORDS)
    pvs = "".join(
        f'  - {{name: "BIG:G{i // 100:02d}:CH{i % 100:02d}", type: float64, unit: V, initial: 0.0}}\n' for i in range(TUI_BIG_COUNT)
    )
    text = f"""
site: big
server:
  state_dir: "{tmp_path / 'state'}"
  opcua: {{host: 127.0.0.1, port: 0, trust: auto}}
  ca: {{enabled: false}}
historian: {{enabled: false}}
users:
{users}
pvs:
{pvs}
"""
    server = Server(parse_site(text, "tui-big.yaml"))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
