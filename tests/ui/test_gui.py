"""The control-room display (``labctl gui``) against real in-process servers, offscreen.

Each server runs on its own asyncio loop in a thread (:class:`GuiServerThread`): Qt owns
the test's main thread, and ``qtbot.waitUntil`` spins Qt's event loop, which would starve
an asyncio server sharing that thread. The display connects over OPC UA on loopback
through its own link thread, exactly as on a wall screen. Changes are made on the server
(``db.post``, the cryostat plant, the control layer) and the test waits for the window
to show them; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import asyncio
import functools
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from labctl.clients.gui.layout import Layout, load_layout, parse_layout
from labctl.clients.gui.link import Link
from labctl.clients.gui.qtcompat import check_bindings
from labctl.clients.gui.style import SEVERITY_COLORS, STALE_COLORS
from labctl.clients.gui.window import MainWindow
from labctl.ioc.types import Identity, Severity
from labctl.server.app import Overrides, Server
from labctl.server.passwords import hash_password
from labctl.server.site import SiteConfig, parse_site

from tests.sites import FAST_CRYOSTAT

pytestmark = pytest.mark.gui

ROOT = Path(__file__).resolve().parents[2]
PASSWORDS = {"operator": "operator-pw", "viewer": "viewer-pw", "guest": "guest-pw", "root": "root-pw"}
DEMO_PASSWORDS = {"viewer": "viewer-demo", "operator": "operator-demo"}  # the demo site's documented accounts
OLGA = Identity("olga", frozenset({"operator"}), "test")
WAIT_MS = 15_000


@functools.cache
def password_hash(user: str) -> str:
    """Hashes are slow on purpose: make each once per run."""
    return hash_password(PASSWORDS[user])


def wall_site(state_dir: Path, *, historian: bool = False) -> str:
    """A bench site with a simulated cryostat whose time constants are short, so it warms in about a second."""
    return f"""
site: wall
server:
  state_dir: "{state_dir}"
  opcua: {{host: 127.0.0.1, port: 0, trust: auto}}
  ca: {{enabled: false}}
historian: {{enabled: {str(historian).lower()}, batch_age_s: 0.05}}
users:
  - {{name: operator, roles: [operator], password_hash: "{password_hash('operator')}"}}
  - {{name: viewer, roles: [viewer], password_hash: "{password_hash('viewer')}"}}
  - {{name: guest, roles: [viewer], password_hash: "{password_hash('guest')}"}}
  - {{name: root, roles: [admin], password_hash: "{password_hash('root')}"}}
resources: [{{name: cryostat, lockable: true}}]
{FAST_CRYOSTAT}pvs:
  - {{name: "B:SIG", type: float64, unit: V, writable: true, initial: 0.0, description: "bench signal"}}
  - {{name: "B:PRES", type: float64, unit: mbar, initial: 1.0e-6}}
  - {{name: "B:AUX", type: float64, unit: A, writable: true, initial: 0.0}}
  - {{name: "B:FINE", type: float64, unit: K, precision: 4, initial: 0.0146309}}
  - {{name: "B:STEADY", type: float64, unit: K, precision: 2, initial: 4.2}}
procedures:
  wait_for_signal:
    resources: [cryostat]
    steps:
      - wait: {{until: "s > 100", inputs: {{s: "B:SIG"}}, timeout_s: 60}}
interlocks:
  - name: mxc_warm
    pv: "CRYO:MXC:TEMP"
    warn: 0.04
    trip: 0.05
    resume: 0.03
    for_s: 0.3
    reset: manual
    actions:
      hold_queue: true
      set:
        - {{pv: "CRYO:MXC:HTR:RANGE", value: 0}}
        - {{pv: "CRYO:STILL:HTR", value: 0}}
