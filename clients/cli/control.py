"""The control commands of ``labctl``: locks, jobs, the audit trail, alarms and interlocks.

Control commands: ``locks``, ``lock RESOURCE [--for 10m] [--priority N] [--wait]`` (holds
the lock, renewing it every third of the lease, until Ctrl-C or SIGTERM, then releases
it; prints the lease's token, with which another session of the same user writes under
it: ``labctl put --lease TOKEN`` or ``LABCTL_LEASE``), ``unlock``, ``submit PROCEDURE --param k=v ... [--priority N]``, ``jobs [--mine]``,
``job ID`` (state, log, results), ``cancel ID`` (a running job ends after its cleanup
steps), ``procedures`` (parameters with their
types, defaults and descriptions), ``audit --since 1h [--by USER] [--pv P]``, ``alarms
[--all]``, ``ack SOURCE [--comment ...]``, ``shelve SOURCE --for 1h --reason ...``,
``unshelve SOURCE``, ``interlocks``, ``reset-interlock NAME``. Every command logs in with
``--user`` (``LABCTL_USER``). Durations are written ``30s``, ``10m``, ``2h``, ``1d`` (or
combined, ``1h30m``; a bare number is seconds).

Theory of operation. Each command is one call of the session's control layer
(:class:`labctl.clients.session.Session`) run by :func:`labctl.clients.cli.runner.run`;
it prints a table for people or, with ``--json``, the records as strict JSON (times ISO
8601 UTC, see :mod:`labctl.clients.cli.output`). Enum values are named by their states,
from the PV's metadata: an enum write in the audit trail (``OFF -> HIGH``; JSON adds
``old_state``/``new_state``), an alarm on an enum PV such as an interlock's
``ILK:<NAME>:STATE`` (JSON adds ``state``). A time the server does not know (an alarm
never active since start-up) is ``-`` in a table and ``null`` in JSON. A job's state says
what holds it (``queued (held by interlock mxc_warm: ...)``, ``queued (waiting for lock
cryostat held by operator ...)``) and whether it is running its cleanup; ``submit`` says at
once when the new job is held, and by what.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import signal
import sys
import threading
from typing import Any

from labctl.clients.cli.arguments import parse_duration, parse_param, parse_since
from labctl.clients.cli.output import (
    format_clock,
    format_plain,
    format_span,
    format_time,
    format_time_left,
    iso_time,
    print_json,
    print_table,
    with_times,
)
from labctl.clients.cli.runner import run
from labctl.clients.errors import Conflict, NoSuchPV, Refused
from labctl.clients.session import Session
from labctl.clients.values import Metadata, format_value
from labctl.ioc.types import PVType


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the control commands (locks, jobs, audit, alarms, interlocks; ``common``: the shared connection options)."""
    p = subparsers.add_parser("locks", parents=[common], help="who holds which resource, until when, and who waits")
    p.set_defaults(func=cmd_locks)

    p = subparsers.add_parser("lock", parents=[common], help="take a resource's lock and hold it (renewed) until Ctrl-C")
    p.add_argument("resource", metavar="RESOURCE")
    p.add_argument("--for", dest="duration", type=parse_duration, default=600.0, metavar="DURATION",
                   help="lease duration, renewed every third of it while the command runs (default 10m)")  # fmt: skip
    p.add_argument("--priority", type=int, default=0, metavar="N", help="queue priority from -1000 to 1000, higher first (default 0)")
    p.add_argument("--wait", action="store_true", help="if held, wait in the queue instead of failing")
    p.add_argument("--wait-timeout", type=parse_duration, metavar="DURATION", help="give up waiting after this long")
    p.set_defaults(func=cmd_lock)

    p = subparsers.add_parser("unlock", parents=[common], help="release your lock on a resource (or withdraw your request); --break: anyone's (admins)")
    p.add_argument("resource", metavar="RESOURCE")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--token", help="the lease's token (default: your own lease on the resource)")
    how.add_argument("--break", dest="break_", action="store_true", help="break whoever holds it (admins; the holder is told, the break audited)")
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

    p = subparsers.add_parser("procedures", parents=[common], help="the procedures jobs run, with their parameters")
    p.set_defaults(func=cmd_procedures)

    p = subparsers.add_parser("audit", parents=[common], help="the audit trail: writes, locks, jobs, alarms, logins")
    p.add_argument("--since", type=parse_since, default=parse_since("1h"), metavar="WHEN", help="a duration ago (1h) or a date and time (default 1h)")
    p.add_argument("--by", dest="by", metavar="USER", help="only the records of this user's actions")
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


# ---- commands ------------------------------------------------------------------------------


