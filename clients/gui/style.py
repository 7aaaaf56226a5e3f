"""Colours and fonts of the control-room display.

Alarm colours follow the EPICS display convention operators already know: MINOR yellow,
MAJOR red, INVALID magenta; a value the display cannot currently vouch for (no
connection) is grey. The background is dark, as wall screens run all day. Large-font
mode multiplies every font size by :data:`LARGE_SCALE`, so a layout reads from across
the room without being redesigned.
"""

from __future__ import annotations

from dataclasses import dataclass

from labctl.ioc.types import Severity

BACKGROUND = "#101418"
PANEL = "#1a1f24"
BORDER = "#2c333a"
TEXT = "#e6e6e6"
DIM = "#8a9299"
OK_ACCENT = "#43a047"

#: Severity -> (background, foreground) of a value or banner in that state.
SEVERITY_COLORS: dict[Severity, tuple[str, str]] = {
    Severity.NO_ALARM: (PANEL, TEXT),
    Severity.MINOR: ("#fbc02d", "#000000"),
    Severity.MAJOR: ("#d32f2f", "#ffffff"),
    Severity.INVALID: ("#8e24aa", "#ffffff"),
}
#: No connection: the last value is shown, greyed, never as if it were current.
STALE_COLORS = ("#37474f", "#b0bec5")
#: Interlock state name -> severity it is shown with.
INTERLOCK_SEVERITY: dict[str, Severity] = {
    "OK": Severity.NO_ALARM,
    "WARN": Severity.MINOR,
    "PENDING": Severity.MINOR,
    "CLEARING": Severity.MINOR,
    "TRIPPED": Severity.MAJOR,
    "RESET_NEEDED": Severity.MAJOR,
}
#: Curve colours, in the order PVs appear on a chart (readable on the dark background).
CURVE_COLORS = ("#4fc3f7", "#ffb74d", "#81c784", "#e57373", "#ba68c8", "#fff176", "#4db6ac", "#f06292", "#a1887f", "#90a4ae")
LARGE_SCALE = 1.6


@dataclass(frozen=True)
class Theme:
    """Font sizes for normal or large-font mode."""

    large: bool = False

    @property
    def scale(self) -> float:
        """The factor applied to every font size."""
        return LARGE_SCALE if self.large else 1.0

    def pt(self, size: float) -> int:
        """A font size in points, scaled."""
        return max(1, round(size * self.scale))

    @property
    def line_width(self) -> float:
        """Curve width in pixels."""
        return 2.5 if self.large else 1.5

    def stylesheet(self) -> str:
        """The window's Qt style sheet."""
        return f"""
QWidget {{ background: {BACKGROUND}; color: {TEXT}; font-size: {self.pt(10)}pt; }}
QFrame#panel {{ background: {PANEL}; border: 1px solid {BORDER}; border-radius: 4px; }}
QLabel#panelTitle {{ color: {DIM}; font-size: {self.pt(10)}pt; font-weight: bold; background: transparent; }}
QLabel {{ background: transparent; }}
QTableWidget {{ background: {PANEL}; gridline-color: {BORDER}; border: none; font-size: {self.pt(10)}pt; }}
QHeaderView::section {{ background: {BACKGROUND}; color: {DIM}; border: none; padding: 2px 6px; font-size: {self.pt(9)}pt; }}
QPushButton {{ background: #263238; border: 1px solid {BORDER}; padding: 3px 10px; border-radius: 3px; }}
QPushButton:disabled {{ color: #55606a; }}
QStatusBar {{ color: {DIM}; font-size: {self.pt(9)}pt; }}
"""


def severity_colors(severity: Severity | None, connected: bool = True) -> tuple[str, str]:
    """(background, foreground) for a severity; grey when not connected or unknown."""
    if not connected or severity is None:
        return STALE_COLORS
    return SEVERITY_COLORS[severity]