"""


class GuiServerThread:
    """A labctl server on its own event loop in a daemon thread; restartable on the same port.

    ``pki_cache`` keeps each site's OPC UA server certificate for the run: making an RSA
    key takes seconds, and a certificate is the same for every server of a site.
    """

    def __init__(self, site: SiteConfig, base_dir: Path, pki_cache: Path | None = None) -> None:
        self.site = site
        self.base_dir = base_dir
        self.pki_cache = pki_cache / site.site if pki_cache is not None else None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gui-test-server", daemon=True)
        self.server: Server | None = None
        self.port = 0

    def run(self, coro: Any, timeout_s: float = 60.0) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def call(self, fn: Callable[[Server], Any]) -> Any:
        """Call ``fn(server)`` on the server's loop (its state belongs to that loop)."""

        async def on_loop() -> Any:
            assert self.server is not None
            return fn(self.server)

        return self.run(on_loop())

    def post(self, name: str, value: Any) -> None:
        """A new value of a soft PV, as a driver would post it."""
        self.call(lambda s: s.db.post(name, value))

    def start(self) -> None:
        pki = Path(self.site.server.state_dir) / "pki"
        if self.pki_cache is not None and self.pki_cache.exists():
            shutil.copytree(self.pki_cache, pki)
        self.thread.start()
        self._start(self.site)
        self.port = int(self.url.rsplit(":", 1)[1])
        if self.pki_cache is not None and not self.pki_cache.exists():
            shutil.copytree(pki, self.pki_cache)

    def _start(self, site: SiteConfig) -> None:
        async def make() -> Server:
            srv = Server(site, base_dir=self.base_dir)
            await srv.start()
            return srv

        self.server = self.run(make())

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.service("opcua").url  # type: ignore[attr-defined]

    def restart(self) -> None:
        """Stop the server and start a fresh one (new database) on the same port."""
        assert self.server is not None
        self.run(self.server.stop())
        self._start(Overrides(opcua_port=self.port).apply(self.site))

    def stop(self) -> None:
        if self.server is not None:
            self.run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="session")
