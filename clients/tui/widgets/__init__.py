"""Widgets of the terminal UI: the PV table and tree, the detail pane, the status line and banner."""

from clients.tui.widgets.detail import DetailPane
from clients.tui.widgets.pv_table import PVTable, severity_style
from clients.tui.widgets.pv_tree import PVTree
from clients.tui.widgets.status import Banner, StatusLine

__all__ = ["Banner", "DetailPane", "PVTable", "PVTree", "StatusLine", "severity_style"]
