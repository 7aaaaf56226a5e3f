"""Throwaway PostgreSQL 15 clusters for tests (with TimescaleDB preloaded when installed).

A cluster lives in a temporary directory: ``initdb`` there, a server listening on a free TCP
port on 127.0.0.1 only (unix socket in the same directory, trust authentication, fsync
off), a database created on first start, and everything removed by :meth:`PgCluster.cleanup`.
:meth:`PgCluster.stop` / :meth:`PgCluster.start` stop and restart the *same* cluster on the
same port with its data kept, so a test can take the database away and bring it back.

As root, the server runs as the ``postgres`` system user (created by Debian's PostgreSQL
packages; ``LABCTL_PG_OS_USER`` picks another), as any other user it runs as that user.

``netns`` (as root) runs the server inside that network namespace (``ip netns exec``,
then ``setpriv`` to its account), listening on ``host``:``port`` there -- an address of
the namespace that this process reaches over the namespace's network
(:mod:`tests.site.netns`).

In pytest, use the fixtures of :mod:`tests.pg.fixtures`. Without pytest: ``with
PgCluster() as c: ...``, or ``python -m tests.pg.cluster`` (starts one and prints its URL
until Ctrl-C).

Environment: ``LABCTL_PG_BINDIR`` (see :mod:`tests.pg.availability`),
``LABCTL_PG_OS_USER`` (as root; default ``postgres``), ``LABCTL_PG_TMPDIR`` (parent of the
temporary directories; default /dev/shm when it has 2 GiB free, else $TMPDIR or /tmp).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.pg.availability import PG_MAJOR, PgClusterError, pg_bindir, postgres_available, timescaledb_available

SUPERUSER = "postgres"
DEFAULT_DBNAME = "labctl_test"

_SHUTDOWN_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _default_tmpdir() -> str:
    """LABCTL_PG_TMPDIR, else /dev/shm when it is a roomy RAM disk (initdb there takes 0.35 s
    instead of 1.4 s on this project's VMs' ext4 /tmp), else the usual temporary directory."""
    if os.environ.get("LABCTL_PG_TMPDIR"):
        return os.environ["LABCTL_PG_TMPDIR"]
    with contextlib.suppress(OSError):
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize >= 2 << 30 and os.access("/dev/shm", os.W_OK | os.X_OK):
            return "/dev/shm"
    return tempfile.gettempdir()


def _os_user() -> pwd.struct_passwd | None:
    """The account the server runs as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("LABCTL_PG_OS_USER", "postgres")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise PgClusterError(
            f"running as root, and PostgreSQL refuses to run as root, but there is no user {name!r} to run it as; "
            f"install postgresql-{PG_MAJOR} (creates 'postgres') or set LABCTL_PG_OS_USER to an unprivileged user"
        ) from None


def _traversable(path: Path, user: pwd.struct_passwd) -> bool:
    """Can ``user`` reach ``path`` (x permission on it and every ancestor)? Used as root."""
    for p in [path, *path.parents]:
        st = p.stat()
        if st.st_uid == user.pw_uid:
            bit = 0o100
        elif st.st_gid == user.pw_gid:
            bit = 0o010
        else:
            bit = 0o001
        if not st.st_mode & bit:
            return False
    return True


