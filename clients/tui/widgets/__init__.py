"""Widgets of the terminal UI: the PV table and tree, the detail pane, the status line and banner."""

from labctl.clients.tui.widgets.detail import DetailPane
from labctl.clients.tui.widgets.pv_table import PVTable, severity_style
from labctl.clients.tui.widgets.pv_tree import PVTree
from labctl.clients.tui.widgets.status import Banner, StatusLine

__all__ = ["Banner", "DetailPane", "PVTable", "PVTree", "StatusLine", "severity_style"]
