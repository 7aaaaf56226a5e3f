"""``labctl gui``: the control-room display (Qt + pyqtgraph).

Strip charts that open with recent history and go on live, an alarm banner with
acknowledge, big value panels with alarm colours, lock, job-queue and interlock tables,
arranged by a YAML layout (:mod:`labctl.clients.gui.layout`) or by a default built from the
site; large-font mode for wall screens; reconnects by itself after a server restart.

Modules: :mod:`~labctl.clients.gui.layout` (the layout schema, pure), :mod:`~labctl.clients.gui.buffers`
(ring buffers, pure), :mod:`~labctl.clients.gui.link` (the network side: a worker thread with
its own asyncio loop), :mod:`~labctl.clients.gui.window` and :mod:`~labctl.clients.gui.widgets` (the
Qt side), :mod:`~labctl.clients.gui.app` (start-up).

This module imports no Qt, so registering the command costs ``labctl serve`` nothing;
Qt is loaded when ``labctl gui`` runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from labctl.clients.credentials import password_for

DEFAULT_URL = "opc.tcp://localhost:4840"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``labctl gui`` to the ``labctl`` command."""
    p = subparsers.add_parser(
        "gui",
        help="open the control-room display (strip charts, alarm banner, values, locks, jobs)",
        description="Open the control-room display. The password comes from LABCTL_PASSWORD or a prompt.",
    )
    p.add_argument("--url", default=os.environ.get("LABCTL_URL", DEFAULT_URL), help=f"server endpoint (LABCTL_URL; default {DEFAULT_URL})")
    p.add_argument("--user", default=os.environ.get("LABCTL_USER"), help="user name (LABCTL_USER); anonymous (read-only) when absent")
    p.add_argument(
        "--security",
        default=os.environ.get("LABCTL_SECURITY", "auto"),
        choices=["auto", "None", "Sign", "SignAndEncrypt"],
        help="channel security, Basic256Sha256 (LABCTL_SECURITY; default auto: the most secure offered)",
    )
    p.add_argument("--layout", type=Path, metavar="LAYOUT.yaml", help="screen layout (default: one built from the site's PVs)")
    p.add_argument("--large", action="store_true", help="large-font control-room mode")
    p.add_argument(
        "--screenshot",
        type=Path,
        metavar="FILE.png",
        help="save a picture of the window once its data has arrived, then exit (runs offscreen)",
    )
    p.add_argument("--screenshot-after", type=float, default=2.0, metavar="S", help="with --screenshot: collect live data this long first (default 2)")
    p.set_defaults(func=cmd_gui)


def cmd_gui(args: argparse.Namespace) -> int:
    """Run the display until its window closes."""
    from labctl.extras import MissingExtra, require

    try:
        require("gui")
    except MissingExtra as e:
        print(f"labctl gui: {e}", file=sys.stderr)
        return 1
    from labctl.clients.gui.layout import load_layout

    layout = load_layout(args.layout) if args.layout is not None else None  # a bad file stops here, before any window
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)  # lost connections are shown in the window, not as tracebacks
    if args.screenshot is not None:
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from labctl.clients.gui.app import QtBindingError, run

    try:
        return run(
            args.url,
            args.user,
            password_for(args.user, required=False),  # without a terminal, the window asks
            args.security,
            layout=layout,
            large=args.large,
            screenshot=args.screenshot,
            screenshot_after_s=args.screenshot_after,
        )
    except QtBindingError as e:
        print(f"labctl gui: {e}", file=sys.stderr)
        return 1
