"""Start-up of the display: the Qt application, the link, the window.

:func:`run` is what ``labctl gui`` calls. A password that neither ``LABCTL_PASSWORD``
nor a terminal provided is asked for in a dialog. With ``screenshot`` the window is drawn
(offscreen when there is no display), and saved once it has settled -- connected, layout
built, every chart holding live points, no history request outstanding -- and at least
``screenshot_after_s`` of live data has been collected; then the application exits.

Ctrl-C (SIGINT) and SIGTERM close the window as its close button does, so the display
ends with status 0, its link closed, and no traceback (:func:`stop_on_signals`). The
display takes no locks, so it has none to give back.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyqtgraph as pg
from labctl.clients.gui.layout import Layout
from labctl.clients.gui.link import Link
from labctl.clients.gui.qtcompat import check_bindings
from labctl.clients.gui.window import MainWindow
from PySide6 import QtCore, QtWidgets

#: With a screenshot requested: give up waiting for data after this long, and save what is there.
SCREENSHOT_TIMEOUT_S = 120.0


class QtBindingError(RuntimeError):
    """The installed Qt bindings cannot run the display (see :mod:`labctl.clients.gui.qtcompat`)."""


def application() -> QtWidgets.QApplication:
    """The process's QApplication (made once). Raises QtBindingError for a broken binding."""
    problem = check_bindings()
    if problem is not None:
        raise QtBindingError(problem)
    app = QtWidgets.QApplication.instance()
    if app is None:
        app = QtWidgets.QApplication(sys.argv[:1])
        app.setApplicationName("labctl")
    pg.setConfigOptions(antialias=False)  # thin lines at high rates; antialiasing costs more than it shows
    return app  # type: ignore[return-value]


def ask_password(user: str) -> str | None:
    """A password dialog; None when cancelled."""
    text, ok = QtWidgets.QInputDialog.getText(
        None, "labctl", f"password for {user}:", QtWidgets.QLineEdit.EchoMode.Password
    )
    return text if ok else None


def run(
    url: str,
    user: str | None,
    password: str | None,
    security: str = "auto",
    *,
    layout: Layout | None = None,
    large: bool = False,
    screenshot: Path | None = None,
    screenshot_after_s: float = 2.0,
) -> int:
    """Open the display and run until its window closes (or the screenshot is saved). Returns the exit status."""
    if user and password is None and screenshot is not None:
        print(f"labctl gui: no password for user {user!r}: set LABCTL_PASSWORD (a screenshot run asks nobody)", file=sys.stderr)
        return 2
    app = application()
    if user and password is None:
        password = ask_password(user)
        if password is None:
            return 1
    link = Link(url, user, password, security)
    link.start()
    window = MainWindow(link, layout, large=large)
    window.show()
    status = 0
    if screenshot is not None:
        opened = time.monotonic()

        def check() -> None:
            nonlocal status
            waited = time.monotonic() - opened
            if (window.settled() and waited >= screenshot_after_s) or waited > SCREENSHOT_TIMEOUT_S:
                timer.stop()
                try:
                    window.save_screenshot(screenshot)
                except OSError as e:
                    print(f"labctl gui: {e}", file=sys.stderr)
                    status = 1
                window.close()

        timer = QtCore.QTimer(window)
        timer.timeout.connect(check)
        timer.start(200)
    restore = stop_on_signals(window)
    try:
        rc = app.exec()
    finally:
        restore()
        link.stop()
    return status or rc


def stop_on_signals(window: QtWidgets.QWidget, poll_ms: int = 200) -> Callable[[], None]:
    """Close ``window`` (ending the application) on SIGINT or SIGTERM; returns a function that restores the old handlers.

    Qt's event loop runs in C++: Python runs a signal handler only when Python code next
    runs, and Python's default SIGINT handler raises KeyboardInterrupt in whatever Qt
    callback that is (the window's tick), which Qt reports and ignores. So the handler
    here only asks Qt to close the window once control is back in the loop, and a timer
    that does nothing lets Python run handlers at least every ``poll_ms``.
    """
    wanted = [s for s in (signal.SIGINT, signal.SIGTERM) if s is not None]

    def handle(signum: int, frame: Any) -> None:
        QtCore.QTimer.singleShot(0, window.close)

    previous = {s: signal.signal(s, handle) for s in wanted}
    pulse = QtCore.QTimer(window)
    pulse.timeout.connect(lambda: None)
    pulse.start(poll_ms)

    def restore() -> None:
        pulse.stop()
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)

    return restore
