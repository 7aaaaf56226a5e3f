"""``labctl site up|down|status``: a demo site of three servers and one PostgreSQL/TimescaleDB on this machine.

Theory of operation. ``labctl site up`` makes the bundled demo (``config/demo.yaml``) a
site of several servers, as a lab would run it across rack PCs, on one machine:

* **the database**: a PostgreSQL cluster of its own in the state directory (default
  ``./var/site/``, ``pg/``), created with ``initdb`` on first use and started with
  ``pg_ctl`` on the loopback interface (trust authentication: a demo), with TimescaleDB
  preloaded and created in the database ``labctl_site`` when it is installed. The
  binaries are PostgreSQL's own (``LABCTL_PG_BINDIR``, else the newest under
  ``/usr/lib/postgresql``). PostgreSQL refuses to run as root: run as root, it runs as the
  ``postgres`` user (``LABCTL_PG_OS_USER``), and when that user cannot reach the state
  directory its data goes to a temporary directory named in ``site.json``.
* **the accounts**: the site directory's schema is created and the demo's accounts
  (``viewer``, ``operator``, ``expert``, ``admin``, password ``<user>-demo``) are added to
  the site's database (:mod:`labctl.server.historian.accounts`, audited), unless there.
* **three servers**: the demo's instruments, PVs, procedures and interlocks split by
  apparatus (:data:`SPLIT`: ``cryo`` the cryostat and its vacuum, ``bench`` the
  source-meter and the power supply, ``magnet`` the magnet's temperature controller),
  each written as a site file of its own (``config/<name>.yaml``: its ``server.name``,
  ports, ``server.accounts: database``, and the database as ``historian.url``) and
  served by a ``labctl serve`` process of its own in the background (log in
  ``logs/<name>.log``, state in ``servers/<name>/``). ``up`` returns once each logs that
  it is ready, and prints their endpoints and how to stop the site.

``site.json`` in the state directory records what runs (the cluster, each server's
process id and ports), so ``labctl site status`` reports on it and ``labctl site down``
stops it: the servers first (SIGTERM: each flushes its archive and marks itself stopped in
the directory), then the cluster. The data stays for the next ``up`` (``--purge`` removes
it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from labctl.ioc.errors import LabctlError

#: The bundled demo site that is split into the site's servers.
DEMO_SITE = Path(__file__).resolve().parent.parent / "config" / "demo.yaml"
#: Where ``labctl site`` keeps its state by default.
DEFAULT_DIR = Path("var") / "site"
DATABASE = "labctl_site"
SUPERUSER = "postgres"
DEFAULT_DB_PORT = 55432
DEFAULT_OPCUA_PORT = 4841
DEFAULT_CA_PORT = 5064
#: Channel Access ports of successive servers are this far apart (5065 stays the beacon port).
CA_PORT_STEP = 2
STATE_FILE = "site.json"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0

#: How the demo is split: server name -> what of ``config/demo.yaml`` it serves (simulations follow the instruments).
SPLIT: dict[str, dict[str, list[str]]] = {
    "cryo": {
        "instruments": ["bridge", "gauge"],
        "pvs": ["CRYO:MXC:TEMP:MK", "CRYO:MXC:TEMP:CAL", "LAB:SAMPLE"],
        "resources": ["cryostat", "vacuum"],
        "tables": ["rox_mxc"],
        "procedures": ["heater_sweep"],
        "interlocks": ["mxc_warm", "ivc_vacuum"],
    },
    "bench": {
        "instruments": ["smu1", "psu"],
        "pvs": ["SMU1:POWER", "LAB:NOTE"],
        "resources": ["smu1", "psu"],
        "tables": [],
        "procedures": ["iv_curve"],
        "interlocks": [],
    },
    "magnet": {
        "instruments": ["magtc"],
        "pvs": [],
        "resources": ["magnet"],
        "tables": [],
        "procedures": [],
        "interlocks": [],
    },
}
_DESCRIPTIONS = {
    "cryo": "the dilution cryostat: Lake Shore 372 bridge, Pfeiffer TPG gauge, its interlocks",
    "bench": "the bench: Keithley 2400 source-meter on a 10 kOhm sample, SCPI power supply",
    "magnet": "the magnet: Lake Shore 336 on its coil and leads (a cryostat simulation of its own)",
}


class SiteUpError(LabctlError):
    """The demo site cannot be started, stopped or read (the message says why and what to do)."""


# ---- the site files -------------------------------------------------------------------------------------------


def split_demo(demo: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The demo's site document split into one per server of :data:`SPLIT` (without server settings).

    Raises:
        SiteUpError: something of the demo is in no server's part, or in two (the demo changed).
    """
    parts: dict[str, dict[str, Any]] = {}
    for section, key in (("instruments", "name"), ("pvs", "name"), ("resources", "name"), ("interlocks", "name")):
        items = [i[key] for i in demo.get(section) or []]
        assigned = [n for part in SPLIT.values() for n in part[section]]
        _check_split(section, items, assigned)
    for section in ("tables", "procedures"):
        _check_split(section, list(demo.get(section) or {}), [n for part in SPLIT.values() for n in part[section]])
    for name, part in SPLIT.items():
        doc = copy.deepcopy({k: v for k, v in demo.items() if k not in ("users", "server")})
        doc["description"] = f"labctl demo site, server {name}: {_DESCRIPTIONS[name]}"
        doc["instruments"] = [i for i in demo["instruments"] if i["name"] in part["instruments"]]
        used = {i.get("simulation") for i in doc["instruments"]}
        doc["simulations"] = {k: v for k, v in (demo.get("simulations") or {}).items() if k in used}
        doc["pvs"] = [p for p in demo.get("pvs") or [] if p["name"] in part["pvs"]]
        doc["resources"] = [r for r in demo.get("resources") or [] if r["name"] in part["resources"]]
        doc["tables"] = {k: v for k, v in (demo.get("tables") or {}).items() if k in part["tables"]}
        doc["procedures"] = {k: v for k, v in (demo.get("procedures") or {}).items() if k in part["procedures"]}
        doc["interlocks"] = [i for i in demo.get("interlocks") or [] if i["name"] in part["interlocks"]]
        parts[name] = {k: v for k, v in doc.items() if v not in ({}, [])}
    return parts


