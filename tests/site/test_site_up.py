"""``labctl site up|status|down``: the demo split into three servers on one PostgreSQL/TimescaleDB, as people run it.

First the split itself (every PV of the demo served by exactly one of the three site
files, each a valid site file); then the commands as subprocesses in a temporary state
directory on free ports: three servers registered and up in the site directory (read
with ``labctl servers``), the demo accounts in the site's database, and ``site down``
stopping every process it started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from labctl.ioc.alarms import SUMMARY_PVS
from labctl.ioc.build import build_database
from labctl.server.site import load_site
from labctl.server.siteup import DEMO_SITE, SPLIT, ServerPlan, server_site, split_demo, write_site_file

from tests.pg.availability import require_postgres


def _names(path: Path) -> set[str]:
    site = load_site(path)
    return set(build_database(site, path.parent, source=str(path)).names()) - set(SUMMARY_PVS)


def test_the_demo_splits_into_three_valid_site_files_serving_each_pv_once(tmp_path):
    demo = yaml.safe_load(DEMO_SITE.read_text(encoding="utf-8"))
    parts = split_demo(demo)
    assert list(parts) == list(SPLIT) == ["cryo", "bench", "magnet"]
    served: dict[str, set[str]] = {}
    for i, (name, part) in enumerate(parts.items()):
        plan = ServerPlan(name, 4841 + i, 5064 + 2 * i, str(tmp_path / f"{name}.yaml"), str(tmp_path / name), "")
        doc = server_site(part, demo, plan, "postgresql+psycopg://labctl@db.lab/lab")
        assert doc["server"]["name"] == name and doc["server"]["accounts"] == "database" and "users" not in doc
        write_site_file(Path(plan.site_file), doc)
        served[name] = _names(Path(plan.site_file))
    every = [pv for names in served.values() for pv in names]
    assert len(every) == len(set(every)), "no PV is served by two servers"
    assert set(every) == _names(DEMO_SITE), "every PV of the demo is served"
    assert {"CRYO:MXC:TEMP", "ARB:CRYOSTAT:OWNER"} <= served["cryo"] and "SMU1:VOLT" in served["bench"]
    assert "MAG:TEMP:A" in served["magnet"]


def _labctl(*argv: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LABCTL_HISTORIAN_URL"}
    return subprocess.run([sys.executable, "-m", "labctl", *argv], capture_output=True, text=True, timeout=timeout, env=env)


def _runs(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state.split(") ", 1)[1][:1] != "Z"


def test_site_up_starts_three_registered_servers_and_site_down_stops_them(tmp_path):
    require_postgres()
    site_dir = tmp_path / "site"
    up = _labctl("site", "up", "--dir", str(site_dir), "--free-ports")
    state = json.loads((site_dir / "site.json").read_text()) if (site_dir / "site.json").exists() else None
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        assert state is not None
        url = f"postgresql+psycopg://postgres@127.0.0.1:{state['cluster']['port']}/labctl_site"
        assert "demo site 'demo' is up" in up.stdout and url in up.stdout and "labctl site down" in up.stdout
        for s in state["servers"]:
            assert f"opc.tcp://127.0.0.1:{s['opcua_port']}" in up.stdout and _runs(s["pid"])

        listed = _labctl("servers", "--json", "--historian-url", url)
        assert listed.returncode == 0, listed.stderr
        servers = {s["name"]: s for s in json.loads(listed.stdout)}
        assert sorted(servers) == ["bench", "cryo", "magnet"]
        assert all(s["state"] == "up" and s["site"] == "demo" for s in servers.values()), servers
        for s in state["servers"]:
            assert servers[s["name"]]["opcua_endpoint"] == f"opc.tcp://127.0.0.1:{s['opcua_port']}"
        users = _labctl("user", "list", "--json", "--historian-url", url)
        assert users.returncode == 0, users.stderr
        assert {(u["name"], tuple(u["roles"])) for u in json.loads(users.stdout)} == {
            ("viewer", ("viewer",)), ("operator", ("operator",)), ("expert", ("expert",)), ("admin", ("admin",)),
        }  # fmt: skip
        status = _labctl("site", "status", "--dir", str(site_dir))
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count(" running (pid ") == 3 and "PostgreSQL running" in status.stdout

        again = _labctl("site", "up", "--dir", str(site_dir), "--free-ports")
        assert again.returncode == 1 and "runs already" in again.stderr
    finally:
        down = _labctl("site", "down", "--dir", str(site_dir), "--purge")
    assert down.returncode == 0, down.stderr
    assert down.stdout.count("stopped server") == 3 and "stopped PostgreSQL" in down.stdout
    assert not any(_runs(s["pid"]) for s in state["servers"])
    assert not site_dir.exists()
