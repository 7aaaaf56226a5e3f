"""``labctl gui`` and ``labctl tui`` end cleanly on SIGINT (Ctrl-C) and SIGTERM: status 0, no traceback.

Each runs as a real ``labctl`` process against a server in this process (on a thread of
its own); the test waits until the display has subscribed (the server holds one more
subscription), sends the signal, and waits for the exit with a generous timeout.
"""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from labctl.server.site import parse_site

from tests.helpers import wait_for_sync
from tests.ui.test_gui import GuiServerThread, wall_site

EXIT_TIMEOUT_S = 30.0
LABCTL = [sys.executable, "-m", "labctl"]


@pytest.fixture(scope="module")
def signal_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuiServerThread]:
    base = tmp_path_factory.mktemp("signals")
    st = GuiServerThread(parse_site(wall_site(base / "state"), "wall-site.yaml"), base)
    st.start()
    yield st
    st.stop()


def subscriptions(server: GuiServerThread) -> int:
    """How many OPC UA subscriptions the server holds (a display subscribes once it is up)."""
    return server.call(lambda s: len(s.service("opcua")._iserver.subscription_service.subscriptions))  # noqa: SLF001


def _stop(proc: subprocess.Popen[bytes], server: GuiServerThread, before: int, signum: int) -> None:
    try:
        wait_for_sync(lambda: subscriptions(server) > before or proc.poll() is not None, timeout=60.0, what="the display to subscribe")
        assert proc.poll() is None, "the display ended by itself"
        proc.send_signal(signum)
        proc.wait(EXIT_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.gui
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_gui_ends_cleanly_on_a_signal(signal_server, tmp_path: Path, signum: int):
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "LABCTL_PASSWORD": "operator-pw"}
    before = subscriptions(signal_server)
    err = tmp_path / "stderr"
    with err.open("wb") as stderr:
        proc = subprocess.Popen(
            [*LABCTL, "gui", "--url", signal_server.url, "--user", "operator", "--security", "None"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
        _stop(proc, signal_server, before, signum)
    text = err.read_text(errors="replace")
    assert proc.returncode == 0, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_tui_ends_cleanly_on_a_signal(signal_server, signum: int):
    env = {**os.environ, "LABCTL_PASSWORD": "operator-pw", "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    before = subscriptions(signal_server)
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [*LABCTL, "tui", "--url", signal_server.url, "--user", "operator", "--security", "None"],
            env=env, stdin=follower, stdout=follower, stderr=follower, start_new_session=True,
        )  # fmt: skip
        os.close(follower)
        output = bytearray()

        def drain() -> None:  # keep the terminal's buffer from filling while the app draws
            try:
                while True:
                    chunk = os.read(leader, 65536)
                    if not chunk:
                        return
                    output.extend(chunk)
            except OSError:
                return

        import threading

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        _stop(proc, signal_server, before, signum)
        reader.join(5)
    finally:
        os.close(leader)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-2000:]
    assert "Traceback" not in text
