"""The client commands of ``labctl``: PVs (``ls``, ``get``, ``put``, ``monitor``), the control layer and history.

Theory of operation. Each command connects with :func:`labctl.clients.session.connect`, does
one thing and exits: 0 on success, 1 with one line ``labctl <command>: <reason>`` on
standard error when the server refuses or cannot be reached, 2 for bad arguments (with
``--json``, that line is one JSON error object: kind, error, action, target, fields,
message). Output is a table for people, or strict JSON with ``--json`` (times ISO 8601
UTC, no NaN). Every command logs in with ``--user``.

:func:`register` is the one entry point that adds them all to the ``labctl`` command. The
commands live by concern:

* :mod:`labctl.clients.cli.pvs` -- ``ls``, ``get``, ``put``, ``monitor``;
* :mod:`labctl.clients.cli.control` -- locks, jobs, the audit trail, alarms, interlocks;
* :mod:`labctl.clients.history` -- ``history`` (beside the history it reads);
* :mod:`labctl.clients.cli.servers` -- ``servers`` through a server (the command itself is
  registered with the site directory's, :mod:`labctl.server.sitedir`, which reads the database);

and share :mod:`labctl.clients.cli.arguments` (connection options, argument types,
``UsageError``), :mod:`labctl.clients.cli.runner` (one session per command, exit
statuses) and :mod:`labctl.clients.cli.output` (tables, JSON, times).

The client commands' parsers are :class:`ClientParser`: a command line argparse refuses
(a missing argument, a malformed duration) exits 2 as usual, and with ``--json`` says so
as the one JSON error object of every failure (kind ``usage``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from labctl.clients.cli.arguments import UsageError, connection_options
from labctl.clients.cli.control import register as register_control
from labctl.clients.cli.output import error_object, json_text
from labctl.clients.cli.pvs import register as register_pvs


class ClientParser(argparse.ArgumentParser):
    """A client command's parser: with ``--json`` on its command line, its usage errors are a JSON error object."""

    _json = False

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        """Parse, remembering whether the command line asks for JSON."""
        self._json = "--json" in (sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        """Exit 2 with argparse's message: usage and one line, or with ``--json`` one JSON object."""
        if not self._json:
            super().error(message)
        error = UsageError(message)
        self.exit(2, json_text(error_object(error), indent=None) + "\n")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the client commands to the ``labctl`` command."""
    common = connection_options()
    outer = subparsers._parser_class  # noqa: SLF001 -- argparse builds every subcommand's parser with this class
    subparsers._parser_class = ClientParser  # noqa: SLF001
    try:
        register_pvs(subparsers, common)
        register_control(subparsers, common)

        from labctl.clients.history import register as register_history  # it builds on this package

        register_history(subparsers, common)
    finally:
        subparsers._parser_class = outer  # noqa: SLF001
