"""The Channel Access server's section of the site file (``server.ca``), with its access rules."""

from __future__ import annotations

from labctl.ioc.config.base import Model
from pydantic import Field


class CAAccessRule(Model):
    """Grants roles to Channel Access clients whose self-reported user and host match."""

    users: tuple[str, ...] = ("*",)
    """User group names or user names (globs allowed)."""
    hosts: tuple[str, ...] = ("*",)
    """Host group names or host names/addresses (globs allowed)."""
    roles: tuple[str, ...]
    """Roles granted to matching clients."""


class CAAccessConfig(Model):
    """Channel Access security, in the spirit of an EPICS ACF. No rule matched: read-only."""

    user_groups: dict[str, tuple[str, ...]] = {}
    host_groups: dict[str, tuple[str, ...]] = {}
    rules: tuple[CAAccessRule, ...] = ()
    check_client_ip: bool = False
    """Match ``hosts`` against the client's IP address, which a client cannot forge on a TCP
    connection, instead of the host name it reports (EPICS ``asCheckClientIP``)."""


class CAConfig(Model):
    """The Channel Access server. ``EPICS_CAS_*`` environment variables apply unless set here."""

    enabled: bool = True
    prefix: str = ""
    """Prepended to every PV name on Channel Access."""
    interfaces: tuple[str, ...] | None = None
    """Addresses to bind (default: ``EPICS_CAS_INTF_ADDR_LIST`` or all)."""
    port: int | None = Field(None, ge=0, le=65535)
    """TCP/UDP server port (default: ``EPICS_CAS_SERVER_PORT`` or 5064)."""
    beacon_port: int | None = Field(None, ge=0, le=65535)
    """Beacon port (default: ``EPICS_CAS_BEACON_PORT`` or 5065)."""
    access: CAAccessConfig = CAAccessConfig()
