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


class CALimits(Model):
    """What one Channel Access client can make the server hold (exceeding one is logged once per client)."""

    max_array_bytes: int | None = Field(None, ge=16_384, le=2**31 - 1)
    """Largest message payload a client may send, in bytes (as ``EPICS_CA_MAX_ARRAY_BYTES``): a
    client announcing more is disconnected as soon as the message header arrives, before its data
    is read. Default: ``EPICS_CAS_MAX_ARRAY_BYTES``/``EPICS_CA_MAX_ARRAY_BYTES`` if set, else 16 384
    (an IOC's default) plus what the largest PV's value needs."""
    clients: int = Field(1_000, ge=1, le=1_000_000)
    """Client connections served at once; further ones are closed as they connect."""
    channels_per_client: int = Field(20_000, ge=1, le=10_000_000)
    """Channels one client may have open; further ones fail to connect (the client sees a channel
    that never connects, as for a PV not served)."""
    subscriptions_per_client: int = Field(40_000, ge=1, le=10_000_000)
    """Monitors one client may have; further ones are answered ECA_ALLOCMEM."""
    send_queue_bytes: int = Field(4 * 2**20, ge=64 * 2**10, le=2**30)
    """Bytes waiting to be sent to one client beyond which only the latest update of each of its
    monitors is kept (on every monitor path) until it has read most of them."""
    requests_per_client: int = Field(1_000, ge=1, le=100_000)
    """Requests received from one client and not yet processed; past this the server stops reading
    that client's connection until it catches up (TCP flow control)."""


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
    name_service: bool = True
    """In a site (a PostgreSQL historian with the site directory): answer name searches that
    arrive over TCP (clients' ``EPICS_CA_NAME_SERVERS``) for the PVs of the site's other servers
    too, with the address of the server that owns each. ``false``: only this server's PVs."""
    access: CAAccessConfig = CAAccessConfig()
    limits: CALimits = CALimits()
    """Per-client resource limits."""
