"""The PV commands of ``labctl``: ``ls``, ``get``, ``put`` and ``monitor``.

Theory of operation. ``ls [PATTERN]`` lists PVs with type, unit, access and description;
``get PV...`` reads PVs with their alarm state, unit and time in one request; ``put PV
VALUE [--lease TOKEN]`` parses VALUE by the PV's type (:func:`~labctl.clients.cli.arguments.parse_value`),
writes it through the server's roles, locks and limits, and shows the PV afterwards
(``--lease``, or ``LABCTL_LEASE``: under a lock another session of the same user holds,
by the token ``labctl lock`` printed);
``monitor PV... [--count N] [--timeout S]`` prints changes until Ctrl-C, waiting as long
as it takes for each (as ``camonitor``; with ``--timeout`` it gives up, exit status 1 and
error kind ``timeout``, when no change came for S seconds). On a site, PVs of every server
can be named together; a PV whose server is down reads ``disconnected`` (INVALID/COMM,
with why; in JSON ``"connected": false``) until its server serves again. Output is a table for people,
or strict JSON with ``--json`` (one document for ``ls``/``get``/``put``, one JSON object
per line for ``monitor``; NaN as ``null``, times ISO 8601 UTC, an enum's ``state`` beside
its ``value``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from labctl.clients.cli.arguments import connection_options, parse_value
from labctl.clients.cli.output import format_time, iso_time, print_json, print_table
from labctl.clients.cli.runner import run
from labctl.clients.session import Session
from labctl.clients.values import Metadata, PVValue, Sample, format_value
from labctl.ioc.types import PVType, Reading


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the PV commands (``common``: the shared connection options)."""
    p = subparsers.add_parser("ls", parents=[common], help="list PVs (optionally matching a glob PATTERN)")
    p.add_argument("pattern", nargs="?", help="glob on PV names, e.g. 'CRYO:*'")
    p.set_defaults(func=cmd_ls)

    p = subparsers.add_parser("get", parents=[common], help="read PVs with their alarm state and units")
    p.add_argument("pvs", nargs="+", metavar="PV")
    p.set_defaults(func=cmd_get)

    p = subparsers.add_parser("put", parents=[common], help="write a PV (through the server's roles, locks and limits)")
    p.add_argument("pv", metavar="PV")
    p.add_argument("value", metavar="VALUE", help="number, true/false, enum state, text, or [1, 2, 3]")
    p.add_argument("--lease", default=os.environ.get("LABCTL_LEASE") or None, metavar="TOKEN",
                   help="write under a lease another session of yours holds (the token `labctl lock` prints; LABCTL_LEASE)")  # fmt: skip
    p.set_defaults(func=cmd_put)

    # its own --timeout: how long to wait for a change (requests take the default 10 s)
    p = subparsers.add_parser(
        "monitor", parents=[connection_options(request_timeout=False)], help="print PV changes as they happen (Ctrl-C stops)"
    )
    p.add_argument("pvs", nargs="+", metavar="PV")
    p.add_argument("--count", type=int, metavar="N", help="stop after N samples")
    p.add_argument("--timeout", dest="wait_s", type=float, metavar="S",
                   help="give up (exit status 1) when no change comes for S seconds (default: wait as long as it takes)")  # fmt: skip
    p.set_defaults(func=cmd_monitor)


# ---- ls ---------------------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    """List PVs with type, unit, access and description."""

    async def body(s: Session) -> int:
        metas = await s.list_pvs(args.pattern)
        if args.json:
            print_json([_meta_json(m) for m in metas])
            return 0
        if not metas:
            print(f"no PVs match {args.pattern!r}" if args.pattern else "the server has no PVs", file=sys.stderr)
            return 0
        rows = [(m.name, m.type.value if m.type else "?", m.unit, "rw" if m.user_writable else "r", m.description) for m in metas]
        print_table(("NAME", "TYPE", "UNIT", "ACCESS", "DESCRIPTION"), rows)
        return 0

    return run(args, body)


