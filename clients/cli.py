"""The client commands of ``labctl``: PVs (``ls``, ``get``, ``put``, ``monitor``) and the control layer.

Control commands: ``locks``, ``lock RESOURCE [--for 10m] [--priority N] [--wait]`` (holds
the lock, renewing it every third of the lease, until Ctrl-C or SIGTERM, then releases
it), ``unlock``, ``submit PROCEDURE --param k=v ... [--priority N]``, ``jobs [--mine]``,
``job ID`` (state, log, results), ``cancel ID``, ``audit --since 1h [--user U] [--pv P]``
(which logs in with ``--login`` or ``LABCTL_USER``, since its ``--user`` filters),
``alarms [--all]``, ``ack SOURCE [--comment ...]``, ``shelve SOURCE --for 1h --reason ...``,
``unshelve SOURCE``, ``interlocks``, ``reset-interlock NAME``. Durations are written
``30s``, ``10m``, ``2h``, ``1d`` (or combined, ``1h30m``; a bare number is seconds).

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
import contextlib
import dataclasses
import datetime as _dt
import getpass
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from clients.session import ClientError, Metadata, PVValue, Sample, Session, connect, format_value
from ioc.types import PVType, Reading

DEFAULT_URL = "opc.tcp://localhost:4840"


class UsageError(ClientError):
    """The command line itself is wrong (exit status 2)."""


def connection_options(user_flag: str = "--user") -> argparse.ArgumentParser:
    """The shared connection options (``audit`` logs in with ``--login``: its ``--user`` filters)."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("connection")
    g.add_argument("--url", default=os.environ.get("LABCTL_URL", DEFAULT_URL), help=f"server endpoint (LABCTL_URL; default {DEFAULT_URL})")
    g.add_argument(user_flag, dest="user", default=os.environ.get("LABCTL_USER"),
                   help="user name (LABCTL_USER); the password comes from LABCTL_PASSWORD or a prompt")  # fmt: skip
    g.add_argument(
        "--security",
        default=os.environ.get("LABCTL_SECURITY", "auto"),
        choices=["auto", "None", "Sign", "SignAndEncrypt"],
        help="channel security, Basic256Sha256 (LABCTL_SECURITY; default auto: the most secure offered)",
    )
    g.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds each request may take (default 10)")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    return common


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the client commands to the ``labctl`` command."""
    common = connection_options()

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

    register_control(subparsers, common)

    from clients.history import register as register_history  # it builds on this module

    register_history(subparsers, common)


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


# ---- control: arguments -------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhd])", re.IGNORECASE)
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds of ``30s``, ``10m``, ``2h``, ``1d``, ``1h30m`` or a bare number of seconds."""
    body = text.strip()
    try:
        seconds = float(body)
    except ValueError:
        parts = _DURATION.findall(body)
        if not parts or _DURATION.sub("", body).strip():
            raise argparse.ArgumentTypeError(f"expected a duration like 30s, 10m, 2h or 1h30m, got {text!r}") from None
        seconds = sum(float(n) * _UNITS[u.lower()] for n, u in parts)
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive duration, got {text!r}")
    return seconds


def parse_since(text: str) -> float:
    """A start time: a duration ago (``1h``), or an ISO date and time (local unless it says its zone)."""
    try:
        return time.time() - parse_duration(text)
    except argparse.ArgumentTypeError:
        pass
    try:
        when = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration ago (1h, 30m) or a date and time (2024-05-01T12:00), got {text!r}") from None
    return when.timestamp()


