"""Running one client command: connect with its options, run its body with the session, exit.

Theory of operation. Each command connects with :func:`labctl.clients.session.connect`,
does one thing and exits: :func:`run` returns 0 on success, 1 with one line
``labctl <command>: <reason>`` on standard error when the server refuses or cannot be
reached, 2 for bad arguments (:class:`~labctl.clients.cli.arguments.UsageError`). With
``--json`` that line is one JSON object instead, still on standard error
(:func:`~labctl.clients.cli.output.error_object`: ``kind``, ``error``, ``action``,
``target``, ``fields``, ``message``), so standard output holds results only. The
password comes from ``LABCTL_PASSWORD`` or, on a terminal, a prompt; never from an
argument, where it would land in the shell history.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from labctl.clients.cli.output import error_object, json_text
from labctl.clients.credentials import password_for as _password
from labctl.clients.errors import ClientError
from labctl.clients.session import connect


def run(args: argparse.Namespace, body: Any) -> int:
    """Run ``await body(session)`` on a session made from ``args``' connection options; the exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)  # its errors become our one-line reasons
    try:
        return asyncio.run(_with_session(args, body))
    except ClientError as e:
        report(args, e)
        return 2 if e.kind == "usage" else 1  # UsageError, NoPassword


def report(args: argparse.Namespace, error: Exception) -> None:
    """Print a failure on standard error: one line, or with ``--json`` one JSON object."""
    if getattr(args, "json", False):
        print(json_text(error_object(error), indent=None), file=sys.stderr, flush=True)
    else:
        print(f"labctl {args.command}: {error}", file=sys.stderr, flush=True)


async def _with_session(args: argparse.Namespace, body: Any) -> int:
    password = _password(args.user)
    session = await connect(args.url, args.user, password, args.security, timeout_s=args.timeout)
    try:
        return await body(session)
    finally:
        await session.close()
