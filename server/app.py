"""Wiring: a site file becomes a running server.

:class:`Server` builds the process database from the site file, attaches a driver per
instrument, and starts the *services* (protocol adapters, historian) around it. A
service is anything with ``async start()``, ``async stop()`` and ``endpoints()``; each
one subscribes to the database once and does its own fan-out. Adding a protocol is one
new service module and one line in :func:`build_services`. A service may also have
``async serving()``, called once every service has started (the site directory then
publishes the endpoints the protocols bound).

With a PostgreSQL historian the server is one of a site's servers: the site directory
service (:mod:`labctl.server.sitedir`) starts first and stops last, and with
``server.accounts: database`` the accounts service (:mod:`labctl.server.accounts`) serves
the site's accounts to the OPC UA logins.

Overrides (ports, interfaces, historian URL, state directory) are applied to the
validated site model before anything starts, so two servers can run side by side.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from labctl.drivers.registry import create_driver, create_plant
from labctl.ioc.build import build_database
from labctl.ioc.database import Database
from labctl.ioc.errors import LabctlError
from labctl.server.site import SiteConfig, load_site
from labctl.server.siteinfo import check_server_name, is_site_database
from labctl.server.tuning import freeze_long_lived, gc_paused, thaw

log = logging.getLogger("labctl")


class Service(Protocol):
    """A part of the server that runs beside the database (protocol adapter, historian)."""

    name: str

    async def start(self) -> None:
        """Start serving; return once ready (ports bound)."""
        ...

    async def stop(self) -> None:
        """Stop serving and release every resource."""
        ...

    def endpoints(self) -> list[str]:
        """Human-readable addresses this service offers (for the start-up banner)."""
        ...


@dataclass
class Overrides:
    """Command-line settings that replace the site file's."""

    state_dir: str | None = None
    historian_url: str | None = None
    server_name: str | None = None
    opcua_host: str | None = None
    opcua_port: int | None = None
    ca_interfaces: Sequence[str] | None = None
    ca_port: int | None = None
    ca_beacon_port: int | None = None
    no_opcua: bool = False
    no_ca: bool = False
    no_historian: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def apply(self, site: SiteConfig) -> SiteConfig:
        """A copy of ``site`` with these overrides."""
        server = site.server
        opcua = server.opcua.model_copy(
            update={
                k: v
                for k, v in {
                    "host": self.opcua_host,
                    "port": self.opcua_port,
                    "enabled": False if self.no_opcua else None,
                }.items()
                if v is not None
            }
        )
        ca = server.ca.model_copy(
            update={
                k: v
                for k, v in {
                    "interfaces": tuple(self.ca_interfaces) if self.ca_interfaces else None,
                    "port": self.ca_port,
                    "beacon_port": self.ca_beacon_port,
                    "enabled": False if self.no_ca else None,
                }.items()
                if v is not None
            }
        )
        server = server.model_copy(
            update={
                "opcua": opcua,
                "ca": ca,
                **({"state_dir": self.state_dir} if self.state_dir else {}),
                **({"name": check_server_name(self.server_name, "--server-name")} if self.server_name else {}),
            }
        )
        historian = site.historian.model_copy(
            update={
                k: v
                for k, v in {"url": self.historian_url, "enabled": False if self.no_historian else None}.items()
                if v is not None
            }
        )
        return site.model_copy(update={"server": server, "historian": historian})