def parse_param(text: str) -> tuple[str, str]:
    """``name=value`` (the server converts the value to the parameter's declared type)."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value


def register_control(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the control commands (locks, jobs, audit, alarms, interlocks)."""
    p = subparsers.add_parser("locks", parents=[common], help="who holds which resource, until when, and who waits")
    p.set_defaults(func=cmd_locks)

    p = subparsers.add_parser("lock", parents=[common], help="take a resource's lock and hold it (renewed) until Ctrl-C")
    p.add_argument("resource", metavar="RESOURCE")
    p.add_argument("--for", dest="duration", type=parse_duration, default=600.0, metavar="DURATION",
                   help="lease duration, renewed every third of it while the command runs (default 10m)")  # fmt: skip
    p.add_argument("--priority", type=int, default=0, metavar="N", help="queue priority, higher first (default 0)")
    p.add_argument("--wait", action="store_true", help="if held, wait in the queue instead of failing")
    p.add_argument("--wait-timeout", type=parse_duration, metavar="DURATION", help="give up waiting after this long")
    p.set_defaults(func=cmd_lock)

    p = subparsers.add_parser("unlock", parents=[common], help="release your lock on a resource (or withdraw your request)")
    p.add_argument("resource", metavar="RESOURCE")
    p.add_argument("--token", help="the lease's token (default: your own lease on the resource)")
    p.set_defaults(func=cmd_unlock)

    p = subparsers.add_parser("submit", parents=[common], help="queue a job running a procedure")
    p.add_argument("procedure", metavar="PROCEDURE")
    p.add_argument("--param", dest="params", type=parse_param, action="append", default=[], metavar="NAME=VALUE",
                   help="a parameter (repeat for more)")  # fmt: skip
    p.add_argument("--priority", type=int, default=0, metavar="N", help="higher runs first (default 0)")
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser("jobs", parents=[common], help="list jobs, newest first")
    p.add_argument("--mine", action="store_true", help="only your jobs")
    p.set_defaults(func=cmd_jobs)

    p = subparsers.add_parser("job", parents=[common], help="a job's state, log and results")
    p.add_argument("job_id", type=int, metavar="ID")
    p.set_defaults(func=cmd_job)

    p = subparsers.add_parser("cancel", parents=[common], help="cancel a queued or running job (yours, or any as admin)")
    p.add_argument("job_id", type=int, metavar="ID")
    p.set_defaults(func=cmd_cancel)

    p = subparsers.add_parser("audit", parents=[connection_options("--login")], help="the audit trail: writes, locks, jobs, alarms, logins")
    p.add_argument("--since", type=parse_since, default=parse_since("1h"), metavar="WHEN", help="a duration ago (1h) or a date and time (default 1h)")
    p.add_argument("--user", dest="audit_user", metavar="U", help="only this user's records")
    p.add_argument("--pv", metavar="P", help="only records of this PV (or resource, alarm, job:ID)")
    p.set_defaults(func=cmd_audit)

    p = subparsers.add_parser("alarms", parents=[common], help="alarms that need attention (--all: every alarm)")
    p.add_argument("--all", action="store_true", help="every alarmed PV, also those in no alarm")
    p.set_defaults(func=cmd_alarms)

    p = subparsers.add_parser("ack", parents=[common], help="acknowledge an alarm")
    p.add_argument("source", metavar="SOURCE", help="the PV in alarm")
    p.add_argument("--comment", default="", help="what was seen or done")
    p.set_defaults(func=cmd_ack)

    p = subparsers.add_parser("shelve", parents=[common], help="silence an alarm for a while (experts)")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--for", dest="duration", type=parse_duration, required=True, metavar="DURATION", help="how long, e.g. 1h")
    p.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
    p.set_defaults(func=cmd_shelve)

    p = subparsers.add_parser("unshelve", parents=[common], help="end an alarm's shelving early (experts)")
    p.add_argument("source", metavar="SOURCE")
    p.set_defaults(func=cmd_unshelve)

    p = subparsers.add_parser("interlocks", parents=[common], help="interlock states")
    p.set_defaults(func=cmd_interlocks)

    p = subparsers.add_parser("reset-interlock", parents=[common], help="reset an interlock that waits for it")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_reset_interlock)


# ---- control: commands ----------------------------------------------------------------------


def _clock(ts: float | None) -> str:
    return "-" if ts is None else _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return repr(value)


def _left(ts: float | None) -> str:
    if ts is None:
        return ""
    left = ts - time.time()
    return f" (in {_span(left)})" if left > 0 else " (lapsed)"


