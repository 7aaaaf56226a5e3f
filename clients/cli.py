"""The client commands of ``labctl``: ``ls``, ``get``, ``put`` and ``monitor``.

Theory of operation. Each command connects with :func:`clients.session.connect`, does
one thing and exits: 0 on success, 1 with one line ``labctl <command>: <reason>`` on
standard error when the server refuses or cannot be reached, 2 for bad arguments. Output
is a table for people, or JSON with ``--json`` (one document for ``ls``/``get``/``put``,
one JSON object per line for ``monitor``).

Connection options are shared: ``--url`` (``LABCTL_URL``, default
``opc.tcp://localhost:4840``), ``--user`` (``LABCTL_USER``; anonymous when absent),
``--security`` (``LABCTL_SECURITY``, default ``auto``). The password is never an
argument, where it would land in the shell history: it comes from ``LABCTL_PASSWORD``
or, on a terminal, a prompt.

``put`` parses VALUE by the PV's type: numbers, ``true``/``false``/``1``/``0`` for
booleans, a state name or index for enums, text for strings, and ``[1, 2, 3]`` or
``1,2,3`` for arrays.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import getpass
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from clients.session import ClientError, Metadata, PVValue, Sample, Session, connect, format_value
from ioc.types import PVType, Reading

DEFAULT_URL = "opc.tcp://localhost:4840"


class UsageError(ClientError):
    """The command line itself is wrong (exit status 2)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the client commands to the ``labctl`` command."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("connection")
    g.add_argument("--url", default=os.environ.get("LABCTL_URL", DEFAULT_URL), help=f"server endpoint (LABCTL_URL; default {DEFAULT_URL})")
    g.add_argument("--user", default=os.environ.get("LABCTL_USER"), help="user name (LABCTL_USER); the password comes from LABCTL_PASSWORD or a prompt")
    g.add_argument(
        "--security",
        default=os.environ.get("LABCTL_SECURITY", "auto"),
        choices=["auto", "None", "Sign", "SignAndEncrypt"],
        help="channel security, Basic256Sha256 (LABCTL_SECURITY; default auto: the most secure offered)",
    )
    g.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds each request may take (default 10)")
    g.add_argument("--json", action="store_true", help="machine-readable output")

    p = subparsers.add_parser("ls", parents=[common], help="list PVs (optionally matching a glob PATTERN)")
    p.add_argument("pattern", nargs="?", help="glob on PV names, e.g. 'CRYO:*'")
    p.set_defaults(func=cmd_ls)

    p = subparsers.add_parser("get", parents=[common], help="read PVs with their alarm state and units")
    p.add_argument("pvs", nargs="+", metavar="PV")
    p.set_defaults(func=cmd_get)

    p = subparsers.add_parser("put", parents=[common], help="write a PV (through the server's roles, locks and limits)")
    p.add_argument("pv", metavar="PV")
    p.add_argument("value", metavar="VALUE", help="number, true/false, enum state, text, or [1, 2, 3]")
    p.set_defaults(func=cmd_put)

    p = subparsers.add_parser("monitor", parents=[common], help="print PV changes as they happen (Ctrl-C stops)")
    p.add_argument("pvs", nargs="+", metavar="PV")
    p.add_argument("--count", type=int, metavar="N", help="stop after N samples")
    p.set_defaults(func=cmd_monitor)


def _run(args: argparse.Namespace, body: Any) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)  # its errors become our one-line reasons
    try:
        return asyncio.run(_with_session(args, body))
    except UsageError as e:
        print(f"labctl {args.command}: {e}", file=sys.stderr)
        return 2
    except ClientError as e:
        print(f"labctl {args.command}: {e}", file=sys.stderr)
        return 1


async def _with_session(args: argparse.Namespace, body: Any) -> int:
    password = _password(args.user)
    session = await connect(args.url, args.user, password, args.security, timeout_s=args.timeout)
    try:
        return await body(session)
    finally:
        await session.close()


def _password(user: str | None) -> str | None:
    if not user:
        return None
    password = os.environ.get("LABCTL_PASSWORD")
    if password is not None:
        return password
    if not sys.stdin.isatty():
        raise UsageError(f"no password for user {user!r}: set LABCTL_PASSWORD or run on a terminal to be prompted")
    return getpass.getpass(f"password for {user}: ")