def cmd_locks(args: argparse.Namespace) -> int:
    """List every resource's lock."""

    async def body(s: Session) -> int:
        locks = await s.locks()
        if args.json:
            print_json([with_times(dataclasses.asdict(lk), "expires_at") for lk in locks])
            return 0
        rows = []
        for lk in locks:
            if not lk.lockable:
                rows.append((lk.resource, "(not lockable)", "", "", ""))
                continue
            queue = ", ".join(f"{u}({p})" if p else u for u, p in lk.queue)
            rows.append((lk.resource, lk.owner or "-", lk.client, format_clock(lk.expires_at) + format_time_left(lk.expires_at) if lk.owner else "", queue))
        if rows:
            print_table(("RESOURCE", "OWNER", "CLIENT", "EXPIRES", "QUEUE"), rows)
        else:
            print("the server has no resources", file=sys.stderr)
        return 0

    return run(args, body)


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
                    print_json({"resource": lease.resource, "token": lease.token, "expires_at": iso_time(lease.expires_at)}, indent=None)
                else:
                    print(f"locked {lease.resource} until {format_clock(lease.expires_at)}, renewed every {format_span(args.duration / 3)}; "
                          f"Ctrl-C releases it", flush=True)  # fmt: skip
                    print(f"token {lease.token}: other sessions of yours write under it with "
                          f"`labctl put --lease {lease.token} ...` or LABCTL_LEASE={lease.token}", flush=True)  # fmt: skip
                while held.lost is None and not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 1.0)  # wake now and then to notice a lost lease
                if held.lost is not None:
                    raise Conflict(f"lost the lock of {args.resource}: {held.lost}", action="lock.renew", target=args.resource)
            if not args.json:
                print(f"released {args.resource}", flush=True)
            return 0
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)

    return run(args, body)


def cmd_unlock(args: argparse.Namespace) -> int:
    """Release a lock."""

    async def body(s: Session) -> int:
        if args.break_:
            holder = next((lk for lk in await s.locks() if lk.resource == args.resource), None)
            await s.break_lock(args.resource)
            owner = holder.owner if holder is not None else ""
            if args.json:
                print_json({"resource": args.resource, "broken": True, "owner": owner or None})
            else:
                print(f"broke the lock on {args.resource}" + (f" (held by {owner})" if owner else ""))
            return 0
        await s.unlock(args.resource, args.token)
        if args.json:
            print_json({"resource": args.resource, "released": True})
        else:
            print(f"released {args.resource}")
        return 0

    return run(args, body)


def cmd_submit(args: argparse.Namespace) -> int:
    """Queue a job."""

    async def body(s: Session) -> int:
        job_id = await s.submit(args.procedure, dict(args.params), priority=args.priority)
        try:  # say at once what holds it (an interlock, a lock), or that it runs already
            job: Any = await s.job(job_id)
        except Refused:
            job = None
        if args.json:
            print_json({"id": job_id, **({"state": job.state, "waiting": job.waiting, "waiting_reason": job.waiting_reason} if job else {})})
        elif job is not None and job.waiting_reason:
            print(f"job {job_id} queued ({args.procedure}, priority {args.priority}) but held: {job.waiting_reason}")
        else:
            print(f"job {job_id} queued ({args.procedure}, priority {args.priority})")
        return 0

    return run(args, body)


def cmd_jobs(args: argparse.Namespace) -> int:
    """List jobs."""

    async def body(s: Session) -> int:
        jobs = await s.jobs(mine=args.mine)
        if args.json:
            print_json([_job_json(j) for j in jobs])
            return 0
        if not jobs:
            print("no jobs", file=sys.stderr)
            return 0
        rows = [
            (str(j.id), j.procedure, j.owner, j.state_text, str(j.priority), format_clock(j.submitted_at), j.error)
            for j in jobs
        ]
        print_table(("ID", "PROCEDURE", "OWNER", "STATE", "PRIORITY", "SUBMITTED", "ERROR"), rows)
        return 0

    return run(args, body)


