"""The labctl terminal UI: a keyboard-first Textual app over one client session.

Theory of operation. :class:`LabctlApp` has one mode per task (``MODES``): the PV
browser (1), alarms (2), locks (3) and jobs (4); ``?`` lists the keys. The app owns the
state and pushes it down into the screen in front (attributes down); screens say what
they need with messages (messages up, see :mod:`labctl.clients.tui.screens.base`):

* the connection is a :class:`~labctl.clients.tui.link.Link` run in an exclusive worker: it
  connects, keeps one subscription for the PVs the screen in front shows (plus the alarm
  summary for the status line), and reconnects with backoff, restoring the subscription;
* readings collect in the link and are applied once per display tick (:data:`TICK_S`),
  so a burst of updates is one repaint;
* after each connection the PV list (with metadata) is fetched again in a worker and
  handed to every screen: on a site, the PVs of every server that is up
  (``list_pvs(site=True)``, :mod:`labctl.clients.site`), each watched on its own server,
  and shown INVALID when their server goes down;
* while not connected a banner says why and when the next attempt is, the data is
  dimmed as stale, and the status line shows the state.

Colours come from the theme's semantic variables (``$success``, ``$warning``, ``$error``);
in a terminal with 16 colours or fewer the app switches to the ``ansi-dark`` theme,
which uses the terminal's own palette, so the colours stay what the terminal shows
well. Every alarm colour comes with the severity spelled out.

Quitting -- ``q``, Ctrl-C (a key in the terminal's raw mode), or the signals SIGINT and
SIGTERM from outside -- gives back the locks taken here, closes the session and ends
with status 0, without a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterable
from typing import Any

from labctl.clients.errors import ClientError
from labctl.clients.tui.link import Link, LinkState, LinkStatus
from labctl.clients.tui.model import ALARM_SUMMARY, AlarmSummary
from labctl.clients.tui.screens import (
    AlarmsScreen,
    BrowserScreen,
    HelpScreen,
    InterlocksScreen,
    JobsScreen,
    LiveScreen,
    LocksScreen,
)
from labctl.clients.tui.screens.base import api
from labctl.clients.values import Metadata
from labctl.ioc.types import Reading
from textual import on, work
from textual.app import App
from textual.binding import Binding

log = logging.getLogger(__name__)

#: Seconds between display ticks that apply the readings received meanwhile.
TICK_S = 0.1
#: Seconds a lock release may take when the app quits.
RELEASE_TIMEOUT_S = 3.0
#: Themes by the number of colours a terminal shows.
ANSI_THEME = "ansi-dark"
DEFAULT_THEME = "textual-dark"
MODE_NAMES = {"browser": "PVs", "alarms": "alarms", "locks": "locks", "jobs": "jobs", "interlocks": "interlocks"}


class LabctlApp(App[None]):
    """The operator terminal UI of a labctl server."""

    CSS_PATH = "app.tcss"
    TITLE = "labctl"
    MODES = {"browser": BrowserScreen, "alarms": AlarmsScreen, "locks": LocksScreen, "jobs": JobsScreen, "interlocks": InterlocksScreen}
    DEFAULT_MODE = "browser"
    BINDINGS = [
        Binding("1", "switch_mode('browser')", "PVs"),
        Binding("2", "switch_mode('alarms')", "Alarms"),
        Binding("3", "switch_mode('locks')", "Locks"),
        Binding("4", "switch_mode('jobs')", "Jobs"),
        Binding("5", "switch_mode('interlocks')", "Interlocks"),
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False),
        Binding("ctrl+r", "reconnect", "Reconnect now", show=False),
    ]

    def __init__(
        self,
        url: str,
        user: str | None = None,
        password: str | None = None,
        security: str = "auto",
        *,
        timeout_s: float = 10.0,
        reconnect_min_s: float = 0.25,
        reconnect_max_s: float = 5.0,
        theme: str = "auto",
        link: Link | None = None,
    ) -> None:
        super().__init__()
        self.link = link or Link(
            url,
            user,
            password,
            security,
            timeout_s=timeout_s,
            reconnect_min_s=reconnect_min_s,
            reconnect_max_s=reconnect_max_s,
        )
        self.link.on_status = self._link_status
        self.theme_choice = theme
        self.link_status: LinkStatus = self.link.status
        self.metas: dict[str, Metadata] = {}
        """Every PV of the server, in browse order (fetched after each connection)."""
        self.readings: dict[str, Reading] = {}
        """The latest reading of each PV received."""
        self.leases: dict[str, Any] = {}
        """Locks taken from this app, by resource."""
        self.summary = AlarmSummary()
        self.ticks = 0
        """Display ticks that applied readings (tests wait for them)."""
        self.catalogs = 0
        """PV lists received (one per connection)."""
        self._quitting = False
        self.sub_title = url

    # ---- start and stop -----------------------------------------------------------------------

    def on_mount(self) -> None:
        if self.theme_choice == "auto":
            self.theme = ANSI_THEME if self.console.color_system in ("standard", "windows") else DEFAULT_THEME
        else:
            self.theme = self.theme_choice
        self.set_interval(TICK_S, self.tick)
        self._update_wanted()
        self.run_link()
        self._catch_signals()

    async def on_unmount(self) -> None:
        # Close the session while the app (and the server's patience) is still there.
        self._release_signals()
        await self.link.close()

    def _catch_signals(self) -> None:
        """SIGINT and SIGTERM quit as ``q`` does: locks given back, status 0, no traceback."""
        loop = asyncio.get_running_loop()
        self._signals: list[int] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._signalled)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests), or no signals here
                continue
            self._signals.append(sig)

    def _release_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in getattr(self, "_signals", ()):
            loop.remove_signal_handler(sig)
        self._signals = []

    def _signalled(self) -> None:
        if not self._quitting:
            self._quitting = True
            self.run_worker(self.action_quit(), group="quit")

    @work(exclusive=True, group="link")
    async def run_link(self) -> None:
        """Keep the connection (reconnecting after losses) until the app ends (a bug in it ends the app with its traceback)."""
        await self.link.run()

    # ---- the screens in front ---------------------------------------------------------------------

    def _live_screens(self) -> list[LiveScreen]:
        return [s for s in self.screen_stack if isinstance(s, LiveScreen)]

    def _push_state(self, screen: LiveScreen) -> None:
        screen.set_session(self.link.session if self.link_status.state is LinkState.CONNECTED else None)
        screen.set_leases(self.leases)
        if self.metas:
            screen.set_catalog(self.link_status.site, self.metas, self.readings)
        screen.set_link(self.link_status, self.summary, tuple(sorted(self.leases)))

    @on(LiveScreen.Shown)
    def _screen_shown(self, event: LiveScreen.Shown) -> None:
        self._push_state(event.screen)
        self._update_wanted()

    @on(LiveScreen.WantsChanged)
    def _wants_changed(self) -> None:
        self._update_wanted()

    @on(LiveScreen.LeaseChanged)
    def _lease_changed(self, event: LiveScreen.LeaseChanged) -> None:
        if event.lease is None:
            self.leases.pop(event.resource, None)
        else:
            self.leases[event.resource] = event.lease
        for screen in self._live_screens():
            screen.set_leases(self.leases)
            screen.set_link(self.link_status, self.summary, tuple(sorted(self.leases)))

    @on(LiveScreen.ConnectionBroken)
    def _connection_broken(self, event: LiveScreen.ConnectionBroken) -> None:
        self.link.lost(event.reason)

    def _update_wanted(self) -> None:
        names = set(ALARM_SUMMARY)
        for screen in self._live_screens():
            names |= screen.wanted()
        if self.metas:
            names &= self.metas.keys()
        self.link.watch(names)

    # ---- data ---------------------------------------------------------------------------------------

    def tick(self) -> None:
        """Apply the readings received since the last tick to the screens in front."""
        changed = self.link.take()
        if not changed:
            return
        self.readings.update(changed)
        self.ticks += 1
        screens = self._live_screens()
        if any(name in changed for name in ALARM_SUMMARY):
            summary = AlarmSummary.of(self.readings)
            if summary != self.summary:
                self.summary = summary
                for screen in screens:
                    screen.set_link(self.link_status, summary, tuple(sorted(self.leases)))
        for screen in screens:
            screen.apply_readings(changed)

    def _link_status(self, status: LinkStatus) -> None:
        """The link's state changed (called from the link worker, on the app's loop)."""
        was = self.link_status.state
        self.link_status = status
        for screen in self._live_screens():
            screen.set_link(status, self.summary, tuple(sorted(self.leases)))
            if status.state is not LinkState.CONNECTED or was is not LinkState.CONNECTED:
                screen.set_session(self.link.session if status.state is LinkState.CONNECTED else None)
        if status.state is LinkState.CONNECTED:
            self.sub_title = f"{status.site} · {status.user} · {status.url}"
            self.load_catalog()
        elif was is LinkState.CONNECTED:
            self.leases.clear()  # a server that restarted has forgotten them; the lock PVs tell the truth

    @work(exclusive=True, group="catalog")
    async def load_catalog(self) -> None:
        """Fetch every PV with its metadata and hand the list to the screens."""
        session = self.link.session
        if session is None:
            return
        try:
            metas = await session.list_pvs(site=True)  # on a site: every server's PVs
        except ClientError as e:
            self.notify(f"cannot list the PVs: {e}", severity="error")
            self.link.lost(str(e))
            return
        self.metas = {m.name: m for m in metas}
        self.catalogs += 1
        for screen in self._live_screens():
            screen.set_catalog(self.link_status.site, self.metas, self.readings)
            screen.set_link(self.link_status, self.summary, tuple(sorted(self.leases)))
        self._update_wanted()

    # ---- actions ---------------------------------------------------------------------------------------

    def action_help(self) -> None:
        """Show every key binding active here."""
        if isinstance(self.screen, HelpScreen):
            return
        self.push_screen(HelpScreen(list(self._binding_rows())))

    def _binding_rows(self) -> Iterable[tuple[str, str, str]]:
        """(where, key, what) of the active bindings: the app's, then the screen's, then the focused widget's."""
        mode = MODE_NAMES.get(self.current_mode, self.current_mode)
        active = list(self.screen.active_bindings.values())
        order = {id(self): 0, id(self.screen): 1}
        for a in sorted(active, key=lambda a: order.get(id(a.node), 2)):
            node = a.node
            where = "everywhere" if node is self else (f"{mode} screen" if node is self.screen else type(node).__name__)
            yield where, self.get_key_display(a.binding), a.binding.description

    async def action_quit(self) -> None:
        """Give back the locks taken here, then quit."""
        await self.release_leases()
        self.exit()

    async def release_leases(self) -> None:
        """Release every lock taken from this app (best effort: a lost one lapses by itself)."""
        unlock = api(self.link.session, "unlock")
        for resource, lease in list(self.leases.items()):
            if unlock is not None:
                try:
                    await asyncio.wait_for(unlock(resource, getattr(lease, "token", None)), RELEASE_TIMEOUT_S)
                except (ClientError, TimeoutError) as e:
                    log.info("releasing %s on exit: %s", resource, e)
            self.leases.pop(resource, None)

    def action_reconnect(self) -> None:
        """Drop the connection and connect again now."""
        self.link.backoff.reset()
        if self.link.session is not None:
            self.link.lost("reconnect asked for")
        else:
            self.run_link()
