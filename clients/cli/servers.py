"""``labctl servers`` through a server: the site's servers as the connected server's ``Site`` folder shows them.

Theory of operation. ``labctl servers`` reads the site directory from the site's
database when given its URL (``--historian-url``, ``LABCTL_HISTORIAN_URL``); without one
it connects to a server (``--url`` and the other connection options, as every client
command) and lists the servers its ``Objects/<site>/Site`` folder shows
(:meth:`labctl.clients.session.Session.servers`): the same table, or with ``--json`` the
same JSON objects. A server that is not part of a site has no such folder: that is an
error (exit status 1) saying so.

:func:`format_servers` is the one ``labctl servers`` table: the command reading the
database (:mod:`labctl.server.sitedir`) prints its rows through it too, as
:class:`~labctl.clients.site.ServerInfo` (clients may not import the server; the server
may import clients).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import time
from collections.abc import Sequence

from labctl.clients.cli.output import print_json
from labctl.clients.cli.runner import run
from labctl.clients.errors import ClientError
from labctl.clients.session import Session
from labctl.clients.site import ServerInfo


class NotASite(ClientError):
    """The connected server is not one of a site's servers (it publishes no ``Site`` folder)."""

    kind = "not_found"


def cmd_servers(args: argparse.Namespace) -> int:
    """List the site's servers through the server at ``--url``."""

    async def body(s: Session) -> int:
        if not s.server_name:
            raise NotASite(
                f"{s.url} is not a server of a site (it publishes no Site folder: no site directory); "
                "name a site's database with --historian-url to read its directory"
            )
        servers = await s.servers()
        if args.json:
            print_json([e.as_json() for e in servers])
        else:
            print(format_servers(servers, time.time()))
        return 0

    return run(args, body)


def format_servers(servers: Sequence[ServerInfo], now: float) -> str:
    """The ``labctl servers`` table: one line per server, its health detail indented under it.

    ``now`` is the time the heartbeats' ages are reckoned from, in UNIX seconds on the
    clock of the heartbeats (the site database's). A time that is not known shows as ``-``.
    """
    head = ("NAME", "STATE", "HEALTH", "OPC UA", "CHANNEL ACCESS", "VERSION", "PVS", "STARTED (UTC)", "LAST HEARTBEAT")
    rows = []
    for e in servers:
        ca = f"{e.ca_address}:{e.ca_port}" if e.ca_address else "-"
        started = "-" if e.started is None else _dt.datetime.fromtimestamp(e.started, _dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        beat = "-" if e.heartbeat is None else f"{max(0.0, now - e.heartbeat):.1f} s ago"
        rows.append((e.name, e.state, e.health, e.endpoint or "-", ca, e.version, str(e.pv_count), started, beat))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = []
    for i, r in enumerate([head, *rows]):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i and servers[i - 1].detail:
            lines.append(f"    {servers[i - 1].detail}")
    return "\n".join(lines)