class Server:
    """A labctl server: database, instruments and services for one site."""

    def __init__(self, site: SiteConfig, *, base_dir: Path | str = ".", source: str = "site file") -> None:
        self.site = site
        self.base_dir = Path(base_dir)
        self.state_dir = Path(site.server.state_dir)
        with gc_paused():  # a large site is a million long-lived objects (see server.tuning)
            self.db: Database = build_database(site, self.base_dir, source=source)
        self.plants = {name: create_plant(name, cfg) for name, cfg in site.simulations.items()}
        for inst in site.instruments:
            driver = create_driver(inst, simulations=self.plants, base_dir=self.base_dir)
            self.db.attach(
                driver,
                timeout_s=inst.timeout_s,
                reconnect_min_s=inst.reconnect_min_s,
                reconnect_max_s=inst.reconnect_max_s,
            )
        with gc_paused():  # services index every PV: long-lived objects only (see server.tuning)
            self.services: list[Service] = build_services(self)
        self._stopped = asyncio.Event()
        self._frozen = False

    @classmethod
    def from_file(cls, path: str | Path, overrides: Overrides | None = None) -> Server:
        """Load, override and build."""
        site = load_site(path)
        if overrides is not None:
            site = overrides.apply(site)
        return cls(site, base_dir=Path(path).resolve().parent, source=str(path))

    def service(self, name: str) -> Service:
        """A running service by name (``opcua``, ``ca``, ``historian``)."""
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)

    async def start(self) -> None:
        """Create the state directory, start services, then the instruments."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        started: list[Service] = []
        try:
            for s in self.services:
                await s.start()
                started.append(s)
            await self.db.start()
            for s in self.services:
                serving = getattr(s, "serving", None)
                if callable(serving):
                    await serving()
        except BaseException:
            for s in reversed(started):
                await s.stop()
            raise
        freeze_long_lived()  # what start-up built lives as long as the server (see server.tuning)
        self._frozen = True

    async def stop(self) -> None:
        """Stop in an order that loses nothing.

        Protocols and the control layer first (no new writes; running jobs end cancelled
        while the database still runs), then the instruments, then storage services
        (``storage = True``: the historian), so the last states are archived.
        """
        storage = [s for s in self.services if getattr(s, "storage", False)]
        for s in reversed([s for s in self.services if s not in storage]):
            await self._stop_service(s)
        await self.db.stop()
        for s in reversed(storage):
            await self._stop_service(s)
        if self._frozen:
            thaw()
            self._frozen = False
        self._stopped.set()

    @staticmethod
    async def _stop_service(s: Service) -> None:
        try:
            await s.stop()
        except Exception:  # keep stopping the others; this is the boundary that reports bugs
            log.exception("stopping %s failed", s.name)

    def endpoints(self) -> list[str]:
        """Every endpoint of every service."""
        return [e for s in self.services for e in s.endpoints()]

    def banner(self) -> list[str]:
        """Start-up lines of every service that has something to tell (accounts, security)."""
        return [line for s in self.services if callable(getattr(s, "banner", None)) for line in s.banner()]

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def build_services(server: Server) -> list[Service]:
    """The services a site asks for, in start order (storage first, then protocols)."""
    services: list[Service] = []
    from labctl.server.control import ControlService

    site_url = server.site.historian.url
    if server.site.server.accounts == "database" and not is_site_database(site_url):
        raise LabctlError(
            f"server.accounts is 'database', but the historian URL {site_url.split(':', 1)[0]}:... is not PostgreSQL: "
            "site-wide accounts live in the site's PostgreSQL database (or set server.accounts: site_file)"
        )
    accounts = None
    if is_site_database(site_url) and server.site.server.directory.enabled:
        # First: PV ownership is checked before anything is archived or served.
        from labctl.server.sitedir import SiteDirectoryService

        services.append(SiteDirectoryService(server))
        if server.site.server.accounts == "database":
            from labctl.server.accounts import AccountsService

            accounts = AccountsService(server)
            services.append(accounts)
    historian = None
    if server.site.historian.enabled:
        # Storage first: the control layer restores jobs and alarm states from it when it
        # starts, and the protocol services serve history from it.
        from labctl.server.historian import HistorianService

        historian = HistorianService(server)
        services.append(historian)
        # Right after it: an accepted write's audit record is fsync'ed to the journal before
        # the write is acknowledged, and an earlier run's journal is replayed into the historian.
        from labctl.server.journal import AuditJournalService

        services.append(AuditJournalService(server, historian))
    if server.site.autosave.enabled:
        # After the historian (restores are archived and audited), before the control layer
        # and the protocols: server-kept PVs have their saved values before anyone connects.
        from labctl.server.autosave import AutosaveService

        services.append(AutosaveService(server))
    server.control = ControlService(server)
    if historian is not None:
        server.control.use_store(historian)
    services.append(server.control)
    if server.site.server.opcua.enabled:
        from labctl.server.opcua import OpcUaService

        opcua = OpcUaService(server)
        if historian is not None:
            opcua.serve_history_from(historian)
        if accounts is not None:
            accounts.attach(opcua)
        services.append(opcua)
    if server.site.server.ca.enabled:
        from labctl.server.ca import CAService

        services.append(CAService(server))
    return services
