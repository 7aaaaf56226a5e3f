"""Screens of the terminal UI: one per mode (PVs, alarms, locks, jobs, interlocks) and the dialogs."""

from labctl.clients.tui.screens.alarms import AlarmsScreen
from labctl.clients.tui.screens.base import LiveScreen
from labctl.clients.tui.screens.browser import BrowserScreen
from labctl.clients.tui.screens.help import HelpScreen
from labctl.clients.tui.screens.interlocks import InterlocksScreen
from labctl.clients.tui.screens.jobs import JobsScreen
from labctl.clients.tui.screens.locks import LocksScreen
from labctl.clients.tui.screens.write import WriteDialog, WriteOutcome

__all__ = ["AlarmsScreen", "BrowserScreen", "HelpScreen", "InterlocksScreen", "JobsScreen", "LiveScreen", "LocksScreen", "WriteDialog", "WriteOutcome"]
