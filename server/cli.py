"""The ``labctl`` command.

Server-side commands live here (``serve``, ``check``); client commands (``get``,
``put``...) are registered by :mod:`labctl.clients.cli`, which talks to a server over the
network only. Every command exits 0 on success and non-zero with a one-line reason on
failure (a malformed site file prints one line per problem).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from labctl.ioc.errors import ConfigError, LabctlError

#: The bundled demo site (package data of ``labctl.config``; ``config/demo.yaml`` in a checkout).
DEFAULT_SITE = Path(__file__).resolve().parent.parent / "config" / "demo.yaml"

log = logging.getLogger("labctl")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the server for a site file (default: the simulated demo)")
    p.add_argument("site", nargs="?", type=Path, help=f"site file (default: {DEFAULT_SITE})")
    p.add_argument("--state-dir", help="where history, spool and certificates live (default: the site file's)")
    p.add_argument("--server-name", help="this server's name in its site's directory (default: server.name, else the host name)")
    p.add_argument(
        "--historian-url",
        default=os.environ.get("LABCTL_HISTORIAN_URL"),
        help="SQLAlchemy URL of the historian, sqlite:///... or postgresql+psycopg://... (LABCTL_HISTORIAN_URL; keeps a password off the command line)",
    )
    p.add_argument("--opcua-host", help="OPC UA interface to bind")
    p.add_argument("--opcua-port", type=int, help="OPC UA TCP port (0: a free one)")
    p.add_argument("--ca-interfaces", help="Channel Access interfaces, comma-separated")
    p.add_argument("--ca-port", type=int, help="Channel Access server port")
    p.add_argument("--ca-beacon-port", type=int, help="Channel Access beacon port")
    p.add_argument("--no-opcua", action="store_true", help="do not serve OPC UA")
    p.add_argument("--no-ca", action="store_true", help="do not serve Channel Access")
    p.add_argument("--no-historian", action="store_true", help="do not archive")
    p.add_argument("--log-level", default=os.environ.get("LABCTL_LOG_LEVEL", "INFO"), help="DEBUG, INFO, WARNING...")
    p.set_defaults(func=cmd_serve)


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="validate a site file and print a summary")
    p.add_argument("site", nargs="?", type=Path, default=DEFAULT_SITE, help=f"site file (default: {DEFAULT_SITE})")
    p.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a site file; print a summary or every problem."""
    from labctl.drivers.registry import check_instrument
    from labctl.ioc.build import build_database
    from labctl.server.site import load_site  # late: the site model imports every adapter's package
    from labctl.server.tuning import gc_paused

    site = load_site(args.site)
    problems = [
        f"{args.site} instruments[{i}].{_dotted(path)}: {message}"
        for i, inst in enumerate(site.instruments)
        for path, message in check_instrument(inst, simulations=site.simulations, base_dir=args.site.resolve().parent)
    ]
    if problems:
        raise ConfigError(str(args.site), problems)
    with gc_paused():  # a large site is a million long-lived objects (see server.tuning)
        db = build_database(site, args.site.resolve().parent, source=str(args.site))
    warnings = _interlock_warnings(args.site, site, db)
    from labctl.ioc.procedure import procedure_warnings  # unused procedure parameters
    warnings += [f"{args.site} {w}" for w in procedure_warnings(site.procedures)]
    counts = db.counts()
    print(f"{args.site}: OK -- site {site.site!r}")
    print(
        f"  PVs: {counts.get('total', 0)} ({counts.get('instrument', 0)} instrument, "
        f"{counts.get('derived', 0)} derived, {counts.get('soft', 0)} soft)"
    )
    print(f"  instruments: {len(site.instruments)}")
    for inst in site.instruments:
        how = f"simulation {inst.simulation}" if inst.simulation else f"{inst.resource} via {inst.visa_library or 'default VISA'}"
        print(f"    {inst.name:<12} {inst.driver:<14} {len(inst.pvs):>3} PVs  {how}")
    resources = sorted({i.resource for i in db.infos()} | {r.name for r in site.resources})
    lockable = {r.name for r in site.resources if r.lockable}
    print(f"  resources: {', '.join(r + (' (lockable)' if r in lockable else '') for r in resources)}")
    users = ", ".join(f"{u.name} [{'/'.join(u.roles)}]" for u in site.users)
    if site.server.accounts == "database":
        users = "from the site database (labctl user list)"
    print(f"  users: {users or '(none)'}")
    ua, ca = site.server.opcua, site.server.ca
    ua_text = f"opc.tcp://{ua.host}:{ua.port}" if ua.enabled else "off"
    ca_text = f"port {ca.port or 'from EPICS_CAS_SERVER_PORT or 5064'}" if ca.enabled else "off"
    print(f"  OPC UA: {ua_text}")
    print(f"  Channel Access: {ca_text}")
    print(f"  historian: {site.historian.url if site.historian.enabled else 'off'}")
    print(f"  interlocks: {', '.join(i.name for i in site.interlocks) or '(none)'}")
    for line in warnings:
        print(f"warning: {line}")
    return 0


