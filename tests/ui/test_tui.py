"""The terminal UI driven with Textual's Pilot against a real server running the simulated demo.

Each test starts the demo site in-process (OPC UA on a free loopback port) and runs the
app headless; the app connects over the wire as a demo user, like ``labctl tui`` does.
Tests wait for conditions (the table showing a value, the server holding a state), never
for a fixed time. Snapshot tests (at the end) use a small site of soft PVs with a frozen
clock instead, so every picture is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from labctl.clients.tui.app import LabctlApp
from labctl.clients.tui.link import LinkState
from labctl.clients.tui.screens import (
    AlarmsScreen,
    BrowserScreen,
    HelpScreen,
    InterlocksScreen,
    LocksScreen,
    WriteDialog,
)
from labctl.clients.tui.screens.locks import BreakDialog
from labctl.clients.tui.widgets import Banner, DetailPane, PVTable
from labctl.ioc.access import AuditRecord
from labctl.ioc.errors import LockedBy
from labctl.ioc.types import Identity, Severity

from tests.helpers import wait_for

SIZE = (140, 40)
EXPERT = Identity("expert", frozenset({"expert"}), "opcua", "127.0.0.1")


async def until(pilot: Any, predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Wait for a condition, then let the app finish what it was doing."""
    result = await wait_for(predicate, timeout=timeout, what=what)
    await pilot.pause()
    return result


async def connected(app: LabctlApp, pilot: Any) -> BrowserScreen:
    """Wait until the app is connected and the PV table shows values; the browser screen."""
    await until(pilot, lambda: app.link_status.state is LinkState.CONNECTED and app.catalogs, "connected with the PV list")
    screen = app.screen
    assert isinstance(screen, BrowserScreen)
    table = screen.query_one(PVTable)
    await until(pilot, lambda: table.row_count and all(n in app.readings for n in table.names), "values in every row")
    return screen


async def select(pilot: Any, screen: BrowserScreen, name: str) -> None:
    """Filter the table to one PV by typing its name, and put the cursor on it."""
    await pilot.press("slash", *name, "enter")
    table = screen.query_one(PVTable)
    await until(pilot, lambda: table.current_name == name, f"the cursor on {name}")


async def write(pilot: Any, app: LabctlApp, text: str) -> WriteDialog:
    """Open the write dialog on the PV under the cursor, type ``text`` and press Enter."""
    await pilot.press("w")
    await until(pilot, lambda: isinstance(app.screen, WriteDialog), "the write dialog")
    dialog = app.screen
    assert isinstance(dialog, WriteDialog)
    await pilot.press("ctrl+a", "ctrl+k", *text, "enter")  # home, delete to the end, type
    return dialog


# ---- live values ---------------------------------------------------------------------------------


async def test_values_update_live_in_place(tui_demo, tui_app):
    app = tui_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = await connected(app, pilot)
        table = screen.query_one(PVTable)
        assert table.row_count == len(app.metas) == len(tui_demo.srv.db.names())
        layouts = table.layouts
        before = table.cell_text("CRYO:MXC:TEMP", "value")

        tui_demo.srv.plants["cryo"].stop_compressor()  # the simulated fridge starts to warm up
        await until(pilot, lambda: table.cell_text("CRYO:MXC:TEMP", "value") != before, "the mixing chamber warming", timeout=15)
        tui_demo.srv.db.post("LAB:NOTE", "compressor off")
        await until(pilot, lambda: table.cell_text("LAB:NOTE", "value") == "compressor off", "the note")
        assert table.layouts == layouts, "updates must change cells in place, not lay the table out again"

        # the detail pane follows the cursor and draws the live values
        await select(pilot, screen, "CRYO:MXC:TEMP")
        detail = screen.query_one(DetailPane)
        assert detail.name_shown == "CRYO:MXC:TEMP"
        await until(pilot, lambda: len(detail.values) >= 3, "three points in the sparkline", timeout=15)
        assert list(detail.values) == sorted(detail.values), "a warming fridge only goes up"


