"""Build a :class:`~labctl.ioc.database.Database` from a validated site file (no drivers yet).

The server layer attaches drivers afterwards (``ioc`` knows no driver module); this
module only turns configuration into runtime objects: PV descriptions, calibration
tables, the role policy. A large site is a million long-lived objects: the server builds
it with the cyclic garbage collector paused (:func:`labctl.server.tuning.gc_paused`),
process tuning being the server's business, not the core's.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

from labctl.ioc.alarms import summary_pv_infos
from labctl.ioc.arbiter import lock_pv_infos
from labctl.ioc.config.site import CoreSiteConfig
from labctl.ioc.database import Database
from labctl.ioc.errors import ConfigError, LabctlError
from labctl.ioc.expr import ExpressionError, Table
from labctl.ioc.interlocks import state_pv_info
from labctl.ioc.policy import Policy
from labctl.ioc.pv import PVInfo


def pv_infos(site: CoreSiteConfig) -> list[PVInfo]:
    """Every PV of the site as runtime descriptions, in file order, then the server's own.

    The server's own PVs are the alarm summary and one state PV per interlock.
    """
    infos = [PVInfo.from_config(pv, inst, site.resource_of(inst, pv)) for inst in site.instruments for pv in inst.pvs]
    for entry in site.pvs:  # a numbered entry: one description per number, no per-PV config copy
        resource = site.resource_of(None, entry)
        infos += [PVInfo.from_config(entry, None, resource, fields) for fields in entry.instances()]
    infos += summary_pv_infos()
    infos += [state_pv_info(ilk) for ilk in site.interlocks]
    infos += [info for res in site.resources if res.lockable for info in lock_pv_infos(res)]
    return infos


def load_tables(site: CoreSiteConfig, base_dir: Path, source: str = "site file") -> dict[str, Table]:
    """Calibration tables, reading CSV files relative to ``base_dir``."""
    tables: dict[str, Table] = {}
    problems: list[str] = []
    for name, cfg in site.tables.items():
        try:
            points = cfg.points or _read_csv(base_dir / cfg.file, name) if cfg.file else cfg.points
            tables[name] = Table.from_points(name, points)
        except (ExpressionError, OSError, ValueError) as e:
            problems.append(f"{source} tables.{name}: {e}")
    if problems:
        raise ConfigError(source, problems)
    return tables


def _read_csv(path: Path, name: str) -> list[tuple[float, float]]:
    points = []
    with path.open(newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or row[0].lstrip().startswith("#"):
                continue
            try:
                points.append((float(row[0]), float(row[1])))
            except (ValueError, IndexError):
                if lineno == 1:
                    continue  # a header line
                raise ValueError(f"{path}:{lineno}: expected two numbers x,y, got {row}") from None
    return points


def build_database(
    site: CoreSiteConfig, base_dir: Path | str = ".", *, clock: Callable[[], float] | None = None, source: str = "site file"
) -> Database:
    """A database with every PV of ``site``; drivers are attached by the caller."""
    tables = load_tables(site, Path(base_dir), source)
    kwargs = {"clock": clock} if clock is not None else {}
    try:
        return Database(pv_infos(site), policy=Policy(site.all_roles), tables=tables, **kwargs)
    except ExpressionError as e:
        raise ConfigError(source, [f"{source}: derived PV expression: {e}"]) from None
    except LabctlError as e:
        raise ConfigError(source, [f"{source}: {e}"]) from None