def _quote_conf(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_live: set[PgCluster] = set()  # started and not yet cleaned up


@atexit.register
def _cleanup_leftovers() -> None:  # safety net: a cluster whose owner forgot cleanup()
    for cluster in list(_live):
        with contextlib.suppress(Exception):
            cluster.cleanup(mode="immediate")


@dataclass(frozen=True)
class PgDatabase:
    """One database on a throwaway cluster."""

    cluster: PgCluster
    name: str

    @property
    def url(self) -> str:
        """SQLAlchemy URL: ``postgresql+psycopg://postgres@127.0.0.1:<port>/<name>``."""
        return self.cluster.url_for(self.name)

    @property
    def conninfo(self) -> str:
        """libpq connection string for ``psycopg.connect``."""
        return self.cluster.conninfo(self.name)

    def __str__(self) -> str:
        return self.url


class PgCluster:
    """A throwaway PostgreSQL cluster in a temporary directory (see the module docstring).

    ``timescaledb``: None preloads TimescaleDB when it is installed, True requires it,
    False never loads it. ``settings`` are extra ``postgresql.conf`` parameters.
    """

    def __init__(
        self,
        *,
        dbname: str = DEFAULT_DBNAME,
        timescaledb: bool | None = None,
        settings: dict[str, object] | None = None,
        bindir: str | os.PathLike[str] | None = None,
        tmpdir: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        netns: str | None = None,
    ) -> None:
        self.bindir = Path(bindir or pg_bindir())
        ok, why = postgres_available(self.bindir)
        if not ok:
            raise PgClusterError(why)
        tsdb_ok, tsdb_info = timescaledb_available(self.bindir)
        if timescaledb and not tsdb_ok:
            raise PgClusterError(tsdb_info)
        self.timescaledb: bool = tsdb_ok if timescaledb is None else bool(timescaledb)
        self.timescaledb_version: str | None = tsdb_info if self.timescaledb else None
        self.dbname = dbname
        self.host = host
        self.port = port
        self.netns = netns
        self.settings = dict(settings or {})
        self._tmpdir = tmpdir or _default_tmpdir()
        self._user = _os_user()
        self._proc: subprocess.Popen[bytes] | None = None
        self.base: Path | None = None
        self.startup_seconds: float | None = None  # of the last start(), initdb included

    # -- paths and addresses
    @property
    def datadir(self) -> Path:
        return self._require_base() / "data"

    @property
    def logfile(self) -> Path:
        return self._require_base() / "postgres.log"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the cluster's database: ``postgresql+psycopg://postgres@127.0.0.1:<port>/labctl_test``."""
        return self.url_for(self.dbname)

    def url_for(self, dbname: str, driver: str = "psycopg") -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{SUPERUSER}@{self.host}:{self.port}/{dbname}"

    def conninfo(self, dbname: str | None = None) -> str:
        """libpq connection string (for ``psycopg.connect``)."""
        return f"host={self.host} port={self.port} user={SUPERUSER} dbname={dbname or self.dbname}"

    def database(self, dbname: str | None = None) -> PgDatabase:
        return PgDatabase(self, dbname or self.dbname)

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<PgCluster {self.url_for(self.dbname)} {state} dir={self.base}>"

    # -- lifecycle
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 60.0) -> PgCluster:
        """Start the server (running initdb and creating the database the first time) and
        return once it accepts connections. Idempotent."""
        if self.is_running():
            return self
        t0 = time.monotonic()
        _live.add(self)
        first = self.base is None
        if first:
            self._initdb()
        attempts = 5 if first and self.netns is None else 1  # a first start may lose its port to a race: pick another
        for attempt in range(attempts):
            try:
                self._launch_and_wait(timeout)
                break
            except _PortInUse:
                if attempt == attempts - 1:
                    raise PgClusterError(f"port {self.port} on {self.host} is in use; cannot start {self!r}") from None
                self.port = _free_port(self.host)
        if first:
            self.create_database(self.dbname)
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self, mode: str = "fast", timeout: float = 60.0) -> None:
        """Shut the server down (``fast``: abort sessions, checkpoint; ``immediate``: like a
        crash, recovery on next start; ``smart``: wait for sessions). Data is kept."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(_SHUTDOWN_SIGNALS[mode])
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGQUIT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise PgClusterError(f"postgres did not stop within {timeout} s ({mode}); killed it") from None

    def restart(self, mode: str = "fast", timeout: float = 60.0) -> PgCluster:
        self.stop(mode, timeout)
        return self.start(timeout)

    def cleanup(self, mode: str = "fast") -> None:
        """Stop the server and delete the cluster's directory."""
        try:
            self.stop(mode)
        finally:
            if self.base is not None:
                shutil.rmtree(self.base, ignore_errors=True)
                self.base = None
            _live.discard(self)

    def __enter__(self) -> PgCluster:
        try:
            return self.start()
        except BaseException:
            self.cleanup(mode="immediate")
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- SQL helpers (psycopg, imported lazily)
    def connect(self, dbname: str | None = None, *, autocommit: bool = True, **kwargs):
        import psycopg

        return psycopg.connect(self.conninfo(dbname), autocommit=autocommit, **kwargs)

    def create_database(self, name: str, *, timescaledb: bool = False) -> PgDatabase:
        """CREATE DATABASE (and, if asked, the timescaledb extension in it)."""
        if timescaledb and not self.timescaledb:
            raise PgClusterError(f"cluster started without TimescaleDB; cannot create the extension in {name!r}")
        with self.connect("postgres") as conn:
            conn.execute(f"CREATE DATABASE {_quote_ident(name)}")
        if timescaledb:
            with self.connect(name) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        return PgDatabase(self, name)

    def drop_database(self, name: str) -> None:
        with self.connect("postgres") as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, PgClusterError):
            return "(no log)"

    # -- internals
    def _require_base(self) -> Path:
        if self.base is None:
            raise PgClusterError("cluster not initialised (call start())")
        return self.base

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env["TZ"] = "UTC"
        if self._user is not None:
            env.update(HOME=str(self.base), USER=self._user.pw_name, LOGNAME=self._user.pw_name)
        return env

    def _as_user(self) -> dict[str, object]:
        """Popen arguments dropping root to the server's account."""
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def _initdb(self) -> None:
        parent = Path(self._tmpdir)
        if self._user is not None and not _traversable(parent.resolve(), self._user):
            parent = Path("/tmp")  # e.g. TMPDIR under /root: the server's account cannot reach it
        base = Path(tempfile.mkdtemp(prefix="labctl-pg-", dir=parent))
        if len(str(base)) > 80:  # unix socket paths are limited to 107 bytes
            shutil.rmtree(base)
            base = Path(tempfile.mkdtemp(prefix="labctl-pg-", dir="/tmp"))
        self.base = base
        if self._user is not None:
            os.chown(base, self._user.pw_uid, self._user.pw_gid)
        cmd = [
            str(self.bindir / "initdb"),
            "-D",
            str(self.datadir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
            "--no-instructions",
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, env=self._env(), cwd=base, **self._as_user())
        if res.returncode != 0:
            raise PgClusterError(f"initdb failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout}{res.stderr}")
        conf = {
            "listen_addresses": self.host,
            "unix_socket_directories": str(base),
            # Speed: nothing is ever fsync'ed. synchronous_commit stays on (it costs only a
            # write() now), so a committed transaction survives even stop("immediate").
            "fsync": False,
            "full_page_writes": False,
            "timezone": "UTC",
            "log_timezone": "UTC",
            "log_min_messages": "warning",
            "max_connections": 100,
            "max_locks_per_transaction": 256,  # hypertables: many chunks per transaction
        }
        if self.timescaledb:
            conf["shared_preload_libraries"] = "timescaledb"
        conf.update(self.settings)
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write("\n# --- labctl throwaway test cluster (tests/pg/cluster.py)\n")
            f.writelines(f"{k} = {_quote_conf(v)}\n" for k, v in conf.items())
        if self.host != "127.0.0.1":  # initdb trusts loopback only; a namespace's clients come over its subnet
            with open(self.datadir / "pg_hba.conf", "a") as f:
                f.write("host all all samenet trust\n")
        if not self.port:
            self.port = _free_port(self.host)

    def _launch_and_wait(self, timeout: float) -> None:
        start_offset = self.logfile.stat().st_size if self.logfile.exists() else 0
        cmd = [str(self.bindir / "postgres"), "-D", str(self.datadir), "-p", str(self.port)]
        as_user = self._as_user()
        if self.netns is not None:  # setns needs root: enter the namespace, then drop to the server's account
            drop = [] if self._user is None else ["setpriv", f"--reuid={self._user.pw_uid}", f"--regid={self._user.pw_gid}", "--clear-groups"]
            cmd, as_user = ["ip", "netns", "exec", self.netns, *drop, *cmd], {}
        with open(self.logfile, "ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                cwd=self.base,
                start_new_session=True,
                **as_user,
            )
        deadline = time.monotonic() + timeout
        delay = 0.005
        last_error: Exception | None = None
        while True:
            rc = self._proc.poll()
            if rc is not None:
                self._proc = None
                with open(self.logfile, "rb") as f:
                    f.seek(start_offset)
                    log_text = f.read().decode(errors="replace")
                if "could not bind" in log_text and "Address already in use" in log_text:
                    raise _PortInUse()
                raise PgClusterError(
                    f"postgres exited with status {rc} while starting; log {self.logfile}:\n{log_text[-4000:]}"
                )
            try:
                self._ping()
                return
            except Exception as exc:  # not ready yet: refused, "starting up", ...
                last_error = exc
            if time.monotonic() > deadline:
                self.stop("immediate")
                raise PgClusterError(
                    f"postgres not ready within {timeout} s (last error: {last_error}); log:\n{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _ping(self) -> None:
        try:
            import psycopg
        except ImportError:  # pragma: no cover - fall back to the client tool
            subprocess.run(
                [str(self.bindir / "pg_isready"), "-q", "-h", self.host, "-p", str(self.port), "-t", "1"],
                check=True,
                env=self._env(),
            )
            return
        psycopg.connect(self.conninfo("postgres"), connect_timeout=2).close()


class _PortInUse(Exception):
    pass


if __name__ == "__main__":  # python -m tests.pg.cluster: a cluster to poke at by hand
    with PgCluster() as c:
        print(f"{c!r}\nSQLAlchemy: {c.url}\npsql:       psql '{c.conninfo()}'")
        print(
            f"TimescaleDB: {c.timescaledb_version or 'not loaded'}; started in {c.startup_seconds:.2f} s; Ctrl-C stops"
        )
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