def _interlock_warnings(path: Path, site: Any, db: Any) -> list[str]:
    """Interlock definitions that cannot hold (raised as a ConfigError) or may not (returned as warning lines)."""
    from labctl.ioc.interlocks import definition_problems

    from labctl.yamlmodel import LazyPositions, at_key

    found = definition_problems(site.interlocks, db.info, db.infos())
    if not found:
        return []
    positions = LazyPositions(path.read_text(encoding="utf-8"))
    errors = [f"{at_key(str(path), p, positions)}: {msg}" for p, msg, level in found if level == "error"]
    if errors:
        raise ConfigError(str(path), errors)
    return [f"{at_key(str(path), p, positions)}: {msg}" for p, msg, level in found if level == "warning"]


def _dotted(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def cmd_serve(args: argparse.Namespace) -> int:
    """Run a server until SIGINT/SIGTERM."""
    from labctl.server.app import Overrides, Server

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr
    )
    site_path = args.site or DEFAULT_SITE
    overrides = Overrides(
        state_dir=args.state_dir,
        historian_url=args.historian_url,
        server_name=args.server_name,
        opcua_host=args.opcua_host,
        opcua_port=args.opcua_port,
        ca_interfaces=args.ca_interfaces.split(",") if args.ca_interfaces else None,
        ca_port=args.ca_port,
        ca_beacon_port=args.ca_beacon_port,
        no_opcua=args.no_opcua,
        no_ca=args.no_ca,
        no_historian=args.no_historian,
    )
    server = Server.from_file(site_path, overrides)
    return asyncio.run(_serve(server, site_path))


async def _serve(server, site_path: Path) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    counts = server.db.counts()
    log.info("site %r from %s: %d PVs, %d instruments", server.site.site, site_path, counts.get("total", 0), len(server.site.instruments))
    for e in server.endpoints():
        log.info("serving %s", e)
    banner = getattr(server, "banner", None)
    if callable(banner):
        for line in banner():
            log.info("%s", line)
    log.info("ready; Ctrl-C or SIGTERM stops")
    await stop.wait()
    log.info("stopping")
    await server.stop()
    log.info("stopped")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full ``labctl`` argument parser."""
    parser = argparse.ArgumentParser(prog="labctl", description="Multi-user lab process-control server and client.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    _add_check(sub)
    for register in _extensions():
        register(sub)
    return parser


def _extensions():
    """Subcommand registrars of other modules (each ``register(subparsers)``)."""
    from labctl.clients.cli import register as client_commands
    from labctl.clients.gui import register as gui_command  # Qt is imported only when `labctl gui` runs
    from labctl.clients.tui import register as tui_command  # Textual is imported only when `labctl tui` runs
    from labctl.server.accounts import register as user_command
    from labctl.server.opcua.trust import register as pki_command
    from labctl.server.passwords import register as passwd_command
    from labctl.server.sitedir import register as servers_command
    from labctl.server.siteup import register as site_command

    return [client_commands, passwd_command, user_command, servers_command, site_command, pki_command, gui_command, tui_command]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``labctl`` console command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    except LabctlError as e:
        print(f"labctl {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
