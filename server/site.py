"""The complete site file: the core's sections and the server's, read with positions in every error.

Theory of operation: :class:`~labctl.ioc.config.site.CoreSiteConfig` holds what the
process database is built from; the server adds the sections of its own parts -- the
process settings and protocol adapters (``server``: :class:`ServerConfig`, with
:class:`~labctl.server.opcua.config.OpcUaConfig` and :class:`~labctl.server.ca.config.CAConfig`,
and the server's place in a site of several: ``name``, ``accounts`` and ``directory``,
:mod:`labctl.server.siteinfo`),
the historian (:class:`~labctl.server.historian.config.HistorianConfig`) and alarm
notifications (:class:`~labctl.server.notify.NotificationsConfig`) -- and the checks
that span them and the core's (a role named by a Channel Access rule; never one of the
names reserved for the server's internal actors). A new adapter adds
its section here and never touches ``ioc/``. Reading is the core's loader
(:mod:`labctl.ioc.config.loader`) with this model: the same YAML rules and the same
``file:line:col key.path: message`` lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from labctl.ioc.config import loader
from labctl.ioc.config.base import Model
from labctl.ioc.config.site import CoreSiteConfig, reserved_message
from labctl.ioc.types import reserved
from labctl.server.autosave import AutosaveConfig
from labctl.server.ca.config import CAConfig
from labctl.server.historian.config import HistorianConfig
from labctl.server.notify import NotificationsConfig
from labctl.server.opcua.config import OpcUaConfig
from labctl.server.siteinfo import SERVER_NAME, AccountSource, DirectoryConfig
from pydantic import Field


class ServerConfig(Model):
    """Process-level settings."""

    state_dir: str = "./var"
    """Where the server keeps its state (history, spool, certificates), relative to the working directory."""
    name: str | None = Field(None, pattern=SERVER_NAME.pattern)
    """This server's name in its site's directory (default: this host's name up to its first dot).
    Unique among the servers of a site: give each server of a host its own."""
    accounts: AccountSource = "site_file"
    """Where OPC UA accounts come from: ``site_file`` (the ``users`` of this file) or ``database``
    (the site's accounts in the PostgreSQL historian database, managed with ``labctl user``)."""
    directory: DirectoryConfig = DirectoryConfig()
    """The site directory (servers, PV owners) in a PostgreSQL historian database."""
    opcua: OpcUaConfig = OpcUaConfig()
    ca: CAConfig = CAConfig()


class SiteConfig(CoreSiteConfig):
    """The whole site."""

    server: ServerConfig = ServerConfig()
    historian: HistorianConfig = HistorianConfig()
    autosave: AutosaveConfig = AutosaveConfig()
    """Saving writable PVs' values across restarts (as EPICS autosave)."""
    notifications: NotificationsConfig = NotificationsConfig()
    """Alarm notification sinks and rate limits."""

    def state_path(self) -> Path:
        """The state directory."""
        return Path(self.server.state_dir)

    def cross_check(self) -> list[tuple[tuple[Any, ...], str]]:
        """Problems that span several keys, as (key path, message): the core's, then the server's."""
        problems = super().cross_check()
        roles = self.all_roles
        directory = self.server.directory
        if directory.lapse_s < 2 * directory.heartbeat_s:
            problems.append(
                (("server", "directory", "lapse_s"),
                 f"must be at least twice heartbeat_s ({directory.heartbeat_s:g} s), so one late heartbeat does not mark "
                 f"the server down; got {directory.lapse_s:g}")
            )  # fmt: skip
        if self.server.accounts == "database":
            if self.users:
                problems.append(
                    (("users",), "server.accounts is 'database': the site's accounts live in its database "
                                 "(labctl user add); remove users from this file")
                )  # fmt: skip
            if not directory.enabled:
                problems.append((("server", "directory", "enabled"), "server.accounts 'database' needs the site directory"))
        for ri, rule in enumerate(self.server.ca.access.rules):
            for r in rule.roles:
                if reserved(r):  # never grantable, defined or not: say so rather than "unknown"
                    problems.append((("server", "ca", "access", "rules", ri, "roles"), reserved_message("role", r)))
                elif r not in roles:
                    problems.append(
                        (("server", "ca", "access", "rules", ri, "roles"), f"unknown role {r!r}; defined: {sorted(roles)}")
                    )
        return problems


def parse_site(text: str, source: str = "<site>") -> SiteConfig:
    """Validate the YAML text of a site file; raise ConfigError listing every problem."""
    return loader.parse_site(text, source, SiteConfig)


def load_site(path: str | Path) -> SiteConfig:
    """Read and validate a site file."""
    return loader.load_site(path, SiteConfig)
