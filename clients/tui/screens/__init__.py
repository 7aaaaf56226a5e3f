"""Screens of the terminal UI: one per mode (PVs, alarms, locks, jobs) and the dialogs."""

from clients.tui.screens.alarms import AlarmsScreen
from clients.tui.screens.base import LiveScreen
from clients.tui.screens.browser import BrowserScreen
from clients.tui.screens.help import HelpScreen
from clients.tui.screens.jobs import JobsScreen
from clients.tui.screens.locks import LocksScreen
from clients.tui.screens.write import WriteDialog, WriteOutcome

__all__ = ["AlarmsScreen", "BrowserScreen", "HelpScreen", "JobsScreen", "LiveScreen", "LocksScreen", "WriteDialog", "WriteOutcome"]