def _check_split(section: str, items: list[str], assigned: list[str]) -> None:
    missing = sorted(set(items) - set(assigned))
    twice = sorted({n for n in assigned if assigned.count(n) > 1})
    unknown = sorted(set(assigned) - set(items))
    if missing or twice or unknown:
        raise SiteUpError(
            f"the demo site's {section} are not split into the site's servers: "
            + "; ".join(f"{what}: {', '.join(names)}" for what, names in
                        (("in no server", missing), ("in two servers", twice), ("not in the demo", unknown)) if names)
        )  # fmt: skip


@dataclass
class ServerPlan:
    """One server of the demo site: its name, ports, files, and process."""

    name: str
    opcua_port: int
    ca_port: int
    site_file: str
    state_dir: str
    log: str
    pid: int | None = None

    @property
    def opcua_url(self) -> str:
        """Its OPC UA endpoint."""
        return f"opc.tcp://127.0.0.1:{self.opcua_port}"


def server_site(part: dict[str, Any], demo: dict[str, Any], plan: ServerPlan, url: str) -> dict[str, Any]:
    """A server's site document: its part of the demo with its name, ports, accounts and the site's database."""
    server = copy.deepcopy(demo.get("server") or {})
    server["name"] = plan.name
    server["state_dir"] = plan.state_dir
    server["accounts"] = "database"
    server.setdefault("opcua", {})["port"] = plan.opcua_port
    ca = server.setdefault("ca", {})
    ca["port"] = plan.ca_port
    ca.setdefault("interfaces", ["127.0.0.1"])
    rest = {k: v for k, v in part.items() if k not in ("site", "description", "historian")}
    return {"site": demo["site"], "description": part["description"], "server": server, "historian": {"url": url}, **rest}


