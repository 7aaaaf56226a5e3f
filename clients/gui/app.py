"""Start-up of the display: the Qt application, the link, the window.

:func:`run` is what ``labctl gui`` calls. A password that neither ``LABCTL_PASSWORD``
nor a terminal provided is asked for in a dialog. With ``screenshot`` the window is drawn
(offscreen when there is no display), and saved once it has settled -- connected, layout
built, every chart holding live points, no history request outstanding -- and at least
``screenshot_after_s`` of live data has been collected; then the application exits.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

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
    try:
        rc = app.exec()
    finally:
        link.stop()
    return status or rc
