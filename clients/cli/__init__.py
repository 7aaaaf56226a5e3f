"""The client commands of ``labctl``: PVs (``ls``, ``get``, ``put``, ``monitor``), the control layer and history.

Theory of operation. Each command connects with :func:`labctl.clients.session.connect`, does
one thing and exits: 0 on success, 1 with one line ``labctl <command>: <reason>`` on
standard error when the server refuses or cannot be reached, 2 for bad arguments. Output
is a table for people, or JSON with ``--json``.

:func:`register` is the one entry point that adds them all to the ``labctl`` command. The
commands live by concern:

* :mod:`labctl.clients.cli.pvs` -- ``ls``, ``get``, ``put``, ``monitor``;
* :mod:`labctl.clients.cli.control` -- locks, jobs, the audit trail, alarms, interlocks;
* :mod:`labctl.clients.history` -- ``history`` (beside the history it reads);

and share :mod:`labctl.clients.cli.arguments` (connection options, argument types,
``UsageError``), :mod:`labctl.clients.cli.runner` (one session per command, exit
statuses) and :mod:`labctl.clients.cli.output` (tables, JSON, times).
"""

from __future__ import annotations

import argparse

from labctl.clients.cli.arguments import connection_options
from labctl.clients.cli.control import register as register_control
from labctl.clients.cli.pvs import register as register_pvs


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the client commands to the ``labctl`` command."""
    common = connection_options()
    register_pvs(subparsers, common)
    register_control(subparsers, common)

    from labctl.clients.history import register as register_history  # it builds on this package

    register_history(subparsers, common)