def _span(seconds: float) -> str:
    if seconds < 60:
        return f"{max(seconds, 0.0):.3g}s"
    h, rest = divmod(round(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def cmd_locks(args: argparse.Namespace) -> int:
    """List every resource's lock."""

    async def body(s: Session) -> int:
        locks = await s.locks()
        if args.json:
            _print_json([dataclasses.asdict(lk) for lk in locks])
            return 0
        rows = []
        for lk in locks:
            if not lk.lockable:
                rows.append((lk.resource, "(not lockable)", "", "", ""))
                continue
            queue = ", ".join(f"{u}({p})" if p else u for u, p in lk.queue)
            rows.append((lk.resource, lk.owner or "-", lk.client, _clock(lk.expires_at) + _left(lk.expires_at) if lk.owner else "", queue))
        if rows:
            _table(("RESOURCE", "OWNER", "CLIENT", "EXPIRES", "QUEUE"), rows)
        else:
            print("the server has no resources", file=sys.stderr)
        return 0

    return _run(args, body)


def cmd_lock(args: argparse.Namespace) -> int:
    """Take a lock and hold it until interrupted (Ctrl-C, SIGTERM); then release it."""

    async def body(s: Session) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        handled = []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
                handled.append(sig)
        try:
            if args.wait:
                print(f"waiting for {args.resource}...", file=sys.stderr, flush=True)
            async with s.hold_lock(args.resource, args.duration, priority=args.priority, wait=args.wait, timeout_s=args.wait_timeout) as held:
                lease = held.lease
                if args.json:
                    print(json.dumps({"resource": lease.resource, "token": lease.token, "expires_at": lease.expires_at}), flush=True)
                else:
                    print(f"locked {lease.resource} until {_clock(lease.expires_at)}, renewed every {_span(args.duration / 3)}; "
                          f"Ctrl-C releases it", flush=True)  # fmt: skip
                while held.lost is None and not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 1.0)  # wake now and then to notice a lost lease
                if held.lost is not None:
                    raise ClientError(f"lost the lock of {args.resource}: {held.lost}")
            if not args.json:
                print(f"released {args.resource}", flush=True)
            return 0
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)

    return _run(args, body)


def cmd_unlock(args: argparse.Namespace) -> int:
    """Release a lock."""

    async def body(s: Session) -> int:
        await s.unlock(args.resource, args.token)
        if args.json:
            _print_json({"resource": args.resource, "released": True})
        else:
            print(f"released {args.resource}")
        return 0

    return _run(args, body)


def cmd_submit(args: argparse.Namespace) -> int:
    """Queue a job."""

    async def body(s: Session) -> int:
        job_id = await s.submit(args.procedure, dict(args.params), priority=args.priority)
        if args.json:
            _print_json({"id": job_id})
        else:
            print(f"job {job_id} queued ({args.procedure}, priority {args.priority})")
        return 0

    return _run(args, body)


def cmd_jobs(args: argparse.Namespace) -> int:
    """List jobs."""

    async def body(s: Session) -> int:
        jobs = await s.jobs(mine=args.mine)
        if args.json:
            _print_json([dataclasses.asdict(j) for j in jobs])
            return 0
        if not jobs:
            print("no jobs", file=sys.stderr)
            return 0
        rows = [
            (str(j.id), j.procedure, j.owner, j.state + (" (paused)" if j.paused else ""), str(j.priority), _clock(j.submitted_at), j.error)
            for j in jobs
        ]
        _table(("ID", "PROCEDURE", "OWNER", "STATE", "PRIORITY", "SUBMITTED", "ERROR"), rows)
        return 0

    return _run(args, body)