async def test_filter_and_folders_choose_the_subscription(tui_demo, tui_app):
    app = tui_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = await connected(app, pilot)
        table = screen.query_one(PVTable)
        await pilot.press("slash", *"cryo:*:temp", "enter")
        await until(pilot, lambda: table.names == ["CRYO:50K:TEMP", "CRYO:4K:TEMP", "CRYO:STILL:TEMP", "CRYO:MXC:TEMP"], "the glob filter")
        summary = {n for n in app.link.wanted if n.startswith("ALARM:")}
        assert app.link.wanted == set(table.names) | summary, "one subscription for what is shown"

        await pilot.press("escape")  # clears the filter
        await until(pilot, lambda: len(table.names) == len(app.metas), "every PV again")
        await pilot.press("f")  # the folder tree, in the site's order: demo, bridge, gauge, ...
        await pilot.press("down", "down", "enter")
        await until(pilot, lambda: table.names == ["CRYO:IVC:PRES", "CRYO:OVC:PRES"], "the gauge folder")


async def test_thousands_of_pvs_update_in_place(tui_big_server):
    from tests.ui.conftest import TUI_BIG_COUNT, TUI_SNAP_PASSWORDS

    app = LabctlApp(tui_big_server.service("opcua").url, "operator", TUI_SNAP_PASSWORDS["operator"], "None", theme="textual-dark")
    async with app.run_test(size=SIZE) as pilot:
        screen = await connected(app, pilot)
        table = screen.query_one(PVTable)
        names = [n for n in table.names if n.startswith("BIG:")]
        assert len(names) == TUI_BIG_COUNT
        assert {n for n in app.link.wanted if n.startswith("BIG:")} == set(names), "one subscription for the shown set"
        layouts, ticks = table.layouts, app.ticks
        for i, name in enumerate(names):
            tui_big_server.db.post(name, float(i))
        await until(pilot, lambda: all(table.cell_text(n, "value") == f"{i:.3f}" for i, n in enumerate(names)), "every cell updated", timeout=30)  # precision 3, the default
        assert table.layouts == layouts, "cells change in place"
        assert app.ticks - ticks < TUI_BIG_COUNT, "updates are applied in batches, not one by one"
        # the folders the server splits a big site into are the tree's
        def folders(node: Any) -> list[str]:
            return [node.data, *(f for child in node.children for f in folders(child))]

        groups = [f for f in folders(screen.query_one("#tree").root) if f.startswith("big/soft/BIG/")]
        assert groups == [f"big/soft/BIG/G{g:02d}" for g in range(TUI_BIG_COUNT // 100)]


# ---- writes --------------------------------------------------------------------------------------


async def test_write_succeeds_and_is_audited(tui_demo, tui_app):
    audits: list[AuditRecord] = []
    tui_demo.srv.db.add_audit_sink(audits.append)
    app = tui_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = await connected(app, pilot)
        await select(pilot, screen, "PSU:VOLT:SP")
        await write(pilot, app, "7.5")
        await until(pilot, lambda: isinstance(app.screen, BrowserScreen), "the dialog to close")
        assert tui_demo.srv.db.read("PSU:VOLT:SP").value == 7.5
        table = screen.query_one(PVTable)
        await until(pilot, lambda: table.cell_text("PSU:VOLT:SP", "value") == "7.500", "the new value in the table")
    writes = [a for a in audits if a.action == "write" and a.target == "PSU:VOLT:SP"]
    assert [(a.user, a.accepted) for a in writes] == [("operator", True)]


async def test_values_are_checked_before_sending(tui_demo, tui_app):
    audits: list[AuditRecord] = []
    tui_demo.srv.db.add_audit_sink(audits.append)
    app = tui_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = await connected(app, pilot)
        await select(pilot, screen, "MAG:HTR:RANGE")
        dialog = await write(pilot, app, "Turbo")
        assert "expected one of ['Off', 'Low', 'Medium', 'High']" in dialog.message
        await pilot.press("ctrl+a", "ctrl+k", "7", "enter")
        assert dialog.message == "MAG:HTR:RANGE has states 0..3: Off, Low, Medium, High"
        await pilot.press("escape")
        await select(pilot, screen, "PSU:VOLT:SP")
        dialog = await write(pilot, app, "five")
        assert dialog.message == "PSU:VOLT:SP is float64: expected a number, got 'five'"
        await pilot.press("escape")
    assert not [a for a in audits if a.action == "write"], "nothing invalid reaches the server"


async def test_write_refused_for_a_held_lock_shows_the_holder(tui_demo, tui_app):
    lease = tui_demo.srv.control.request_lock("cryostat", EXPERT, duration_s=600, client="console")
    expected = LockedBy("CRYO:MXC:SETP", "cryostat", "expert", lease.expires_at, client="console").reason
    app = tui_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = await connected(app, pilot)
        await select(pilot, screen, "CRYO:MXC:SETP")
        dialog = await write(pilot, app, "0.1")
        await until(pilot, lambda: dialog.refusal, "the refusal")
        assert dialog.refusal == expected  # the server's sentence, word for word
        assert dialog.message.startswith("refused (Bad") and dialog.message.endswith(f"): {expected}")
        assert "locked by expert until" in dialog.message
        assert isinstance(app.screen, WriteDialog), "the dialog stays open with the reason"
        assert dialog.lock_resource == "cryostat"
        await pilot.press("escape")
        assert tui_demo.srv.db.read("CRYO:MXC:SETP").value == 0.0

        # the locks panel shows who holds it, until when
        await pilot.press("3")
        locks = app.screen
        assert isinstance(locks, LocksScreen)
        await until(pilot, lambda: any(r.resource == "cryostat" and r.owner == "expert" for r in locks.rows), "the holder")
        row = next(r for r in locks.rows if r.resource == "cryostat")
        assert row.expires_at == pytest.approx(lease.expires_at, abs=1e-3)


async def test_write_dialog_takes_the_lock_and_sends_again(tui_demo, tui_app):
    app = tui_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = await connected(app, pilot)
        await select(pilot, screen, "CRYO:MXC:SETP")
        dialog = await write(pilot, app, "0.1")
        await until(pilot, lambda: dialog.refusal, "the refusal")
        assert dialog.refusal == "resource 'cryostat' is lockable: take its lock before writing"
        assert dialog.query_one("#write-lock").display, "the dialog offers the lock"
        await pilot.press("ctrl+l")
        await until(pilot, lambda: isinstance(app.screen, BrowserScreen), "the write to go through")
        assert tui_demo.srv.db.read("CRYO:MXC:SETP").value == 0.1
        assert tui_demo.srv.control.arbiter.holder("cryostat").user == "operator"
        assert "cryostat" in app.leases
        await pilot.press("q")  # quitting gives the lock back
    assert tui_demo.srv.control.arbiter.holder("cryostat") is None


async def test_an_admin_breaks_a_lock_from_the_locks_panel_after_confirming(tui_demo, tui_app):
    tui_demo.srv.control.request_lock("magnet", EXPERT, duration_s=600, client="console")
    audits: list = []
    tui_demo.srv.db.add_audit_sink(audits.append)

    async def try_break(user: str) -> None:
        app = tui_app(user)
        async with app.run_test(size=SIZE) as pilot:
            await connected(app, pilot)
            await pilot.press("3")
            locks = app.screen
            assert isinstance(locks, LocksScreen)
            await until(pilot, lambda: any(r.resource == "magnet" and r.owner == "expert" for r in locks.rows), "the holder")
            locks.query_one("#locks").move_cursor(row=[r.resource for r in locks.rows].index("magnet"))
            await pilot.press("b")
            await until(pilot, lambda: isinstance(app.screen, BreakDialog), "the confirmation")
            await pilot.press("y")
            await until(pilot, lambda: any(a.action == "lock.break" and a.user == user for a in audits), "the server's answer")

    await try_break("operator")
    assert tui_demo.srv.control.arbiter.holder("magnet").user == "expert"
    await try_break("admin")
    assert tui_demo.srv.control.arbiter.holder("magnet") is None
    assert [(a.user, a.accepted) for a in audits if a.action == "lock.break"] == [("operator", False), ("admin", True)]


async def test_the_interlocks_panel_shows_states_and_reasons_and_experts_reset(tui_snap_server):
    from labctl.clients.tui.app import LabctlApp

    from tests.ui.conftest import TUI_SNAP_PASSWORDS

    srv = tui_snap_server
    srv.call(lambda: srv.server.db.post("LAB:OVEN", 350.0))
    srv.call(lambda: srv.server.db.post("LAB:OVEN", 150.0))
    assert srv.call(lambda: srv.server.control.interlocks.state("oven_hot")) == "RESET_NEEDED"
    resets = lambda: [(a.user, a.accepted) for a in srv.call(lambda: list(srv.server.control.audit_log)) if a.action == "interlock.reset"]  # noqa: E731

    async def press_reset(user: str, expected: list[tuple[str, bool]]) -> None:
        app = LabctlApp(srv.url, user, TUI_SNAP_PASSWORDS[user], "None", theme="textual-dark")
        async with app.run_test(size=SIZE) as pilot:
            await connected(app, pilot)
            await pilot.press("5")
            panel = app.screen
            assert isinstance(panel, InterlocksScreen)
            await until(pilot, lambda: [(r.name, r.state) for r in panel.rows] == [("oven_hot", "RESET_NEEDED")], "the interlock")
            assert "LAB:OVEN" in panel.rows[0].reason and "waiting for a reset" in str(panel.query_one("#interlocks-note").content)
            await pilot.press("x")
            await until(pilot, lambda: resets() == expected, "the server's answer")

    await press_reset("operator", [("operator", False)])
    assert srv.call(lambda: srv.server.control.interlocks.state("oven_hot")) == "RESET_NEEDED"
    await press_reset("expert", [("operator", False), ("expert", True)])
    assert srv.call(lambda: srv.server.control.interlocks.state("oven_hot")) == "OK"


# ---- alarms -------------------------------------------------------------------------------------


async def test_alarm_panel_lists_the_broken_gauge(tui_demo, tui_app):
    app = tui_app()
    async with app.run_test(size=SIZE) as pilot:
        await connected(app, pilot)
        tui_demo.srv.plants["cryo"].set_gauge_status(1, 3)  # IVC gauge: sensor error
        await pilot.press("2")
        alarms = app.screen
        assert isinstance(alarms, AlarmsScreen)
        await until(pilot, lambda: any(a.source == "CRYO:IVC:PRES" for a in alarms.rows), "the gauge alarm", timeout=15)
        row = next(a for a in alarms.rows if a.source == "CRYO:IVC:PRES")
        assert row.current == "INVALID"
        assert app.summary.highest is Severity.INVALID
        assert "alarms: " in str(alarms.query_one("#status").content)


async def test_an_alarm_can_be_acknowledged(tui_demo, tui_app):
    table = tui_demo.srv.control.alarms.table
    app = tui_app()
    async with app.run_test(size=SIZE) as pilot:
        await connected(app, pilot)
        tui_demo.srv.plants["cryo"].set_gauge_status(1, 3)
        await wait_for(lambda: table.get("CRYO:IVC:PRES").unacknowledged, timeout=15, what="the alarm")
        await pilot.press("2")
        alarms = app.screen
        assert isinstance(alarms, AlarmsScreen)
        await until(pilot, lambda: any(a.source == "CRYO:IVC:PRES" for a in alarms.rows), "the alarm in the panel")
        row = next(i for i, a in enumerate(alarms.rows) if a.source == "CRYO:IVC:PRES")
        alarms.query_one("#alarms").move_cursor(row=row)
        await pilot.press("a")
        await until(pilot, lambda: table.get("CRYO:IVC:PRES").acked, "the acknowledgement")
        await until(pilot, lambda: any(a.source == "CRYO:IVC:PRES" and a.acked for a in alarms.rows), "the panel to show it")


# ---- jobs ----------------------------------------------------------------------------------------


async def test_submit_a_procedure_and_read_its_log(tui_demo, tui_app):
    app = tui_app()
    async with app.run_test(size=SIZE) as pilot:
        await connected(app, pilot)
        await pilot.press("4")
        jobs = app.screen
        await pilot.press("s")
        await until(pilot, lambda: app.screen.query("#submit-procedures") and app.screen.procedures, "the procedures")
        dialog = app.screen
        names = [p.name for p in dialog.procedures]
        for _ in range(names.index("iv_curve")):
            await pilot.press("down")
        await until(pilot, lambda: dialog.chosen is not None and dialog.chosen.name == "iv_curve", "iv_curve chosen")
        dialog.query_one("#submit-ok").press()
        await until(pilot, lambda: app.screen is jobs and any(j.procedure == "iv_curve" for j in jobs.jobs), "the job listed")
        await until(pilot, lambda: jobs.jobs[0].state in ("done", "failed"), "the job to end", timeout=20)
        await pilot.press("enter")
        await until(pilot, lambda: getattr(app.screen, "detail", None) is not None, "the job detail")
        assert app.screen.detail.results, "the job read the source-meter"


# ---- connection ------------------------------------------------------------------------------------


async def test_recovers_after_the_server_restarts(tui_demo, tui_app):
    app = tui_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = await connected(app, pilot)
        table = screen.query_one(PVTable)
        banner = screen.query_one(Banner)
        assert not banner.has_class("-visible")

        await tui_demo.stop()
        await until(pilot, lambda: app.link_status.state is LinkState.RECONNECTING, "the loss to be noticed")
        assert banner.has_class("-visible") and screen.has_class("-offline")
        assert "Connection lost" in str(banner.content)

        server = await tui_demo.start()  # same port, same state directory
        await until(pilot, lambda: app.link_status.state is LinkState.CONNECTED, "the reconnection", timeout=20)
        assert not banner.has_class("-visible") and not screen.has_class("-offline")
        server.db.post("LAB:NOTE", "back again")
        await until(pilot, lambda: table.cell_text("LAB:NOTE", "value") == "back again", "the restored subscription")

        await select(pilot, screen, "PSU:VOLT:SP")  # and writes go through the new session
        await write(pilot, app, "3")
        await until(pilot, lambda: server.db.read("PSU:VOLT:SP").value == 3.0, "the write after the restart")


async def test_a_refused_login_is_not_retried(tui_demo):
    app = LabctlApp(tui_demo.url, "operator", "wrong-password", "None", reconnect_min_s=0.05, theme="textual-dark")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.link_status.state is LinkState.FAILED, "the refusal")
        assert "login refused for user 'operator'" in app.link_status.reason
        banner = app.screen.query_one(Banner)
        assert banner.has_class("-visible") and banner.has_class("-failed")
        assert app.link_status.attempt == 0


# ---- help and colours -----------------------------------------------------------------------------


async def test_help_lists_the_key_bindings(tui_demo, tui_app):
    app = tui_app()
    async with app.run_test(size=SIZE) as pilot:
        await connected(app, pilot)
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), "the help screen")
        keys = {(key, what) for _, key, what in app.screen.bindings}
        for expected in [("1", "PVs"), ("2", "Alarms"), ("3", "Locks"), ("4", "Jobs"), ("?", "Help"), ("w", "Write"), ("/", "Filter"), ("q", "Quit")]:
            assert expected in keys
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, BrowserScreen), "help to close")
        await pilot.press("3", "question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), "the help screen")
        assert ("t", "Take lock") in {(key, what) for _, key, what in app.screen.bindings}


async def test_a_16_colour_terminal_gets_the_ansi_theme(monkeypatch, tui_demo):
    import textual.constants

    monkeypatch.setattr(textual.constants, "COLOR_SYSTEM", "standard")
    app = LabctlApp(tui_demo.url, "viewer", "viewer-demo", "None")
    async with app.run_test(size=SIZE) as pilot:
        await connected(app, pilot)
        assert app.console.color_system == "standard"
        assert app.theme == "ansi-dark"
        assert app.current_theme.ansi, "the terminal's own palette draws the semantic colours"


# ---- snapshots --------------------------------------------------------------------------------------
# A small site of soft PVs with a frozen clock (tests/ui/conftest.py), served from a thread
# of its own: snap_compare runs the app with App.run in the test's thread.

SNAP_SIZE = (120, 34)


def ready(app: LabctlApp, then: Callable[[Any], Any] | None = None) -> Callable[[Any], Any]:
    """A run_before for snap_compare: wait for the data, then do ``then(pilot)``."""

    async def run_before(pilot: Any) -> None:
        screen = await connected(app, pilot)
        table = screen.query_one(PVTable)
        table.move_cursor(row=table.names.index("LAB:SHIELD"))
        await until(pilot, lambda: screen.query_one(DetailPane).name_shown == "LAB:SHIELD", "the detail pane")
        if then is not None:
            await then(pilot)

    return run_before


def test_snapshot_main_screen(snap_compare, tui_snap_app):
    app = tui_snap_app()
    assert snap_compare(app, terminal_size=SNAP_SIZE, run_before=ready(app))


def test_snapshot_main_screen_in_16_colours(snap_compare, tui_snap_app):
    app = tui_snap_app(theme="ansi-dark")
    assert snap_compare(app, terminal_size=SNAP_SIZE, run_before=ready(app))


def test_snapshot_write_refused(snap_compare, tui_snap_app):
    app = tui_snap_app()

    async def refused(pilot: Any) -> None:
        await select(pilot, app.screen, "LASER:POWER")
        dialog = await write(pilot, app, "1.5")
        await until(pilot, lambda: dialog.refusal, "the refusal")

    assert snap_compare(app, terminal_size=SNAP_SIZE, run_before=ready(app, refused))


def test_snapshot_alarms(snap_compare, tui_snap_app):
    app = tui_snap_app()

    async def alarms(pilot: Any) -> None:
        await pilot.press("2")
        await until(pilot, lambda: len(app.screen.rows) == 3, "the three alarms")

    assert snap_compare(app, terminal_size=SNAP_SIZE, run_before=ready(app, alarms))


def test_snapshot_locks(snap_compare, tui_snap_app):
    app = tui_snap_app()

    async def locks(pilot: Any) -> None:
        await pilot.press("3")
        await until(pilot, lambda: any(r.owner == "expert" for r in app.screen.rows), "the laser's holder")

    assert snap_compare(app, terminal_size=SNAP_SIZE, run_before=ready(app, locks))


def test_snapshot_help(snap_compare, tui_snap_app):
    app = tui_snap_app()

    async def help_(pilot: Any) -> None:
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), "the help screen")

    assert snap_compare(app, terminal_size=SNAP_SIZE, run_before=ready(app, help_))


def test_snapshot_jobs(snap_compare, tui_snap_app):
    app = tui_snap_app()

    async def jobs(pilot: Any) -> None:
        await pilot.press("4")
        await until(pilot, lambda: [j.state for j in app.screen.jobs] == ["done"], "the finished job")

    assert snap_compare(app, terminal_size=SNAP_SIZE, run_before=ready(app, jobs))


def test_snapshot_job_detail(snap_compare, tui_snap_app):
    app = tui_snap_app()

    async def detail(pilot: Any) -> None:
        await pilot.press("4")
        await until(pilot, lambda: app.screen.jobs, "the job")
        await pilot.press("enter")
        await until(pilot, lambda: getattr(app.screen, "detail", None) is not None, "the job's log and results")

    assert snap_compare(app, terminal_size=SNAP_SIZE, run_before=ready(app, detail))
