"""The help screen (``?``): every key binding active where the user pressed it.

The list is made from the bindings themselves (the app's, the screen's, the focused
widget's), so it cannot drift from what the keys do.
"""

from __future__ import annotations

from collections.abc import Iterable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

INTRO = (
    "labctl terminal UI. Modes: 1 PVs, 2 alarms, 3 locks, 4 jobs. In the PV table, Enter or w writes the PV "
    "under the cursor; / filters (words, or globs like CRYO:*:TEMP); f goes to the folders. Colours: yellow "
    "MINOR, red MAJOR, magenta INVALID; the ALARM column spells the severity out too."
)


#: Bindings every Textual app has that say nothing about this one.
NOISE = {"Copy selected text"}


def rows(bindings: Iterable[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """(where, key, what) rows without repeats, in the order given."""
    seen: set[tuple[str, str]] = set()
    out = []
    for where, key, what in bindings:
        if (key, what) in seen or not what or what in NOISE:
            continue
        seen.add((key, what))
        out.append((where, key, what))
    return out


class HelpScreen(ModalScreen[None]):
    """The key bindings, as a table; any of escape, q or ? closes it."""

    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("q", "close", "Close", show=False),
        Binding("question_mark", "close", "Close", show=False),
    ]

    def __init__(self, bindings: list[tuple[str, str, str]]) -> None:
        super().__init__()
        self.bindings = rows(bindings)

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box", classes="dialog"):
            yield Static(Content.styled("Keys", "bold"), id="help-title")
            yield Static(INTRO, id="help-intro")
            yield DataTable(id="help-keys", cursor_type="none", show_cursor=False)
            yield Static("escape closes this help", id="help-close")

    def on_mount(self) -> None:
        table = self.query_one("#help-keys", DataTable)
        table.add_columns("KEY", "WHAT", "WHERE")
        for where, key, what in self.bindings:
            table.add_row(key, what, where)

    def action_close(self) -> None:
        """Back to where help was asked for."""
        self.dismiss(None)
