"""labctl: a multi-user lab process-control server, and the clients that talk to it.

Everything imports from this one namespace; the project's folders are its subpackages:

* :mod:`labctl.ioc` -- the process database: PVs, write path, arbiter, jobs, alarms,
  interlocks (protocol-, hardware- and storage-free);
* :mod:`labctl.drivers` -- instruments (pyvisa drivers, simulations);
* :mod:`labctl.server` -- the protocol adapters (OPC UA, Channel Access), the historian
  and the ``labctl`` command;
* :mod:`labctl.clients` -- the client library, the command-line client, the terminal UI
  (:mod:`labctl.clients.tui`, extra ``tui``) and the control-room display
  (:mod:`labctl.clients.gui`, extra ``gui``);
* :mod:`labctl.config` -- the bundled demo site and display layout.

For scripts and notebooks::

    from labctl import connect              # blocking
    with connect("opc.tcp://localhost:4840", user="operator", password="...") as s:
        s.get("CRYO:MXC:TEMP").value

    from labctl.aio import connect          # async: ``async with await connect(...) as s``

The names below are imported on first use, so ``import labctl.ioc`` (or starting the
server) does not load the client library.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("labctl")
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from labctl.clients.sync import SyncSession, connect

__all__ = ["SyncSession", "__version__", "connect"]


def __getattr__(name: str) -> Any:
    if name in ("connect", "SyncSession"):
        from labctl.clients import sync

        return getattr(sync, name)
    raise AttributeError(f"module 'labctl' has no attribute {name!r}")