def _meta_json(m: Metadata) -> dict[str, Any]:
    return {
        "name": m.name,
        "type": m.type.value if m.type else None,
        "unit": m.unit,
        "description": m.description,
        "display": list(m.display) if m.display else None,
        "states": list(m.states),
        "writable": m.writable,
        "user_writable": m.user_writable,
        "path": m.path,
    }


# ---- get --------------------------------------------------------------------------------


def cmd_get(args: argparse.Namespace) -> int:
    """Read PVs."""

    async def body(s: Session) -> int:
        values = await s.get_many(args.pvs)
        if args.json:
            print_json([_value_json(v.name, v.reading, v.meta) for v in values])
        else:
            print_table(("NAME", "VALUE", "UNIT", "SEVERITY", "STATUS", "TIME"), [_value_row(v) for v in values])
        return 0

    return run(args, body)


def _value_row(v: PVValue) -> tuple[str, ...]:
    r = v.reading
    return (v.name, v.display_value, v.meta.unit, r.severity.name, r.status.name, format_time(r.timestamp))


def _value_json(name: str, r: Reading, meta: Metadata) -> dict[str, Any]:
    value = list(r.value) if isinstance(r.value, tuple) else r.value
    out: dict[str, Any] = {"name": name, "value": value}
    if meta.type is PVType.ENUM and isinstance(r.value, int) and r.value < len(meta.states):
        out["state"] = meta.states[r.value]
    out.update(
        unit=meta.unit,
        severity=r.severity.name,
        status=r.status.name,
        timestamp=iso_time(r.timestamp),
    )
    return out


# ---- put --------------------------------------------------------------------------------


def cmd_put(args: argparse.Namespace) -> int:
    """Write a PV and show it afterwards."""

    async def body(s: Session) -> int:
        meta = await s.info(args.pv)
        await s.put(args.pv, parse_value(meta, args.value), lease=args.lease)
        v = await s.get(args.pv)
        if args.json:
            print_json(_value_json(v.name, v.reading, v.meta))
        else:
            print(f"{v.name} = {v.display_value}{' ' + v.meta.unit if v.meta.unit else ''}")
        return 0

    return run(args, body)


# ---- monitor ----------------------------------------------------------------------------


def cmd_monitor(args: argparse.Namespace) -> int:
    """Print changes until Ctrl-C (or --count samples; or --timeout seconds without one)."""

    async def body(s: Session) -> int:
        width = max(len(n) for n in args.pvs)
        seen = 0
        async with s.monitor(args.pvs) as mon:  # NoSuchPV here, before anything is printed
            metas: dict[str, Metadata] = {}
            while args.count is None or seen < args.count:
                try:
                    sample = await mon.next(args.wait_s)  # RequestTimeout after --timeout S without a change
                except StopAsyncIteration:  # the monitor ended with the session
                    break
                meta = metas.get(sample.name)
                if meta is None and sample.connected:
                    meta = metas[sample.name] = await s.info(sample.name)
                why = getattr(mon, "disconnected", {}).get(sample.name, "")
                _print_sample(sample, meta or Metadata(sample.name, None), width, args.json, why)
                seen += 1
        return 0

    return run(args, body)


def _print_sample(sample: Sample, meta: Metadata, width: int, as_json: bool, why: str = "") -> None:
    r = sample.reading
    if as_json:
        doc = _value_json(sample.name, r, meta)
        if not sample.connected:  # its server (another of the site) is down: no value, not a stale one
            doc.update(connected=False, reason=why)
        print_json(doc, indent=None)
        return
    if not sample.connected:
        print(f"{format_time(r.timestamp)}  {sample.name:<{width}}  disconnected  {r.severity.name} {r.status.name}"
              f"{'  (' + why + ')' if why else ''}", flush=True)  # fmt: skip
        return
    alarm = "" if r.severity.name == "NO_ALARM" else f"  {r.severity.name} {r.status.name}"
    unit = f" {meta.unit}" if meta.unit else ""
    print(f"{format_time(r.timestamp)}  {sample.name:<{width}}  {format_value(meta, r.value)}{unit}{alarm}", flush=True)
