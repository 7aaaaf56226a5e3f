"""The labctl command as a person runs it: check, and serve with clean shutdown, side by side."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import wait_for_sync
from tests.served import Served

ROOT = Path(__file__).resolve().parents[2]
LABCTL = [sys.executable, "-m", "labctl"]


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


@pytest.fixture
def served(tmp_path):
    started: list[Served] = []

    def start(name: str) -> Served:
        s = Served([*LABCTL, "serve", "config/demo.yaml"], tmp_path / name, cwd=ROOT)
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
