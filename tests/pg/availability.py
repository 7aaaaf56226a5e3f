"""Is PostgreSQL (and TimescaleDB) here? If not, a test skips locally and fails in CI.

:func:`postgres_available` and :func:`timescaledb_available` look for the server's
binaries and the extension's files (without starting anything) and say what to run when
they are missing. :func:`require_postgres` and :func:`require_timescaledb` turn an absence
into :func:`skip_or_fail`: a skip with that command in a local run, a FAILED test under
``CI=true`` (:func:`in_ci`), where a missing test dependency is an error.

Environment: ``LABCTL_PG_BINDIR`` (default ``/usr/lib/postgresql/15/bin``), ``CI``
(``true``: a missing PostgreSQL or TimescaleDB fails the test, never skips it).
"""

from __future__ import annotations

import os
import re
import subprocess
from functools import cache
from pathlib import Path

try:  # the helper also works outside pytest (benchmarks, a shell)
    import pytest
except ImportError:  # pragma: no cover
    pytest = None  # type: ignore[assignment]

PG_MAJOR = 15
DEFAULT_BINDIR = f"/usr/lib/postgresql/{PG_MAJOR}/bin"
INSTALL_TIMESCALEDB = "sudo bash scripts/install-timescaledb.sh"  # or: bash scripts/install-test-deps.sh (root)


class PgClusterError(RuntimeError):
    """The throwaway cluster could not be created, started or stopped (message says why)."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def pg_bindir() -> Path:
    return Path(os.environ.get("LABCTL_PG_BINDIR", DEFAULT_BINDIR))


def postgres_available(bindir: Path | None = None) -> tuple[bool, str]:
    """(True, "") when PostgreSQL's server binaries are there, else (False, what to run)."""
    bindir = Path(bindir or pg_bindir())
    missing = [n for n in ("postgres", "initdb", "pg_config") if not (bindir / n).is_file()]
    if missing:
        return False, (
            f"PostgreSQL {PG_MAJOR} server binaries not found in {bindir} (missing {', '.join(missing)}); "
            f"run: sudo apt-get install postgresql-{PG_MAJOR} (or set LABCTL_PG_BINDIR)"
        )
    return True, ""


@cache
def _pg_config(bindir: str) -> dict[str, str]:
    out = subprocess.run(
        [str(Path(bindir) / "pg_config"), "--sharedir", "--pkglibdir", "--version"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    return {"sharedir": out[0], "pkglibdir": out[1], "version": out[2]}


def timescaledb_available(bindir: Path | None = None) -> tuple[bool, str]:
    """(True, version) when TimescaleDB is installed for this PostgreSQL, else (False, what to run)."""
    bindir = Path(bindir or pg_bindir())
    ok, why = postgres_available(bindir)
    if not ok:
        return False, why
    cfg = _pg_config(str(bindir))
    control = Path(cfg["sharedir"]) / "extension" / "timescaledb.control"
    library = Path(cfg["pkglibdir"]) / "timescaledb.so"
    if not (control.is_file() and library.is_file()):
        return False, (
            f"TimescaleDB is not installed for {cfg['version']} (no {control if not control.is_file() else library}); "
            f"run: {INSTALL_TIMESCALEDB}  (or, as root: bash scripts/install-test-deps.sh)"
        )
    m = re.search(r"default_version\s*=\s*'([^']+)'", control.read_text())
    return True, m.group(1) if m else "unknown"


def skip_or_fail(message: str) -> None:
    """Skip the current test with ``message`` -- or fail it when running under ``CI=true``."""
    if pytest is None:  # pragma: no cover
        raise PgClusterError(message)
    if in_ci():
        pytest.fail(f"{message} [CI=true: a missing test dependency is an error, not a skip]", pytrace=False)
    pytest.skip(message)


def require_postgres() -> None:
    ok, why = postgres_available()
    if not ok:
        skip_or_fail(why)


def require_timescaledb() -> None:
    ok, why = timescaledb_available()
    if not ok:
        skip_or_fail(why)
