"""The labctl command as a person runs it: check, and serve with clean shutdown, side by side."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import free_port, free_tcp_udp_port, wait_for_sync

ROOT = Path(__file__).resolve().parents[2]
LABCTL = [sys.executable, "-m", "server.cli"]


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*LABCTL, *args], cwd=ROOT, capture_output=True, text=True, timeout=60, **kw)


def test_check_the_demo_site():
    p = run("check", "config/demo.yaml")
    assert p.returncode == 0, p.stderr
    assert "OK -- site 'demo'" in p.stdout
    assert re.search(r"PVs: \d+ \(24 instrument, 3 derived", p.stdout)
    for word in ("bridge", "lakeshore372", "cryostat (lockable)", "OPC UA: opc.tcp://127.0.0.1:4840"):
        assert word in p.stdout


def test_check_a_malformed_site_names_file_line_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "config/demo.yaml").read_text().replace('channel: "temperature:6"', 'channel: "temperature:99"', 1))
    p = run("check", str(bad))
    assert p.returncode == 2
    assert f"{bad} instruments[0].pvs[3].channel: PV CRYO:MXC:TEMP: the lakeshore372 driver has no channel 'temperature:99'" in p.stderr
    bad.write_text("site: x\nflavour: mint\n")
    p = run("check", str(bad))
    assert p.returncode == 2 and f"{bad}:2:1 flavour: unknown key" in p.stderr


class Served:
    """`labctl serve` in a subprocess; lines of its log collected as they come."""

    def __init__(self, tmp: Path, name: str) -> None:
        self.ua_port, self.ca_port = free_port(), free_tcp_udp_port()
        env = {**os.environ, "LABCTL_LOG_LEVEL": "INFO"}
        self.proc = subprocess.Popen(
            [*LABCTL, "serve", "config/demo.yaml", "--state-dir", str(tmp / name), "--opcua-port", str(self.ua_port),
             "--ca-port", str(self.ca_port), "--ca-interfaces", "127.0.0.1"],
            cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
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


@pytest.fixture
def served(tmp_path):
    started: list[Served] = []

    def start(name: str) -> Served:
        s = Served(tmp_path, name)
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
        s.stop()


def test_two_servers_side_by_side_start_and_stop_cleanly(served, tmp_path):
    a, b = served("a"), served("b")
    for s in (a, b):
        wait_for_sync(lambda s=s: s.saw("ready;") or s.proc.poll() is not None, timeout=60, what="ready")
        assert s.proc.poll() is None, "\n".join(s.lines)
        assert s.saw(f"opc.tcp://127.0.0.1:{s.ua_port}")
        assert s.saw("viewer")  # the demo accounts are printed
    assert a.stop(signal.SIGTERM) == 0
    assert b.stop(signal.SIGINT) == 0
    for s in (a, b):
        assert s.saw("stopped"), "\n".join(s.lines[-20:])
        assert not any("Traceback" in line for line in s.lines), "\n".join(s.lines)
    assert (tmp_path / "a" / "history.sqlite").exists() and (tmp_path / "b" / "history.sqlite").exists()
