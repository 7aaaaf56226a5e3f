"""The command line's input: connection options and argument types of the client commands.

Theory of operation. Connection options are shared by every client command, the same
everywhere: ``--url`` (``LABCTL_URL``, default ``opc.tcp://localhost:4840``), ``--user``
(``LABCTL_USER``; the login, anonymous when absent -- no command uses ``--user`` for
anything else), ``--security`` (``LABCTL_SECURITY``, default ``auto``), ``--timeout`` and
``--json`` (strict JSON: see :mod:`labctl.clients.cli.output`). The password is never an
argument, where it would land in the shell history: :mod:`labctl.clients.cli.runner` takes it from ``LABCTL_PASSWORD`` or,
on a terminal, a prompt.

Argument types: :func:`parse_value` parses ``put``'s VALUE by the PV's type: numbers,
``true``/``false``/``1``/``0`` for booleans, a state name or index for enums, text for
strings, and ``[1, 2, 3]`` or ``1,2,3`` for arrays. Durations (:func:`parse_duration`)
are written ``30s``, ``10m``, ``2h``, ``1d`` (or combined, ``1h30m``; a bare number is
seconds); :func:`parse_since` takes a duration ago or a date and time;
:func:`parse_param` a job's ``NAME=VALUE``. A wrong argument is a :class:`UsageError`
(exit status 2).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import time
from typing import Any

from labctl.clients.errors import ClientError
from labctl.clients.values import Metadata
from labctl.ioc.types import PVType

DEFAULT_URL = "opc.tcp://localhost:4840"


class UsageError(ClientError):
    """The command line itself is wrong (exit status 2)."""

    kind = "usage"


def connection_options(*, request_timeout: bool = True) -> argparse.ArgumentParser:
    """The shared connection options: every client command logs in with ``--user``.

    ``request_timeout=False`` leaves ``--timeout`` out (requests take the default 10 s), for
    a command whose own ``--timeout`` means something else (``monitor``: how long to wait
    for a change).
    """
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("connection")
    g.add_argument("--url", default=os.environ.get("LABCTL_URL", DEFAULT_URL), help=f"server endpoint (LABCTL_URL; default {DEFAULT_URL})")
    g.add_argument("--user", dest="user", default=os.environ.get("LABCTL_USER"),
                   help="user name (LABCTL_USER); the password comes from LABCTL_PASSWORD or a prompt")  # fmt: skip
    g.add_argument(
        "--security",
        default=os.environ.get("LABCTL_SECURITY", "auto"),
        choices=["auto", "None", "Sign", "SignAndEncrypt"],
        help="channel security, Basic256Sha256 (LABCTL_SECURITY; default auto: the most secure offered)",
    )
    if request_timeout:
        g.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds each request may take (default 10)")
    else:
        common.set_defaults(timeout=10.0)
    g.add_argument("--json", action="store_true",
                   help="strict JSON output (times ISO 8601 UTC, no NaN); a failure is one JSON object on standard error")  # fmt: skip
    return common


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