def write_site_file(path: Path, doc: dict[str, Any]) -> None:
    """A site document as YAML, with a header saying where it comes from."""
    head = (
        f"# labctl demo site, server {doc['server']['name']!r}: written by `labctl site up` from the bundled demo\n"
        "# (config/demo.yaml), split by apparatus. Accounts come from the site's database (labctl user).\n\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + yaml.safe_dump(doc, sort_keys=False, width=120, allow_unicode=True), encoding="utf-8")


def demo_accounts(demo: dict[str, Any]) -> list[dict[str, Any]]:
    """The demo's accounts (name, roles, password hash, description)."""
    return list(demo.get("users") or [])


# ---- PostgreSQL -------------------------------------------------------------------------------------------------


def pg_bindir() -> Path:
    """PostgreSQL's server binaries: ``LABCTL_PG_BINDIR``, else the newest ``/usr/lib/postgresql/<major>/bin``."""
    configured = os.environ.get("LABCTL_PG_BINDIR")
    if configured:
        bindir = Path(configured)
    else:
        found = sorted(
            (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").is_file()),
            key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        )
        if not found:
            raise SiteUpError(
                "no PostgreSQL server found (no /usr/lib/postgresql/<version>/bin/initdb); install it "
                "(Debian: apt-get install postgresql) or set LABCTL_PG_BINDIR"
            )
        bindir = found[-1]
    missing = [n for n in ("initdb", "pg_ctl", "postgres") if not (bindir / n).is_file()]
    if missing:
        raise SiteUpError(f"{bindir} lacks PostgreSQL's {', '.join(missing)}; set LABCTL_PG_BINDIR to its bin directory")
    return bindir


def timescaledb_installed(bindir: Path) -> bool:
    """Whether the TimescaleDB extension is installed for this PostgreSQL."""
    pg_config = bindir / "pg_config"
    if not pg_config.is_file():
        return False
    out = subprocess.run([str(pg_config), "--sharedir", "--pkglibdir"], capture_output=True, text=True, check=False)
    lines = out.stdout.splitlines()
    if out.returncode != 0 or len(lines) < 2:
        return False
    return (Path(lines[0]) / "extension" / "timescaledb.control").is_file() and (Path(lines[1]) / "timescaledb.so").is_file()


def _os_user() -> pwd.struct_passwd | None:
    """Who PostgreSQL runs as: None (this user) unless run as root."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("LABCTL_PG_OS_USER", "postgres")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise SiteUpError(
            f"run as root, PostgreSQL must run as another user, but there is no user {name!r}; "
            "install PostgreSQL's package (it adds 'postgres') or set LABCTL_PG_OS_USER"
        ) from None


def _reachable_by(path: Path, user: pwd.struct_passwd) -> bool:
    """Whether ``user`` may enter ``path`` and every directory above it."""
    for p in [path, *path.parents]:
        st = p.stat()
        bit = 0o100 if st.st_uid == user.pw_uid else 0o010 if st.st_gid == user.pw_gid else 0o001
        if not st.st_mode & bit:
            return False
    return True


@dataclass
class ClusterPlan:
    """The site's PostgreSQL cluster."""

    bindir: str
    datadir: str
    port: int
    timescaledb: bool
    os_user: str | None = None
    log: str = ""

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the site's database."""
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{DATABASE}"

    def conninfo(self, dbname: str = DATABASE) -> str:
        """A libpq connection string."""
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={dbname} connect_timeout=5"


class Cluster:
    """``initdb`` / ``pg_ctl start`` / ``pg_ctl stop`` of the site's cluster, as its operating-system user."""

    def __init__(self, plan: ClusterPlan) -> None:
        self.plan = plan
        self.user = pwd.getpwnam(plan.os_user) if plan.os_user else None

    def _run(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", TZ="UTC")
        extra: dict[str, Any] = {}
        cwd = str(Path(self.plan.datadir).parent)
        if self.user is not None:
            env.update(HOME=cwd, USER=self.user.pw_name, LOGNAME=self.user.pw_name)
            extra = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        cmd = [str(Path(self.plan.bindir) / args[0]), *args[1:]]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout, check=False, **extra)
        if check and res.returncode != 0:
            raise SiteUpError(f"{' '.join(cmd)} failed ({res.returncode}): {(res.stderr or res.stdout).strip()[-2000:]}")
        return res

    @property
    def initialised(self) -> bool:
        """Whether ``initdb`` has run."""
        return (Path(self.plan.datadir) / "PG_VERSION").is_file()

    def init(self) -> None:
        """``initdb``, and the demo's settings (loopback only, TimescaleDB preloaded when installed)."""
        data = Path(self.plan.datadir)
        data.parent.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            os.chown(data.parent, self.user.pw_uid, self.user.pw_gid)
        self._run("initdb", "-D", str(data), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-instructions")
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": "''",  # TCP on loopback only: no socket file to place
            "timezone": "'UTC'",
            "log_timezone": "'UTC'",
            "max_connections": "100",
            "max_locks_per_transaction": "256",  # hypertables: many chunks per transaction
        }
        if self.plan.timescaledb:
            conf["shared_preload_libraries"] = "'timescaledb'"
            conf["timescaledb.telemetry_level"] = "off"
        with open(data / "postgresql.conf", "a", encoding="utf-8") as f:
            f.write("\n# --- labctl demo site (labctl site up)\n")
            f.writelines(f"{k} = {v}\n" for k, v in conf.items())

    @property
    def running(self) -> bool:
        """Whether the cluster's server runs (``pg_ctl status``)."""
        return self.initialised and self._run("pg_ctl", "status", "-D", self.plan.datadir, check=False).returncode == 0

    def start(self) -> None:
        """Start the server on its port and wait until it takes connections."""
        self._run(
            "pg_ctl", "start", "-w", "-t", "60", "-D", self.plan.datadir, "-l", self.plan.log, "-o", f"-p {self.plan.port}",
            timeout=90.0,
        )  # fmt: skip

    def stop(self) -> None:
        """Stop the server (fast: sessions are ended, the data is checkpointed)."""
        if self.running:
            self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", "fast", "-D", self.plan.datadir, timeout=90.0)

    def prepare_database(self) -> None:
        """Create the site's database (with TimescaleDB when installed) unless it exists."""
        import psycopg

        with psycopg.connect(self.plan.conninfo("postgres"), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone() is None:
                conn.execute(f'CREATE DATABASE "{DATABASE}"')
        if self.plan.timescaledb:
            with psycopg.connect(self.plan.conninfo(), autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")


def seed_accounts(url: str, accounts: list[dict[str, Any]]) -> list[str]:
    """Create the site schema and add the accounts that are not there yet (audited); the names added."""
    from labctl.server.historian import accounts as sql
    from labctl.server.historian.backend import open_backend
    from labctl.server.historian.directory import ensure_site_schema
    from labctl.server.historian.ingest import now_us
    from labctl.server.sitedir import command_actor

    backend = open_backend(url, application_name="labctl site up", pool_size=1)
    actor = command_actor()
    added = []
    try:
        with backend.engine.begin() as conn:
            ensure_site_schema(conn, now_us())
            for a in accounts:
                if sql.find_account(conn, a["name"]) is None:
                    sql.add_account(conn, a["name"], tuple(a["roles"]), a.get("password_hash"), a.get("description", ""), actor)
                    added.append(a["name"])
    finally:
        backend.dispose()
    return added


# ---- the state ---------------------------------------------------------------------------------------------------


@dataclass
class SiteState:
    """What ``site.json`` records."""

    site: str
    cluster: ClusterPlan
    servers: list[ServerPlan] = field(default_factory=list)

    @classmethod
    def read(cls, directory: Path) -> SiteState | None:
        """The recorded state, or None when the site was never started here."""
        path = directory / STATE_FILE
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            return cls(doc["site"], ClusterPlan(**doc["cluster"]), [ServerPlan(**s) for s in doc["servers"]])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SiteUpError(f"{path} is damaged ({e}); stop what runs by hand, then remove {directory}") from None

    def write(self, directory: Path) -> None:
        """Record it (replaced atomically)."""
        doc = {"site": self.site, "cluster": asdict(self.cluster), "servers": [asdict(s) for s in self.servers]}
        tmp = directory / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
        os.replace(tmp, directory / STATE_FILE)


def _alive(plan: ServerPlan) -> bool:
    """Whether the process recorded for ``plan`` still runs and is that server (not a reused process id)."""
    if plan.pid is None:
        return False
    try:
        cmdline = Path(f"/proc/{plan.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return plan.site_file.encode() in cmdline and b"serve" in cmdline


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_tcp_udp_port() -> int:
    for _ in range(100):
        port = _free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise SiteUpError("no port free for both TCP and UDP on 127.0.0.1")


# ---- up, down, status ----------------------------------------------------------------------------------------


def site_up(directory: Path, *, db_port: int, opcua_port: int, ca_port: int, free_ports: bool, demo_file: Path = DEMO_SITE) -> SiteState:
    """Start the demo site (see the module docstring); return what runs.

    Raises:
        SiteUpError: it runs already, or something could not be started (what was started is stopped again).
    """
    directory = directory.resolve()
    old = SiteState.read(directory)
    if old is not None and any(_alive(s) for s in old.servers):
        raise SiteUpError(f"the demo site in {directory} runs already (labctl site status --dir {directory}; labctl site down to stop it)")
    demo = yaml.safe_load(demo_file.read_text(encoding="utf-8"))
    parts = split_demo(demo)
    directory.mkdir(parents=True, exist_ok=True)

    bindir = pg_bindir()
    user = _os_user()
    if old is not None:
        plan = old.cluster
    else:
        datadir = directory / "pg" / "data"
        if user is not None and not _reachable_by(directory, user):
            datadir = Path(tempfile.mkdtemp(prefix="labctl-site-pg-")) / "data"  # the state directory is closed to it
        plan = ClusterPlan(str(bindir), str(datadir), _free_port() if free_ports else db_port, timescaledb_installed(bindir),
                           user.pw_name if user is not None else None, str(Path(datadir).parent / "postgres.log"))  # fmt: skip
    cluster = Cluster(plan)
    state = SiteState(demo["site"], plan)
    if not cluster.initialised:
        cluster.init()
    state.write(directory)
    if not cluster.running:
        cluster.start()
    started: list[tuple[ServerPlan, subprocess.Popen[bytes], int]] = []
    try:
        cluster.prepare_database()
        seed_accounts(plan.url, demo_accounts(demo))
        for i, name in enumerate(parts):
            server = ServerPlan(
                name=name,
                opcua_port=_free_port() if free_ports else opcua_port + i,
                ca_port=_free_tcp_udp_port() if free_ports else ca_port + CA_PORT_STEP * i,
                site_file=str(directory / "config" / f"{name}.yaml"),
                state_dir=str(directory / "servers" / name),
                log=str(directory / "logs" / f"{name}.log"),
            )
            write_site_file(Path(server.site_file), server_site(parts[name], demo, server, plan.url))
            started.append((server, *_spawn(server)))
            state.servers.append(server)
        state.write(directory)
        for server, proc, offset in started:
            _wait_ready(server, proc, offset)
    except BaseException:
        for server, proc, _ in started:
            _stop_process(proc.pid, server.name)
        cluster.stop()
        raise
    return state


def _spawn(server: ServerPlan) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``labctl serve`` for ``server`` in a session of its own; the process, and where its log goes on."""
    Path(server.log).parent.mkdir(parents=True, exist_ok=True)
    Path(server.state_dir).mkdir(parents=True, exist_ok=True)
    with open(server.log, "ab") as log_file:
        offset = log_file.tell()
        proc = subprocess.Popen(
            [sys.executable, "-m", "labctl", "serve", server.site_file, "--state-dir", server.state_dir],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=str(Path(server.site_file).parent),
        )  # fmt: skip
    server.pid = proc.pid
    return proc, offset


def _wait_ready(server: ServerPlan, proc: subprocess.Popen[bytes], offset: int) -> None:
    """Until the server logs (after ``offset``) that it is ready; raise with its log's tail if it exits or takes too long."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    log_path = Path(server.log)
    while True:
        with open(log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", errors="replace")
        if re.search(r"\bready;", text):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            why = f"exited with status {proc.returncode}" if proc.returncode is not None else f"not ready after {READY_TIMEOUT_S:g} s"
            tail = "\n".join(text.splitlines()[-15:])
            raise SiteUpError(f"server {server.name!r} {why}; the end of its log {server.log}:\n{tail}")
        time.sleep(0.1)


def _stop_process(pid: int, name: str) -> bool:
    """SIGTERM, and SIGKILL if it has not ended within :data:`STOP_TIMEOUT_S`; False if it was not running."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _pid_runs(pid):
            return True
        time.sleep(0.05)
    print(f"server {name!r} (pid {pid}) did not stop within {STOP_TIMEOUT_S:g} s; killed", file=sys.stderr)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return True


def _pid_runs(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return status.read_text().split(") ", 1)[1][:1] != "Z"  # a zombie has ended
    return True


def site_down(directory: Path, *, purge: bool = False) -> list[str]:
    """Stop the servers, then the cluster; with ``purge`` remove their data too. Lines saying what was done."""
    directory = directory.resolve()
    state = SiteState.read(directory)
    if state is None:
        raise SiteUpError(f"no demo site was started in {directory} (labctl site up --dir {directory})")
    said = []
    for server in state.servers:
        if _alive(server):
            assert server.pid is not None
            _stop_process(server.pid, server.name)
            said.append(f"stopped server {server.name!r} (pid {server.pid})")
        else:
            said.append(f"server {server.name!r} was not running")
    cluster = Cluster(state.cluster)
    if cluster.running:
        cluster.stop()
        said.append(f"stopped PostgreSQL on port {state.cluster.port}")
    if purge:
        datadir = Path(state.cluster.datadir)
        if not datadir.is_relative_to(directory):
            shutil.rmtree(datadir.parent, ignore_errors=True)
        shutil.rmtree(directory, ignore_errors=True)
        said.append(f"removed {directory}")
    return said


def site_status(directory: Path) -> tuple[SiteState, list[str]]:
    """What runs: one line per process, then the site directory as the database has it."""
    directory = directory.resolve()
    state = SiteState.read(directory)
    if state is None:
        raise SiteUpError(f"no demo site was started in {directory} (labctl site up --dir {directory})")
    cluster = Cluster(state.cluster)
    db_up = cluster.running
    lines = [f"PostgreSQL {'running' if db_up else 'stopped'}: {state.cluster.url}"]
    for s in state.servers:
        lines.append(f"server {s.name:<7} {'running' if _alive(s) else 'stopped'} (pid {s.pid}): {s.opcua_url}, "
                     f"CA 127.0.0.1:{s.ca_port}, log {s.log}")  # fmt: skip
    if db_up:
        from labctl.server.historian import directory as sql
        from labctl.server.sitedir import format_servers, has_site_schema, open_site_database, run_on_database

        backend = open_site_database(state.cluster.url, "site status")
        servers = run_on_database(backend, lambda conn: sql.read_servers(conn) if has_site_schema(conn) else [], write=False)
        if servers:
            lines += ["", format_servers(servers)]
    return state, lines


# ---- the command -----------------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``labctl site up|down|status`` to the ``labctl`` command."""
    p = subparsers.add_parser(
        "site",
        help="a demo site on this machine: three servers and PostgreSQL/TimescaleDB (up, down, status)",
        description="Start, stop or inspect the demo site: the bundled demo split into three servers (cryo, bench, "
        "magnet) sharing one PostgreSQL/TimescaleDB database, all on this machine.",
    )
    sub = p.add_subparsers(dest="site_command", required=True, metavar="ACTION")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        a = sub.add_parser(name, help=help, description=help)
        a.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"the site's state directory (default: ./{DEFAULT_DIR})")
        return a

    up = action("up", "start the database and the three servers in the background; print their endpoints")
    up.add_argument("--db-port", type=int, default=DEFAULT_DB_PORT, help=f"PostgreSQL's port on 127.0.0.1 (default {DEFAULT_DB_PORT})")
    up.add_argument("--opcua-port", type=int, default=DEFAULT_OPCUA_PORT,
                    help=f"the first server's OPC UA port; the others' follow (default {DEFAULT_OPCUA_PORT})")  # fmt: skip
    up.add_argument("--ca-port", type=int, default=DEFAULT_CA_PORT,
                    help=f"the first server's Channel Access port; the others' follow every {CA_PORT_STEP} (default {DEFAULT_CA_PORT})")  # fmt: skip
    up.add_argument("--free-ports", action="store_true", help="take free ports instead (a second site beside the first)")
    up.set_defaults(func=cmd_site_up)
    down = action("down", "stop the three servers, then the database (their data is kept)")
    down.add_argument("--purge", action="store_true", help="also remove the state directory: the archive, accounts, logs")
    down.set_defaults(func=cmd_site_down)
    status = action("status", "which of the site's processes run, and the site directory")
    status.set_defaults(func=cmd_site_status)


def cmd_site_up(args: argparse.Namespace) -> int:
    """``labctl site up``."""
    state = site_up(args.dir, db_port=args.db_port, opcua_port=args.opcua_port, ca_port=args.ca_port, free_ports=args.free_ports)
    db = "PostgreSQL + TimescaleDB" if state.cluster.timescaledb else "PostgreSQL (TimescaleDB is not installed)"
    directory = args.dir.resolve()
    print(f"demo site {state.site!r} is up in {directory}")
    print(f"  database  {db}: {state.cluster.url}")
    for s in state.servers:
        print(f"  {s.name:<8}  {s.opcua_url}  Channel Access 127.0.0.1:{s.ca_port}  (site file {s.site_file}, log {s.log})")
    addr_list = " ".join(f"127.0.0.1:{s.ca_port}" for s in state.servers)
    print("accounts (in the site's database; labctl user): viewer, operator, expert, admin -- password <user>-demo")
    print(f"the whole site:     labctl servers --historian-url {state.cluster.url}")
    print(f"a PV:               labctl get CRYO:MXC:TEMP --url {state.servers[0].opcua_url}")
    print(f"Channel Access:     EPICS_CA_AUTO_ADDR_LIST=NO EPICS_CA_ADDR_LIST='{addr_list}' caget CRYO:MXC:TEMP MAG:TEMP:A")
    print(f"status / stop:      labctl site status --dir {directory}  /  labctl site down --dir {directory}")
    return 0


def cmd_site_down(args: argparse.Namespace) -> int:
    """``labctl site down``."""
    for line in site_down(args.dir, purge=args.purge):
        print(line)
    return 0


def cmd_site_status(args: argparse.Namespace) -> int:
    """``labctl site status``: exit 0 when every process runs, 3 otherwise."""
    state, lines = site_status(args.dir)
    for line in lines:
        print(line)
    return 0 if all(_alive(s) for s in state.servers) and Cluster(state.cluster).running else 3
