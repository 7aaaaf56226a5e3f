"""Benchmark sites: N soft PVs, optionally a simulated instrument, as site-file data and text.

A benchmark site is built as the plain data a site file holds (:func:`site_data`).
:func:`site_yaml` renders it as site-file text and :func:`write_site` as a file, which
the server under test reads as ``labctl serve`` does (:func:`labctl.server.site.load_site`), so
start-up figures include reading the site file. The N PVs are written as one numbered
entry (``name: "BENCH:{n:05d}"``, ``range: {n: [0, N-1]}``), as large sites are written;
``numbered=False`` lists them one by one instead (:mod:`bench.sitefile` times both forms).
Data validated in memory (:meth:`labctl.server.site.SiteConfig.model_validate`) serves the
benchmarks that measure something else (:mod:`bench.history`).

PVs are ``BENCH:00000`` ... : float64 soft PVs with no deadband, so every posted value
is a change that reaches the monitors and the archive. The write round trip uses the
Lake Shore 336 driver on its pyvisa-sim definition (``MAG:SETP``, a setpoint written to
the instrument and read back from it); Channel Access clients are granted the operator
role by the access rules, OPC UA clients log in as ``operator``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from bench.wire import pv_names

PREFIX = "BENCH:"
SETPOINT_PV = "MAG:SETP"
OPERATOR = "operator"
OPERATOR_PASSWORD = "bench-operator"  # a throwaway server's password, never stored in a file
#: The start-up phase in which labctl's benchmark server writes its site file: the
#: benchmark's own preparation, not labctl's start-up (:mod:`bench.scale` leaves it out).
SITE_WRITE_PHASE = "write site file (bench)"


def site_data(
    count: int,
    *,
    state_dir: str,
    ca_port: int = 0,
    beacon_port: int | None = None,
    historian_url: str | None = "sqlite:///{state_dir}/history.sqlite",
    opcua: bool = True,
    ca: bool = True,
    instrument: bool = False,
    password_hash: str | None = None,
    extra_count: int = 0,
    numbered: bool = False,
    prefix: str = PREFIX,
    server_name: str | None = None,
) -> dict[str, Any]:
    """The site file's data for ``count`` fan-out PVs (plus ``extra_count`` archive-only PVs).

    ``numbered``: each family of PVs as one ``range`` entry rather than one entry per PV.
    ``prefix`` names the fan-out PVs and ``server_name`` is ``server.name``: the servers of
    one site each serve their own names (:mod:`bench.sitebench`).
    """
    pvs = _pvs(prefix, count, numbered) + _pvs("ARCH:", extra_count, numbered)
    ca_cfg: dict[str, Any] = {
        "enabled": ca,
        "interfaces": ["127.0.0.1"],
        "port": ca_port,
        "access": {"rules": [{"users": ["*"], "hosts": ["*"], "roles": ["operator"]}]},
    }
    if beacon_port is not None:
        ca_cfg["beacon_port"] = beacon_port
    server: dict[str, Any] = {} if server_name is None else {"name": server_name}
    # A password travels encrypted with the server certificate, which asyncua offers only
    # when a policy other than None is on the endpoint list (labctl refuses plain text).
    security = ["None", "Basic256Sha256_SignAndEncrypt"] if password_hash is not None else ["None"]
    data: dict[str, Any] = {
        "site": "bench",
        "server": {
            **server,
            "state_dir": state_dir,
            "opcua": {"enabled": opcua, "host": "127.0.0.1", "port": 0, "security": security, "anonymous": True, "trust": "auto"},
            "ca": ca_cfg,
        },
        "historian": {"enabled": False} if historian_url is None else {"url": historian_url},
        "pvs": pvs,
    }
    if password_hash is not None:
        data["users"] = [{"name": OPERATOR, "roles": ["operator"], "password_hash": password_hash}]
    if instrument:
        data["instruments"] = [
            {
                "name": "magtc",
                "driver": "lakeshore336",
                "resource": "GPIB0::12::INSTR",
                "visa_library": "@sim",
                "scan_s": 2.0,
                "pvs": [
                    {
                        "name": SETPOINT_PV,
                        "type": "float64",
                        "unit": "K",
                        "precision": 3,
                        "channel": "setpoint:1",
                        "writable": True,
                        "drive": [0, 10],
                    },
                    {"name": "MAG:TEMP:A", "type": "float64", "unit": "K", "precision": 3, "channel": "temperature:A"},
                ],
            }
        ]
    return data


def _pvs(prefix: str, count: int, numbered: bool) -> list[dict[str, Any]]:
    """``count`` float64 soft PVs named ``<prefix>00000``... (:func:`bench.wire.pv_names`)."""
    if count == 0:
        return []
    fields = {"type": "float64", "precision": 3, "initial": 0.0}
    if numbered:
        assert count <= 100_000, "pv_names numbers with five digits"
        return [{"name": prefix + "{n:05d}", "range": {"n": [0, count - 1]}, **fields}]
    return [{"name": n, **fields} for n in pv_names(prefix, count)]


def write_site(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as the site file ``path`` (:func:`site_yaml`); return the path."""
    path.write_text(site_yaml(data), encoding="utf-8")
    return path


def site_yaml(data: dict[str, Any]) -> str:
    """The site-file text of ``data`` (one flow mapping per PV, as people write them)."""
    head = {k: v for k, v in data.items() if k != "pvs"}
    lines = [yaml.safe_dump(head, sort_keys=False, width=1000).rstrip(), "pvs:"]
    for pv in data["pvs"]:
        lines.append("  - " + yaml.safe_dump(pv, default_flow_style=True, width=1000).strip())
    return "\n".join(lines) + "\n"
