"""``labctl tui``: the operator's terminal UI (Textual), over the client session library.

This module only registers the command; Textual is imported when the command runs, so
``labctl serve`` and the other commands never load it. The connection options are the
client commands' (``--url``/``LABCTL_URL``, ``--user``/``LABCTL_USER``, ``--security``);
the password comes from ``LABCTL_PASSWORD`` or a prompt, never from the command line.
"""

from __future__ import annotations

import argparse
import os
import sys

from labctl.clients.credentials import NoPassword, password_for

DEFAULT_URL = "opc.tcp://localhost:4840"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``labctl tui`` to the ``labctl`` command."""
    p = subparsers.add_parser("tui", help="operator terminal UI: browse, watch and write PVs; alarms, locks, jobs")
    p.add_argument("--url", default=os.environ.get("LABCTL_URL", DEFAULT_URL), help=f"server endpoint (LABCTL_URL; default {DEFAULT_URL})")
    p.add_argument("--user", default=os.environ.get("LABCTL_USER"), help="user name (LABCTL_USER); the password comes from LABCTL_PASSWORD or a prompt")
    p.add_argument(
        "--security",
        default=os.environ.get("LABCTL_SECURITY", "auto"),
        choices=["auto", "None", "Sign", "SignAndEncrypt"],
        help="channel security, Basic256Sha256 (LABCTL_SECURITY; default auto: the most secure offered)",
    )
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds each request may take (default 10)")
    p.add_argument(
        "--theme",
        default=os.environ.get("LABCTL_TUI_THEME", "auto"),
        help="Textual theme (LABCTL_TUI_THEME; default auto: ansi-dark on 16-colour terminals, else textual-dark)",
    )
    p.set_defaults(func=cmd_tui)


def cmd_tui(args: argparse.Namespace) -> int:
    """Run the terminal UI until the user quits."""
    import logging

    from labctl.extras import MissingExtra, require

    try:
        require("tui")
    except MissingExtra as e:
        print(f"labctl tui: {e}", file=sys.stderr)
        return 1

    from labctl.clients.tui.app import LabctlApp
    from textual.logging import TextualHandler

    # Log records would draw over the screen: they go to Textual's log (``textual console``) instead;
    # what the operator needs (connection state, refusals) the UI shows itself.
    logging.basicConfig(level=logging.WARNING, handlers=[TextualHandler()], format="%(levelname)s %(name)s: %(message)s", force=True)
    from textual.theme import BUILTIN_THEMES

    if args.theme != "auto" and args.theme not in BUILTIN_THEMES:
        print(f"labctl tui: no theme {args.theme!r}; choose auto or one of {', '.join(sorted(BUILTIN_THEMES))}", file=sys.stderr)
        return 2
    try:
        password = password_for(args.user)
    except NoPassword as e:
        print(f"labctl tui: {e}", file=sys.stderr)
        return 2
    app = LabctlApp(args.url, args.user, password, args.security, timeout_s=args.timeout, theme=args.theme)
    app.run()
    return app.return_code or 0