def gui_pki_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where server certificates are kept for the run (see GuiServerThread)."""
    return tmp_path_factory.mktemp("gui-pki")


@pytest.fixture
def gui_server(tmp_path: Path, gui_pki_cache: Path) -> Iterator[GuiServerThread]:
    """The bench site with the fast cryostat, no historian."""
    st = GuiServerThread(parse_site(wall_site(tmp_path / "state"), "wall-site.yaml"), tmp_path, gui_pki_cache)
    st.start()
    yield st
    st.stop()


@pytest.fixture(scope="module")
def gui_shared_server(tmp_path_factory: pytest.TempPathFactory, gui_pki_cache: Path) -> Iterator[GuiServerThread]:
    """One bench server for the tests that only read, or change PVs no other test looks at."""
    base = tmp_path_factory.mktemp("gui-shared")
    st = GuiServerThread(parse_site(wall_site(base / "state"), "wall-site.yaml"), base, gui_pki_cache)
    st.start()
    yield st
    st.stop()


@pytest.fixture
def gui_history_server(tmp_path: Path, gui_pki_cache: Path) -> Iterator[GuiServerThread]:
    """The bench site with an SQLite historian."""
    st = GuiServerThread(parse_site(wall_site(tmp_path / "state", historian=True), "wall-site.yaml"), tmp_path, gui_pki_cache)
    st.start()
    yield st
    st.stop()


@pytest.fixture(scope="module")
def gui_demo_server(tmp_path_factory: pytest.TempPathFactory, gui_pki_cache: Path) -> Iterator[GuiServerThread]:
    """The simulated demo site (config/demo.yaml) on a free port, shared by the tests that only look at it."""
    from labctl.server.site import load_site

    state = tmp_path_factory.mktemp("gui-demo") / "var"
    site = Overrides(opcua_port=0, no_ca=True, state_dir=str(state)).apply(load_site(ROOT / "config" / "demo.yaml"))
    st = GuiServerThread(site, ROOT / "config", gui_pki_cache)
    st.start()
    yield st
    st.stop()


@pytest.fixture
def open_gui(qtbot: Any) -> Iterator[Callable[..., MainWindow]]:
    """``open_gui(server, layout=None, user="operator", password=None, large=False)``: a shown display window, closed at the end."""
    windows: list[MainWindow] = []

    def _open(
        server: GuiServerThread,
        layout: Layout | None = None,
        user: str | None = "operator",
        password: str | None = None,
        large: bool = False,
    ) -> MainWindow:
        link = Link(
            server.url,
            user,
            password if password is not None else PASSWORDS.get(user or ""),
            "None",
            watchdog_s=0.5,
            poll_s=0.5,
            reconnect_min_s=0.1,
            reconnect_max_s=0.5,
        )
        link.start()
        window = MainWindow(link, layout, large=large)
        qtbot.addWidget(window)
        window.show()
        windows.append(window)
        return window

    yield _open
    for w in windows:
        w.close()
        w.link.stop()


def layout_of(text: str) -> Layout:
    return parse_layout(text, "test-layout.yaml")


# ---- the tests ---------------------------------------------------------------------------


def test_gui_qt_bindings_keep_reference_counts():
    assert check_bindings() is None


def test_gui_default_layout_of_the_demo(gui_demo_server, open_gui, qtbot, tmp_path):
    win = open_gui(gui_demo_server, user="viewer", password=DEMO_PASSWORDS["viewer"])
    qtbot.waitUntil(win.settled, timeout=WAIT_MS)
    assert [c.panel.title for c in win.charts] == [
        "bridge (K, Ohm)",
        "bridge (%)",
        "gauge (mbar)",
        "smu1 (V, A)",
        "magtc (K)",
        "psu (V, C)",
    ]
    bridge = win.charts[0]
    assert [(a.unit, a.log) for a in bridge.axes] == [("K", True), ("Ohm", False)]
    assert win.windowTitle() == "labctl · demo"
    tile = win.value_panels[0].tile("CRYO:MXC:TEMP")
    qtbot.waitUntil(lambda: re.fullmatch(r"0\.0\d+", tile.value.text()) is not None, timeout=WAIT_MS)
    assert tile.unit.text() == "K" and tile.colors == SEVERITY_COLORS[Severity.NO_ALARM]
    qtbot.waitUntil(lambda: win.banner.severity_text == "NO ALARM", timeout=WAIT_MS)
    assert [row[0] for row in win.lock_tables[0].texts()] == ["cryostat", "smu1", "magnet"]
    assert win.interlock_tables[0].texts() == [("mxc_warm", "OK"), ("ivc_vacuum", "OK")]
    assert win.job_tables[0].texts() in ([("the job queue is not available on this connection",)], [("no jobs",)])
    assert not win.banner.ack_button.isEnabled()  # a viewer, and nothing to acknowledge
    shot = tmp_path / "gui-default.png"
    win.save_screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gui_loads_a_layout_file(gui_demo_server, open_gui, qtbot):
    layout = load_layout(ROOT / "config" / "layouts" / "demo.yaml")
    win = open_gui(gui_demo_server, layout, user="operator", password=DEMO_PASSWORDS["operator"])
    qtbot.waitUntil(win.settled, timeout=WAIT_MS)
    assert win.windowTitle() == "Cryostat lab -- control room"
    assert [c.panel.title for c in win.charts] == ["Cryostat temperatures", "Vacuum", "Source-meter", "Magnet"]
    assert not win.missing
    temps, _, smu, _ = win.charts
    assert [(a.unit, a.log) for a in temps.axes] == [("K", True)]
    assert [a.unit for a in smu.axes] == ["V", "A", "W"]  # one axis per unit
    assert temps.legend.items[3][1].text == "mixing chamber [K]"
    readings = win.value_panels[1]
    qtbot.waitUntil(lambda: re.fullmatch(r"\d\.\d\de-\d\d", readings.tile("CRYO:IVC:PRES").value.text()) is not None, timeout=WAIT_MS)
    assert readings.tile("LAB:SAMPLE").value.text() == "none"
    mxc = win.value_panels[0]
    assert mxc.tile("CRYO:MXC:HTR:RANGE").value.text() == "Off"  # an enum shows its state name
    assert mxc.tile("CRYO:MXC:TEMP:MK").label.text() == "MXC temperature"


def test_gui_chart_shows_live_points(gui_shared_server, open_gui, qtbot):
    gui_server = gui_shared_server
    win = open_gui(gui_server, layout_of("panels:\n  - {type: chart, title: signal, pvs: [B:SIG], span_s: 60}\n  - {type: values, pvs: [B:SIG]}\n"))
    chart = win.chart("signal")
    qtbot.waitUntil(lambda: win.connected and len(chart.traces["B:SIG"].ring) >= 1, timeout=WAIT_MS)
    for v in (1.5, 2.5, 3.5):
        gui_server.post("B:SIG", v)
    qtbot.waitUntil(lambda: chart.points("B:SIG")[1][-3:].tolist() == [1.5, 2.5, 3.5], timeout=WAIT_MS)
    qtbot.waitUntil(lambda: chart.curve_data("B:SIG")[1][-1] == 3.5, timeout=WAIT_MS)  # drawn, not only stored
    times = chart.points("B:SIG")[0]
    left, right = chart.time_range()
    assert left <= times[-3] and times[-1] <= right + 1.0  # following: the window shows the newest points
    qtbot.waitUntil(lambda: win.value_panels[0].tile("B:SIG").value.text() == "3.500", timeout=WAIT_MS)  # precision 3, the default
    assert win.value_panels[0].tile("B:SIG").unit.text() == "V"


def test_gui_chart_opens_with_history_then_goes_live(gui_history_server, open_gui, qtbot):
    for v in (10.0, 11.0, 12.0):
        gui_history_server.post("B:SIG", v)
    assert gui_history_server.run(gui_history_server.server.service("historian").flush())
    win = open_gui(gui_history_server, layout_of("panels:\n  - {type: chart, title: signal, pvs: [B:SIG], span_s: 600}\n"))
    chart = win.chart("signal")
    qtbot.waitUntil(lambda: win.connected, timeout=WAIT_MS)
    assert "history" in win.features, "the session offers no history()"
    qtbot.waitUntil(lambda: chart.history_count("B:SIG") >= 3, timeout=WAIT_MS)
    assert chart.traces["B:SIG"].history.values[-3:].tolist() == [10.0, 11.0, 12.0]
    gui_history_server.post("B:SIG", 20.0)
    qtbot.waitUntil(lambda: chart.points("B:SIG")[1][-1] == 20.0, timeout=WAIT_MS)
    times, values = chart.points("B:SIG")
    assert (times[1:] >= times[:-1]).all()  # history first, then live
    # panning into the past asks for older history
    left, right = chart.time_range()
    chart.show_range(left - 3600, right)
    qtbot.waitUntil(lambda: chart.traces["B:SIG"].covered_since is not None and chart.traces["B:SIG"].covered_since < left - 3600, timeout=WAIT_MS)


def test_gui_alarm_banner_follows_the_cryostat_warming(gui_server, open_gui, qtbot):
    layout = layout_of(
        "columns: 2\npanels:\n"
        "  - {type: chart, title: mxc, pvs: [CRYO:MXC:TEMP], span_s: 60}\n"
        "  - {type: values, pvs: [CRYO:MXC:TEMP]}\n"
        "  - {type: interlocks}\n"
    )
    win = open_gui(gui_server, layout)
    qtbot.waitUntil(lambda: win.banner.severity_text == "NO ALARM", timeout=WAIT_MS)
    assert win.interlock_tables[0].texts() == [("mxc_warm", "OK")]

    gui_server.call(lambda s: s.plants["cryo"].stop_compressor())
    qtbot.waitUntil(lambda: win.banner.severity_text == "MAJOR", timeout=WAIT_MS)
    qtbot.waitUntil(lambda: "CRYO:MXC:TEMP" in [r.source for r in win.banner.rows], timeout=WAIT_MS)
    row = next(r for r in win.banner.rows if r.source == "CRYO:MXC:TEMP")
    assert row.severity >= Severity.MINOR
    qtbot.waitUntil(lambda: win.value_panels[0].tile("CRYO:MXC:TEMP").colors == SEVERITY_COLORS[Severity.MAJOR], timeout=WAIT_MS)
    assert re.match(r"[1-9]\d* active · [1-9]\d* unacknowledged", win.banner.counts.text())
    qtbot.waitUntil(lambda: win.interlock_tables[0].texts() == [("mxc_warm", "TRIPPED")], timeout=WAIT_MS)
    assert max(win.chart("mxc").points("CRYO:MXC:TEMP")[1]) > 0.1  # the chart saw the warm-up
    if "acknowledge" not in win.features:
        assert not win.banner.ack_button.isEnabled()
        assert "cannot acknowledge" in win.banner.ack_button.toolTip()


def test_gui_acknowledge_from_the_banner(gui_server, open_gui, qtbot):
    from PySide6 import QtCore

    layout = layout_of("panels:\n  - {type: values, pvs: [CRYO:MXC:TEMP]}\n")
    win = open_gui(gui_server, layout)
    viewer = open_gui(gui_server, layout, user="viewer")
    qtbot.waitUntil(lambda: win.connected and viewer.connected, timeout=WAIT_MS)
    assert "acknowledge" in win.features and "alarms" in win.features, "the session cannot list or acknowledge alarms"
    gui_server.call(lambda s: s.plants["cryo"].stop_compressor())
    both = {"CRYO:MXC:TEMP", "ILK:MXC_WARM:STATE"}  # the interlock's state PV alarms too
    qtbot.waitUntil(lambda: win.banner.from_alarm_list and {r.source for r in win.banner.rows} == both, timeout=WAIT_MS)
    row = next(i for i, r in enumerate(win.banner.rows) if r.source == "CRYO:MXC:TEMP")
    assert win.banner.rows[row].guidance == "check the compressor"
    assert win.banner.caption.text() == "Unacknowledged alarms"

    # a viewer may press the button; the server refuses and the banner says why
    qtbot.waitUntil(lambda: {r.source for r in viewer.banner.rows} == both and viewer.banner.ack_all_button.isEnabled(), timeout=WAIT_MS)
    qtbot.mouseClick(viewer.banner.ack_all_button, QtCore.Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "user 'viewer' may not acknowledge" in viewer.banner.message.text(), timeout=WAIT_MS)
    assert gui_server.call(lambda s: s.control.alarms.table.get("CRYO:MXC:TEMP").unacknowledged)

    # the operator acknowledges the selected alarm only
    win.banner.table.selectRow(row)
    qtbot.waitUntil(win.banner.ack_button.isEnabled, timeout=WAIT_MS)
    qtbot.mouseClick(win.banner.ack_button, QtCore.Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: win.banner.message.text() == "acknowledge CRYO:MXC:TEMP: done", timeout=WAIT_MS)
    qtbot.waitUntil(lambda: [r.source for r in win.banner.rows] == ["ILK:MXC_WARM:STATE"], timeout=WAIT_MS)
    assert not gui_server.call(lambda s: s.control.alarms.table.get("CRYO:MXC:TEMP").unacknowledged)
    assert win.banner.severity_text == "MAJOR"  # acknowledged is not cleared: the cryostat is still warm


def test_gui_lock_and_job_tables(gui_server, open_gui, qtbot):
    win = open_gui(gui_server, layout_of("panels:\n  - {type: locks}\n  - {type: jobs}\n"))
    locks, jobs = win.lock_tables[0], win.job_tables[0]
    qtbot.waitUntil(lambda: locks.texts() == [("cryostat", "free", "", "0")], timeout=WAIT_MS)
    lease = gui_server.call(lambda s: s.control.request_lock("cryostat", OLGA, duration_s=600, client="console"))
    qtbot.waitUntil(lambda: locks.texts()[0][1].startswith("olga"), timeout=WAIT_MS)
    resource, holder, until, queue = locks.texts()[0]
    assert resource == "cryostat" and re.fullmatch(r"\d\d:\d\d:\d\d \(in (9:5\d|10:00)\)", until) and queue == "0"
    assert holder == "olga"

    gui_server.call(lambda s: s.control.release_lock("cryostat", lease.token, OLGA))
    qtbot.waitUntil(lambda: locks.texts()[0][1] == "free", timeout=WAIT_MS)

    assert "jobs" in win.features, "the session cannot list jobs"
    qtbot.waitUntil(lambda: jobs.texts() == [("no jobs",)], timeout=WAIT_MS)
    first = gui_server.call(lambda s: s.control.submit_job("wait_for_signal", {}, OLGA, priority=1))
    second = gui_server.call(lambda s: s.control.submit_job("wait_for_signal", {}, OLGA, priority=5))
    qtbot.waitUntil(lambda: [(r[0], r[3]) for r in jobs.texts() if len(r) > 3] in (
        [(str(first.id), "running"), (str(second.id), "queued")],
        [(str(second.id), "running"), (str(first.id), "queued")],
    ), timeout=WAIT_MS)  # fmt: skip
    assert {r[1] for r in jobs.texts()} == {"wait_for_signal"} and {r[2] for r in jobs.texts()} == {"olga"}
    gui_server.post("B:SIG", 500.0)
    qtbot.waitUntil(lambda: [r[3] for r in jobs.texts() if len(r) > 3] == ["done", "done"], timeout=WAIT_MS)


def test_gui_an_admin_breaks_a_lock_from_the_locks_table(gui_server, open_gui, qtbot):
    layout = layout_of("panels:\n  - {type: locks}\n")
    operator, admin = open_gui(gui_server, layout), open_gui(gui_server, layout, user="root")
    asked: list[str] = []
    for win in (operator, admin):
        win.confirm = lambda question, detail: asked.append(question) or True  # the person says yes
    gui_server.call(lambda s: s.control.request_lock("cryostat", OLGA, duration_s=600, client="console"))
    for win in (operator, admin):
        qtbot.waitUntil(lambda w=win: w.lock_tables[0].held(0) == ("cryostat", "olga"), timeout=WAIT_MS)
    operator.lock_tables[0].break_requested.emit("cryostat", "olga")  # what the row's context menu sends
    qtbot.waitUntil(lambda: "may not break the lock of cryostat" in operator.banner.message.text(), timeout=WAIT_MS)
    assert gui_server.call(lambda s: s.control.arbiter.holder("cryostat")).user == "olga"
    admin.lock_tables[0].break_requested.emit("cryostat", "olga")
    qtbot.waitUntil(lambda: admin.banner.message.text() == "break the lock on cryostat: done", timeout=WAIT_MS)
    qtbot.waitUntil(lambda: admin.lock_tables[0].texts()[0][1] == "free", timeout=WAIT_MS)
    assert asked == ["Break olga's lock on cryostat?"] * 2


def test_gui_reconnects_after_a_server_restart(gui_server, open_gui, qtbot):
    win = open_gui(gui_server, layout_of("panels:\n  - {type: chart, title: signal, pvs: [B:SIG], span_s: 60}\n  - {type: values, pvs: [B:SIG]}\n"))
    tile = win.value_panels[0].tile("B:SIG")
    gui_server.post("B:SIG", 7.0)
    qtbot.waitUntil(lambda: tile.value.text() == "7.000", timeout=WAIT_MS)

    gui_server.restart()  # a fresh server process would look the same: new database, same port
    qtbot.waitUntil(lambda: win.last_disconnect is not None, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: win.connected and win.link.connects == 2, timeout=WAIT_MS)
    now_served = gui_server.call(lambda s: s.db.read("B:SIG").value)  # 7.0 again when autosave restored it
    qtbot.waitUntil(lambda: tile.value.text() == f"{now_served:.3f}", timeout=WAIT_MS)  # the new server's value
    gui_server.post("B:SIG", 42.0)
    qtbot.waitUntil(lambda: tile.value.text() == "42.000", timeout=WAIT_MS)
    chart = win.chart("signal")
    qtbot.waitUntil(lambda: chart.points("B:SIG")[1][-1] == 42.0, timeout=WAIT_MS)
    t, y, conn = chart.traces["B:SIG"].live()
    i = y.tolist().index(7.0)
    assert not conn[i]  # the outage is a gap in the line, not a straight segment
    assert tile.colors == SEVERITY_COLORS[Severity.NO_ALARM]
    assert "connected to" in win.connection_label.text()


def test_gui_shows_what_it_cannot_show(gui_shared_server, open_gui, qtbot):
    layout = layout_of("panels:\n  - {type: values, pvs: [B:AUX, NOPE:PV]}\n  - {type: chart, title: c, pvs: [NOPE:PV, B:AUX]}\n")
    win = open_gui(gui_shared_server, layout, user=None)  # anonymous: reads, never acknowledges
    qtbot.waitUntil(lambda: "not on the server: NOPE:PV" in win.connection_label.text(), timeout=WAIT_MS)
    assert win.value_panels[0].tile("NOPE:PV").status.text() == "no PV NOPE:PV on the server"
    assert "no PV NOPE:PV" in win.chart("c").note.text()
    assert "log in" in win.banner.ack_button.toolTip()
    tile = win.value_panels[0].tile("B:AUX")
    qtbot.waitUntil(lambda: tile.value.text() == "0.000" and tile.unit.text() == "A", timeout=WAIT_MS)
    gui_shared_server.call(lambda s: s.db.invalidate(["B:AUX"]))
    qtbot.waitUntil(lambda: tile.value.text() == "INVALID" and tile.colors == SEVERITY_COLORS[Severity.INVALID], timeout=WAIT_MS)
    assert tile.status.text() == "INVALID COMM"
    chart = win.chart("c")
    qtbot.waitUntil(lambda: len(chart.traces["B:AUX"].ring) == 2, timeout=WAIT_MS)
    assert chart.traces["B:AUX"].live()[2].tolist()[:1] == [False]  # the line stops at the invalid reading


def test_gui_large_font_mode(gui_shared_server, open_gui, qtbot):
    layout = "panels:\n  - {type: values, pvs: [B:PRES]}\n"
    normal = open_gui(gui_shared_server, layout_of(layout))
    large = open_gui(gui_shared_server, layout_of(layout), large=True)
    from_file = open_gui(gui_shared_server, layout_of("large: true\n" + layout))
    assert large.theme.large and from_file.theme.large and not normal.theme.large
    qtbot.waitUntil(lambda: large.connected and normal.connected, timeout=WAIT_MS)
    small_h = normal.value_panels[0].tile("B:PRES").value.sizeHint().height()
    large_h = large.value_panels[0].tile("B:PRES").value.sizeHint().height()
    assert large_h > 1.4 * small_h


def test_gui_goes_grey_while_disconnected(gui_server, open_gui, qtbot):
    win = open_gui(gui_server, layout_of("panels:\n  - {type: values, pvs: [B:SIG]}\n"))
    tile = win.value_panels[0].tile("B:SIG")
    qtbot.waitUntil(lambda: tile.value.text() == "0.000", timeout=WAIT_MS)
    gui_server.run(gui_server.server.stop())
    qtbot.waitUntil(lambda: not win.connected, timeout=WAIT_MS)
    assert tile.colors == STALE_COLORS and tile.status.text() == "no connection"
    assert win.banner.severity_text == "NO CONNECTION"
    assert "retrying" in win.connection_label.text()
    gui_server.server = None  # stopped already


def test_gui_does_not_retry_a_refused_login(gui_shared_server, open_gui, qtbot):
    win = open_gui(gui_shared_server, layout_of("panels:\n  - {type: values, pvs: [B:PRES]}\n"), user="guest", password="wrong")
    qtbot.waitUntil(lambda: win.last_disconnect is not None, timeout=WAIT_MS)
    assert win.last_disconnect.retry_in_s is None  # retrying a wrong password only locks the account
    assert "login refused" in win.connection_label.text() and "not retrying" in win.connection_label.text()
    assert win.banner.severity_text == "NO CONNECTION" and win.link.connects == 0


def test_gui_tiles_honour_precision_and_charts_keep_every_digit(gui_shared_server, open_gui, qtbot):
    win = open_gui(gui_shared_server, layout_of("panels:\n  - {type: values, pvs: [B:FINE]}\n  - {type: chart, title: fine, pvs: [B:FINE]}\n"))
    tile = win.value_panels[0].tile("B:FINE")
    qtbot.waitUntil(lambda: tile.value.text() == "0.0146", timeout=WAIT_MS)  # 0.0146309 with precision 4
    assert tile.meta is not None and tile.meta.precision == 4
    chart = win.chart("fine")
    qtbot.waitUntil(lambda: len(chart.traces["B:FINE"].ring) >= 1, timeout=WAIT_MS)
    assert chart.points("B:FINE")[1][-1] == 0.0146309


def test_gui_a_constant_pv_holds_a_flat_line_to_now_on_a_shared_time_axis(gui_server, open_gui, qtbot):
    import time

    changed = time.time() - 3600.0  # its last change is an hour old: long before the window
    gui_server.call(lambda s: s.db.post("B:STEADY", 4.2, timestamp=changed))
    win = open_gui(
        gui_server,
        layout_of(
            "panels:\n"
            "  - {type: chart, title: steady, pvs: [B:STEADY], span_s: 60}\n"
            "  - {type: chart, title: signal, pvs: [B:SIG], span_s: 600}\n"
        ),
    )
    steady, signal = win.chart("steady"), win.chart("signal")

    def flat_to_now() -> bool:
        x, y = steady.hold_data("B:STEADY")
        left, right = steady.time_range()
        return len(x) == 2 and x[0] <= left and x[1] >= right - 1.0 and y.tolist() == [4.2, 4.2]

    qtbot.waitUntil(flat_to_now, timeout=WAIT_MS)
    assert steady.traces["B:STEADY"].ring.first()[0] == pytest.approx(changed, abs=1e-3)
    # one time axis: the first chart's span for every chart, the same range on each
    qtbot.waitUntil(lambda: abs(signal.time_range()[1] - steady.time_range()[1]) < 0.5, timeout=WAIT_MS)
    for left, right in win.time_ranges():
        assert right - left == pytest.approx(60.0, abs=1.0)
    win.set_span(3600.0)
    assert win.span_box.currentText() == "1 h"
    for left, right in win.time_ranges():
        assert right - left == pytest.approx(3600.0, abs=1.0)
    qtbot.waitUntil(flat_to_now, timeout=WAIT_MS)  # an hour's window still starts after the change: still flat
    # a pan by hand on one chart moves them all and stops them all following
    left, right = signal.time_range()
    signal.show_range(left - 600.0, right - 600.0)
    signal._manual()  # what a drag by hand emits (show_range is the programmatic pan)
    assert not steady.following and not signal.following
    assert steady.time_range() == pytest.approx(signal.time_range(), abs=1e-6)
    steady.live_button.click()
    assert steady.following and signal.following


def test_gui_draws_held_steps_not_ramps(gui_shared_server, open_gui, qtbot):
    import numpy as np
    from labctl.clients.gui.buffers import steps

    t, y, c = steps(np.array([0.0, 10.0, 20.0]), np.array([0.0, 15.0, 15.0]), np.array([True, True, False]))
    assert t.tolist() == [0.0, 10.0, 10.0, 20.0, 20.0]
    assert y.tolist() == [0.0, 0.0, 15.0, 15.0, 15.0]  # 0 held until the jump at t=10, then 15
    assert c.tolist() == [True, True, True, True, False]
    t, y, c = steps(np.array([0.0, 10.0, 20.0]), np.array([1.0, 2.0, 3.0]), np.array([False, True, False]))
    assert c.tolist() == [False, False, True, True, False]  # a gap stays a gap: no hold, no rise
    win = open_gui(gui_shared_server, layout_of("panels:\n  - {type: chart, title: aux, pvs: [B:AUX], span_s: 60}\n"))
    chart = win.chart("aux")
    qtbot.waitUntil(lambda: win.connected and len(chart.traces["B:AUX"].ring) >= 1, timeout=WAIT_MS)
    gui_shared_server.post("B:AUX", 0.25)
    qtbot.waitUntil(lambda: chart.curve_data("B:AUX")[1][-1:].tolist() == [0.25], timeout=WAIT_MS)
    x, y = chart.curve_data("B:AUX")
    assert x[-2] == x[-1] and y[-2] != y[-1]  # the jump is vertical: the old value held up to the new sample's time
