"""Optional parts of labctl and the extras that install them.

The base install serves and runs the command-line client; the rest comes with an extra
(``pip install 'labctl[gui]'``). A command that needs a missing extra says which one, in
one line, instead of failing with a traceback from deep inside an import.
"""

from __future__ import annotations

import importlib.util

#: extra -> (what it is for, the top-level modules it installs)
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "postgres": ("a PostgreSQL/TimescaleDB historian", ("psycopg",)),
    "tui": ("the terminal UI (labctl tui)", ("textual",)),
    "gui": ("the control-room display (labctl gui)", ("PySide6", "pyqtgraph")),
    "notebook": ("DataFrame results", ("pandas",)),
}


class MissingExtra(ImportError):
    """A part of labctl was used whose extra is not installed."""

    def __init__(self, extra: str, missing: str) -> None:
        self.extra = extra
        self.missing = missing
        what = EXTRAS[extra][0]
        super().__init__(f"{what} needs the '{extra}' extra ({missing} is not installed): pip install 'labctl[{extra}]'")


def require(extra: str) -> None:
    """Raise :class:`MissingExtra` unless every module of ``extra`` can be imported."""
    for module in EXTRAS[extra][1]:
        if importlib.util.find_spec(module) is None:
            raise MissingExtra(extra, module)