# ---- ls ---------------------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    """List PVs with type, unit, access and description."""

    async def body(s: Session) -> int:
        metas = await s.list_pvs(args.pattern)
        if args.json:
            print(json.dumps([_meta_json(m) for m in metas], indent=2))
            return 0
        if not metas:
            print(f"no PVs match {args.pattern!r}" if args.pattern else "the server has no PVs", file=sys.stderr)
            return 0
        rows = [(m.name, m.type.value if m.type else "?", m.unit, "rw" if m.user_writable else "r", m.description) for m in metas]
        _table(("NAME", "TYPE", "UNIT", "ACCESS", "DESCRIPTION"), rows)
        return 0

    return _run(args, body)


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
            print(json.dumps([_value_json(v.name, v.reading, v.meta) for v in values], indent=2))
        else:
            _table(("NAME", "VALUE", "UNIT", "SEVERITY", "STATUS", "TIME"), [_value_row(v) for v in values])
        return 0

    return _run(args, body)


def _value_row(v: PVValue) -> tuple[str, ...]:
    r = v.reading
    return (v.name, v.display_value, v.meta.unit, r.severity.name, r.status.name, _time(r.timestamp))


def _value_json(name: str, r: Reading, meta: Metadata) -> dict[str, Any]:
    value = list(r.value) if isinstance(r.value, tuple) else r.value
    out: dict[str, Any] = {"name": name, "value": value}
    if meta.type is PVType.ENUM and isinstance(r.value, int) and r.value < len(meta.states):
        out["state"] = meta.states[r.value]
    out.update(
        unit=meta.unit,
        severity=r.severity.name,
        status=r.status.name,
        timestamp=_dt.datetime.fromtimestamp(r.timestamp, _dt.UTC).isoformat(),
    )
    return out


def _time(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


# ---- put --------------------------------------------------------------------------------


def cmd_put(args: argparse.Namespace) -> int:
    """Write a PV and show it afterwards."""

    async def body(s: Session) -> int:
        meta = await s.info(args.pv)
        await s.put(args.pv, parse_value(meta, args.value))
        v = await s.get(args.pv)
        if args.json:
            print(json.dumps(_value_json(v.name, v.reading, v.meta), indent=2))
        else:
            print(f"{v.name} = {v.display_value}{' ' + v.meta.unit if v.meta.unit else ''}")
        return 0

    return _run(args, body)


def parse_value(meta: Metadata, text: str) -> Any:
    """A command-line VALUE in the PV's type (raises UsageError naming what was expected)."""
    t = meta.type
    try:
        if t is PVType.FLOAT64:
            return float(text)
        if t is PVType.INT:
            return int(text, 0)
        if t is PVType.BOOL:
            low = text.strip().lower()
            if low in ("true", "1", "on", "yes"):
                return True
            if low in ("false", "0", "off", "no"):
                return False
            raise ValueError
        if t is PVType.ENUM:
            if text in meta.states:
                return text
            return int(text)
        if t is PVType.FLOAT64_ARRAY:
            body = text.strip()
            if body.startswith("["):
                items = json.loads(body)
                if not isinstance(items, list):
                    raise ValueError
                return [float(x) for x in items]
            return [float(x) for x in body.split(",") if x.strip()] if body else []
    except (ValueError, TypeError):
        expected = {
            PVType.FLOAT64: "a number",
            PVType.INT: "an integer",
            PVType.BOOL: "true or false (or 1/0, on/off)",
            PVType.ENUM: f"one of {list(meta.states)} or a state index",
            PVType.FLOAT64_ARRAY: "numbers as [1, 2, 3] or 1,2,3",
        }[t]
        raise UsageError(f"{meta.name} is {t.value}: expected {expected}, got {text!r}") from None
    return text


# ---- monitor ----------------------------------------------------------------------------


def cmd_monitor(args: argparse.Namespace) -> int:
    """Print changes until Ctrl-C (or --count samples)."""

    async def body(s: Session) -> int:
        metas = {n: await s.info(n) for n in args.pvs}
        width = max(len(n) for n in args.pvs)
        seen = 0
        async with s.monitor(args.pvs) as mon:
            async for sample in mon:
                _print_sample(sample, metas[sample.name], width, args.json)
                seen += 1
                if args.count is not None and seen >= args.count:
                    break
        return 0

    return _run(args, body)


def _print_sample(sample: Sample, meta: Metadata, width: int, as_json: bool) -> None:
    r = sample.reading
    if as_json:
        print(json.dumps(_value_json(sample.name, r, meta)), flush=True)
        return
    alarm = "" if r.severity.name == "NO_ALARM" else f"  {r.severity.name} {r.status.name}"
    unit = f" {meta.unit}" if meta.unit else ""
    print(f"{_time(r.timestamp)}  {sample.name:<{width}}  {format_value(meta, r.value)}{unit}{alarm}", flush=True)


# ---- output -----------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())