def cmd_job(args: argparse.Namespace) -> int:
    """Show a job with its log and results."""

    async def body(s: Session) -> int:
        j = await s.job(args.job_id)
        if args.json:
            _print_json(dataclasses.asdict(j))
            return 0
        params = ", ".join(f"{k}={v!r}" for k, v in j.params.items()) or "-"
        for key, value in (
            ("job", f"{j.id} ({j.procedure})"), ("owner", j.owner), ("state", j.state + (" (paused)" if j.paused else "")),
            ("priority", str(j.priority)), ("params", params), ("resources", ", ".join(j.resources) or "-"),
            ("submitted", _clock(j.submitted_at)), ("started", _clock(j.started_at)), ("ended", _clock(j.ended_at)),
        ):  # fmt: skip
            print(f"{key + ':':<11}{value}")
        if j.error:
            print(f"{'error:':<11}{j.error}")
        print("\nLOG")
        for t, line in j.log:
            print(f"  {_time(t)}  {line}")
        print("\nRESULTS" + ("" if j.results else " (none)"))
        if j.results:
            rows = [(_time(t), pv, _show(v), sev, st, label) for t, pv, v, sev, st, label in j.results]
            _table(("TIME", "PV", "VALUE", "SEVERITY", "STATUS", "LABEL"), rows)
        return 0

    return _run(args, body)


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple):
        return "[" + ", ".join(_show(x) for x in value) + "]"
    return str(value)


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel a job."""

    async def body(s: Session) -> int:
        await s.cancel(args.job_id)
        if args.json:
            _print_json({"id": args.job_id, "cancelled": True})
        else:
            print(f"job {args.job_id} cancelled")
        return 0

    return _run(args, body)


def cmd_audit(args: argparse.Namespace) -> int:
    """List the audit trail."""

    async def body(s: Session) -> int:
        records = await s.audit(args.since, user=args.audit_user, pv=args.pv)
        if args.json:
            _print_json(records)
            return 0
        if not records:
            print(f"no audit records since {_clock(args.since)}", file=sys.stderr)
            return 0
        rows = []
        for r in records:
            if r["action"] == "write":
                detail = f"{_show(r['old'])} -> {_show(r['new'])}"
            else:
                detail = "" if r["new"] is None else _show(r["new"])
            verdict = "ok" if r["accepted"] else f"REFUSED: {r['reason']}"
            if r["accepted"] and r["reason"] and r["action"] != "write" and r["reason"] not in detail:
                verdict = f"ok: {r['reason']}"
            rows.append((_time(r["time"]), r["action"], r["user"], r["protocol"], r["host"] or "-", r["target"], detail, verdict))
        _table(("TIME", "ACTION", "USER", "VIA", "HOST", "TARGET", "DETAIL", "RESULT"), rows)
        return 0

    return _run(args, body)


def cmd_alarms(args: argparse.Namespace) -> int:
    """List alarms."""

    async def body(s: Session) -> int:
        alarms = await s.alarms(active_only=not args.all)
        if args.json:
            _print_json([dataclasses.asdict(a) for a in alarms])
            return 0
        if not alarms:
            print("no alarms" if not args.all else "no alarmed PVs", file=sys.stderr)
            return 0
        rows = []
        for a in alarms:
            state = ("acked" if a.acked else "UNACKED") + (f", shelved until {_clock(a.shelved_until)}" if a.shelved_until else "")
            rows.append((a.source, a.severity, a.current, a.status, state, _clock(a.since), a.message))
        _table(("SOURCE", "SEVERITY", "NOW", "STATUS", "STATE", "SINCE", "MESSAGE"), rows)
        return 0

    return _run(args, body)


def cmd_ack(args: argparse.Namespace) -> int:
    """Acknowledge an alarm."""

    async def body(s: Session) -> int:
        await s.acknowledge(args.source, args.comment)
        print(json.dumps({"source": args.source, "acknowledged": True}) if args.json else f"acknowledged {args.source}")
        return 0

    return _run(args, body)


def cmd_shelve(args: argparse.Namespace) -> int:
    """Shelve an alarm."""

    async def body(s: Session) -> int:
        await s.shelve(args.source, args.duration, args.reason)
        if args.json:
            print(json.dumps({"source": args.source, "shelved_for_s": args.duration}))
        else:
            print(f"shelved {args.source} for {_span(args.duration)}")
        return 0

    return _run(args, body)


def cmd_unshelve(args: argparse.Namespace) -> int:
    """End an alarm's shelving."""

    async def body(s: Session) -> int:
        await s.unshelve(args.source)
        print(json.dumps({"source": args.source, "shelved": False}) if args.json else f"unshelved {args.source}")
        return 0

    return _run(args, body)


def cmd_interlocks(args: argparse.Namespace) -> int:
    """List interlocks."""

    async def body(s: Session) -> int:
        interlocks = await s.interlocks()
        if args.json:
            _print_json([dataclasses.asdict(i) for i in interlocks])
            return 0
        if not interlocks:
            print("the server has no interlocks", file=sys.stderr)
            return 0
        _table(("NAME", "STATE", "REASON", "DESCRIPTION"), [(i.name, i.state, i.reason, i.description) for i in interlocks])
        return 0

    return _run(args, body)


def cmd_reset_interlock(args: argparse.Namespace) -> int:
    """Reset an interlock."""

    async def body(s: Session) -> int:
        await s.reset_interlock(args.name)
        print(json.dumps({"name": args.name, "reset": True}) if args.json else f"reset interlock {args.name}")
        return 0

    return _run(args, body)

