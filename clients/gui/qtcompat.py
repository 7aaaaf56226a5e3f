"""A start-up check of the Qt bindings: refuse a build that corrupts reference counts.

PySide6/shiboken6 6.12.0 (abi3 wheels) return ``None`` from void methods without taking
a reference to it when run on CPython 3.11. Every such call (``update()``, ``hide()``,
``setText()``... pyqtgraph makes dozens per redraw) lowers ``None``'s reference count by
one, and after some tens of thousands the interpreter aborts with "Fatal Python error:
none_dealloc". Python 3.12 made ``None`` immortal, which hides the bug there; 6.11.3 does
not have it. A wall display must not die after a few minutes, so :func:`check_bindings`
detects the fault directly (a void call must leave ``None``'s count unchanged) and the
display refuses to start with an error that says what to install.
"""

from __future__ import annotations

import sys

#: Void calls made by the check; a sound binding leaves None's reference count as it was.
PROBE_CALLS = 200


def check_bindings() -> str | None:
    """None if the Qt bindings keep reference counts; otherwise the reason they cannot be used."""
    from PySide6 import QtCore

    probe = QtCore.QObject()
    before = sys.getrefcount(None)
    for _ in range(PROBE_CALLS):
        probe.setObjectName("probe")  # void: returns None
    lost = before - sys.getrefcount(None)
    if lost < PROBE_CALLS // 2:
        return None
    import PySide6

    return (
        f"PySide6 {PySide6.__version__} on Python {sys.version_info.major}.{sys.version_info.minor} drops a reference "
        f"to None on every void Qt call ({lost} in {PROBE_CALLS} calls) and would crash the display within minutes; "
        "install PySide6-Essentials 6.11.3 (pip install 'PySide6-Essentials==6.11.3'), or run on Python 3.12 or newer"
    )