def cmd_job(args: argparse.Namespace) -> int:
    """Show a job with its log and results."""

    async def body(s: Session) -> int:
        j = await s.job(args.job_id)
        if args.json:
            print_json(_job_json(j))
            return 0
        params = ", ".join(f"{k}={v!r}" for k, v in j.params.items()) or "-"
        for key, value in (
            ("job", f"{j.id} ({j.procedure})"), ("owner", j.owner), ("state", j.state_text),
            ("priority", str(j.priority)), ("params", params), ("resources", ", ".join(j.resources) or "-"),
            ("submitted", format_clock(j.submitted_at)), ("started", format_clock(j.started_at)), ("ended", format_clock(j.ended_at)),
        ):  # fmt: skip
            print(f"{key + ':':<11}{value}")
        if j.error:
            print(f"{'error:':<11}{j.error}")
        print("\nLOG")
        for t, line in j.log:
            print(f"  {format_time(t)}  {line}")
        print("\nRESULTS" + ("" if j.results else " (none)"))
        if j.results:
            rows = [(format_time(t), pv, format_plain(v), sev, st, label) for t, pv, v, sev, st, label in j.results]
            print_table(("TIME", "PV", "VALUE", "SEVERITY", "STATUS", "LABEL"), rows)
        return 0

    return run(args, body)


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel a job."""

    async def body(s: Session) -> int:
        await s.cancel(args.job_id)
        if args.json:
            print_json({"id": args.job_id, "cancelled": True})
        else:
            job = await s.job(args.job_id)
            if job.state == "running":  # its cleanup steps run before it ends
                print(f"job {args.job_id} cancelling: its cleanup steps run first")
            else:
                print(f"job {args.job_id} {job.state}")
        return 0

    return run(args, body)


def _job_json(j: Any) -> dict[str, Any]:
    """A job (and its log and results, if it has them) as JSON data with ISO times."""
    out = with_times(dataclasses.asdict(j), "submitted_at", "started_at", "ended_at")
    if "log" in out:
        out["log"] = [{"time": iso_time(t), "line": line} for t, line in j.log]
        out["results"] = [
            {"time": iso_time(t), "pv": pv, "value": v, "severity": sev, "status": st, "label": label}
            for t, pv, v, sev, st, label in j.results
        ]
    return out


def cmd_procedures(args: argparse.Namespace) -> int:
    """List the procedures jobs run, with their parameters."""

    async def body(s: Session) -> int:
        procedures = await s.procedures()
        if args.json:
            print_json([dataclasses.asdict(p) for p in procedures])
            return 0
        if not procedures:
            print("the server has no procedures", file=sys.stderr)
            return 0
        rows = []
        for p in procedures:
            rows.append((p.name, ", ".join(p.resources) or "-", "", "", "", p.description))
            for name, spec in p.params.items():
                rows.append((f"  {name}", "", str(spec.get("type", "")), _param_default(spec), _param_range(spec), spec.get("description") or ""))
        print_table(("PROCEDURE/PARAM", "RESOURCES", "TYPE", "DEFAULT", "RANGE", "DESCRIPTION"), rows)
        return 0

    return run(args, body)


def _param_default(spec: dict[str, Any]) -> str:
    if "default" not in spec or spec["default"] is None:
        return "(required)"
    return format_plain(spec["default"])


def _param_range(spec: dict[str, Any]) -> str:
    low, high = spec.get("min"), spec.get("max")
    if low is None and high is None:
        return ""
    return f"[{'' if low is None else format_plain(low)}, {'' if high is None else format_plain(high)}]"


#: Audit actions that are PV writes (their old and new values are the PV's).
WRITE_ACTIONS = ("write", "pv.write", "write.unconfirmed")  # the last: the instrument took it, its read-back failed


async def _metadata(s: Session, names: Any) -> dict[str, Metadata]:
    """The metadata of those of ``names`` the server still has (one lookup per name, cached by the session)."""
    out = {}
    for name in dict.fromkeys(names):
        try:
            out[name] = await s.info(name)
        except NoSuchPV:
            continue  # a PV the site no longer has: its values stay numbers
    return out


def _state(meta: Metadata | None, value: Any) -> str | None:
    """An enum value's state name (None if not an enum PV's index)."""
    if meta is None or meta.type is not PVType.ENUM or not isinstance(value, int) or isinstance(value, bool):
        return None
    return meta.states[value] if 0 <= value < len(meta.states) else None


def cmd_audit(args: argparse.Namespace) -> int:
    """List the audit trail."""

    async def body(s: Session) -> int:
        records = await s.audit(args.since, user=args.by, pv=args.pv)
        metas = await _metadata(s, [r["target"] for r in records if r["action"] in WRITE_ACTIONS])
        if args.json:
            out = []
            for r in records:
                item = with_times(r, "time")
                meta = metas.get(r["target"]) if r["action"] in WRITE_ACTIONS else None
                if meta is not None and meta.type is PVType.ENUM:
                    item.update(old_state=_state(meta, r["old"]), new_state=_state(meta, r["new"]))
                out.append(item)
            print_json(out)
            return 0
        if not records:
            print(f"no audit records since {format_clock(args.since)}", file=sys.stderr)
            return 0
        rows = []
        for r in records:
            if r["action"] in WRITE_ACTIONS:
                meta = metas.get(r["target"])
                detail = f"{_audit_value(meta, r['old'])} -> {_audit_value(meta, r['new'])}"
            else:
                detail = "" if r["new"] is None else format_plain(r["new"])
            verdict = "ok" if r["accepted"] else f"REFUSED: {r['reason']}"
            if r["accepted"] and r["reason"] and r["action"] not in WRITE_ACTIONS and r["reason"] not in detail:
                verdict = f"ok: {r['reason']}"
            if r["accepted"] and r["action"] == "write.unconfirmed":
                verdict = f"written, not confirmed: {r['reason']}"
            rows.append((format_time(r["time"]), r["action"], r["user"], r["protocol"], r["host"] or "-", r["target"], detail, verdict))
        print_table(("TIME", "ACTION", "USER", "VIA", "HOST", "TARGET", "DETAIL", "RESULT"), rows)
        return 0

    return run(args, body)


def _audit_value(meta: Metadata | None, value: Any) -> str:
    state = _state(meta, value)
    return state if state is not None else format_plain(value)


def _since(ts: float | None) -> float | None:
    """An alarm's or interlock's ``since``: None when it never changed since start-up (the server sends 0)."""
    return ts if ts else None


def cmd_alarms(args: argparse.Namespace) -> int:
    """List alarms."""

    async def body(s: Session) -> int:
        alarms = await s.alarms(active_only=not args.all)
        metas = await _metadata(s, [a.source for a in alarms])
        if args.json:
            out = []
            for a in alarms:
                item = dataclasses.asdict(a) | {"since": iso_time(_since(a.since)), "shelved_until": iso_time(a.shelved_until)}
                meta = metas.get(a.source)
                if meta is not None and meta.type is PVType.ENUM:
                    item["state"] = _state(meta, a.value)
                out.append(item)
            print_json(out)
            return 0
        if not alarms:
            print("no alarms" if not args.all else "no alarmed PVs", file=sys.stderr)
            return 0
        rows = []
        for a in alarms:
            state = ("acked" if a.acked else "UNACKED") + (f", shelved until {format_clock(a.shelved_until)}" if a.shelved_until else "")
            meta = metas.get(a.source)
            value = "-" if meta is None or a.value is None else format_value(meta, a.value) + (f" {meta.unit}" if meta.unit else "")
            rows.append((a.source, a.severity, a.current, a.status, value, state, format_clock(_since(a.since)), a.guidance))
        print_table(("SOURCE", "SEVERITY", "NOW", "STATUS", "VALUE", "STATE", "SINCE", "GUIDANCE"), rows)
        return 0

    return run(args, body)


def cmd_ack(args: argparse.Namespace) -> int:
    """Acknowledge an alarm."""

    async def body(s: Session) -> int:
        await s.acknowledge(args.source, args.comment)
        print(json.dumps({"source": args.source, "acknowledged": True}) if args.json else f"acknowledged {args.source}")
        return 0

    return run(args, body)


def cmd_shelve(args: argparse.Namespace) -> int:
    """Shelve an alarm."""

    async def body(s: Session) -> int:
        await s.shelve(args.source, args.duration, args.reason)
        if args.json:
            print(json.dumps({"source": args.source, "shelved_for_s": args.duration}))
        else:
            print(f"shelved {args.source} for {format_span(args.duration)}")
        return 0

    return run(args, body)


def cmd_unshelve(args: argparse.Namespace) -> int:
    """End an alarm's shelving."""

    async def body(s: Session) -> int:
        await s.unshelve(args.source)
        print(json.dumps({"source": args.source, "shelved": False}) if args.json else f"unshelved {args.source}")
        return 0

    return run(args, body)


def cmd_interlocks(args: argparse.Namespace) -> int:
    """List interlocks."""

    async def body(s: Session) -> int:
        interlocks = await s.interlocks()
        if args.json:
            print_json([dataclasses.asdict(i) | {"since": iso_time(_since(i.since))} for i in interlocks])
            return 0
        if not interlocks:
            print("the server has no interlocks", file=sys.stderr)
            return 0
        print_table(("NAME", "STATE", "REASON", "DESCRIPTION"), [(i.name, i.state, i.reason, i.description) for i in interlocks])
        return 0

    return run(args, body)


def cmd_reset_interlock(args: argparse.Namespace) -> int:
    """Reset an interlock."""

    async def body(s: Session) -> int:
        await s.reset_interlock(args.name)
        print(json.dumps({"name": args.name, "reset": True}) if args.json else f"reset interlock {args.name}")
        return 0

    return run(args, body)
