"""A ``labctl serve`` in a subprocess, on free ports, for tests of the command as people run it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.helpers import free_port, free_tcp_udp_port, wait_for_sync


class Served:
    """``COMMAND --state-dir ... --opcua-port ...`` (a ``labctl serve``) in a subprocess; its log lines collected as they come."""

    def __init__(self, command: list[str], state_dir: Path, cwd: Path) -> None:
        self.ua_port, self.ca_port = free_port(), free_tcp_udp_port()
        self.url = f"opc.tcp://127.0.0.1:{self.ua_port}"
        env = {**os.environ, "LABCTL_LOG_LEVEL": "INFO"}
        self.proc = subprocess.Popen(
            [*command, "--state-dir", str(state_dir), "--opcua-port", str(self.ua_port),
             "--ca-port", str(self.ca_port), "--ca-interfaces", "127.0.0.1"],
            cwd=cwd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())

    def saw(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=30)
        self._reader.join(timeout=5)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return rc

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the server logs that it is ready; fail with its log if it exits first."""
        wait_for_sync(lambda: self.saw("ready;") or self.proc.poll() is not None, timeout=timeout, what="server ready")
        assert self.proc.poll() is None, "\n".join(self.lines)


@contextlib.contextmanager
def site_servers(site: Path, state_dir: Path, cwd: Path) -> Iterator[Callable[[], Served]]:
    """``start()`` serves ``site`` (``labctl serve``) and waits until it is ready; each one left running is killed at the end."""
    started: list[Served] = []

    def start() -> Served:
        s = Served([sys.executable, "-m", "labctl", "serve", str(site)], state_dir, cwd=cwd)
        started.append(s)
        s.wait_ready()
        return s

    try:
        yield start
    finally:
        for s in started:
            if s.proc.poll() is None:
                s.proc.kill()
            s.stop()
