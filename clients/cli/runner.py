"""Running one client command: connect with its options, run its body with the session, exit.

Theory of operation. Each command connects with :func:`labctl.clients.session.connect`,
does one thing and exits: :func:`run` returns 0 on success, 1 with one line
``labctl <command>: <reason>`` on standard error when the server refuses or cannot be
reached, 2 for bad arguments (:class:`~labctl.clients.cli.arguments.UsageError`). The
password comes from ``LABCTL_PASSWORD`` or, on a terminal, a prompt; never from an
argument, where it would land in the shell history.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys
from typing import Any

from labctl.clients.cli.arguments import UsageError
from labctl.clients.errors import ClientError
from labctl.clients.session import connect


def run(args: argparse.Namespace, body: Any) -> int:
    """Run ``await body(session)`` on a session made from ``args``' connection options; the exit status."""
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
