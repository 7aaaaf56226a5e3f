"""The OPC UA endpoint's section of the site file (``server.opcua``)."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

from labctl.ioc.config.base import Model
from pydantic import AfterValidator, Field, field_validator, model_validator

#: The port of a Local Discovery Server, when a discovery URL names none (OPC UA Part 12).
LDS_PORT = 4840

#: The security policies a site file names (``security``, ``discovery.security``).
SecurityPolicyName = Literal["None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"]


def discovery_url(url: str) -> str:
    """``url`` as an ``opc.tcp://host:port[/path]`` URL (the port defaults to :data:`LDS_PORT`), else a ValueError."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{url!r} is not a URL: {e}") from None
    if parts.scheme != "opc.tcp":
        raise ValueError(f"expected an opc.tcp:// URL of a discovery server, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host")
    if parts.username is not None or parts.query or parts.fragment:
        raise ValueError(f"{url!r}: a discovery URL has no user, query or fragment")
    if port is None:
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        parts = parts._replace(netloc=f"{host}:{LDS_PORT}")
    if port == 0:
        raise ValueError(f"{url!r}: port 0 is no port to connect to")
    return parts.geturl()


DiscoveryUrl = Annotated[str, AfterValidator(discovery_url)]


class OpcUaLimits(Model):
    """What OPC UA clients can make the server hold (exceeding one is logged once per session or connection)."""

    connections: int = Field(256, ge=1, le=100_000)
    """TCP connections at once (a secure channel each); further ones are closed as they connect."""
    sessions: int = Field(128, ge=1, le=100_000)
    """Sessions at once, activated or not; CreateSession beyond is answered BadTooManySessions."""
    subscriptions_per_session: int = Field(64, ge=1, le=100_000)
    """CreateSubscription beyond this is answered BadTooManySubscriptions."""
    monitored_items_per_session: int = Field(20_000, ge=1, le=10_000_000)
    """Monitored items over all of a session's subscriptions; further ones get BadTooManyMonitoredItems."""
    queue_size: int = Field(1_000, ge=1, le=100_000)
    """Largest queue a monitored item may ask for (notifications kept while the client is behind)."""
    max_message_bytes: int = Field(16 * 2**20, ge=2**16, le=2**31 - 1)
    """Largest request message (all its chunks); a larger one closes the connection."""
    notifications_per_publish: int = Field(250, ge=1, le=1_000_000)
    """Most data changes and events in one PublishResponse; more follow at once in the next
    responses (MoreNotifications), oldest first. A client's smaller MaxNotificationsPerPublish
    is honoured. Small responses reach the client sooner: a thousand notifications in one take
    ~15 ms to encode and decode before the first of them is usable."""


class DiscoveryConfig(Model):
    """Registration with OPC UA discovery servers (``server.opcua.discovery``; OPC UA Part 12)."""

    urls: tuple[DiscoveryUrl, ...]
    """Discovery servers (Local Discovery Servers) to register with: ``opc.tcp://host[:port]``, the
    port 4840 when none is given. The server registers at start and every ``period_s``, and says it
    is offline when it stops; one that cannot be reached is logged once and tried again next period."""
    period_s: float = Field(60.0, gt=0, le=600)
    """Seconds between two registrations. At most 600: a discovery server forgets a server that has
    not registered again within 10 minutes (OPC UA Part 4, RegisterServer)."""
    timeout_s: float = Field(5.0, gt=0, le=60)
    """How long one registration (connecting, the secure channel, the request) may take."""
    security: SecurityPolicyName = "Basic256Sha256_SignAndEncrypt"
    """The secure channel to the discovery server, opened with this server's own application
    certificate (``<state_dir>/pki/server_cert.der``), which the discovery server must trust; it
    accepts a registration only over a signed channel whose certificate names the registered
    ApplicationUri. ``None`` only for discovery servers that accept unsigned registrations. The
    registration carries no user credentials."""

    @field_validator("urls")
    @classmethod
    def _distinct(cls, urls: tuple[str, ...]) -> tuple[str, ...]:
        if not urls:
            raise ValueError("list at least one discovery server URL (or leave discovery out)")
        seen = [u.lower() for u in urls]
        for i, u in enumerate(seen):
            if seen.index(u) != i:
                raise ValueError(f"{urls[i]!r} is listed twice")
        return urls


class OpcUaConfig(Model):
    """The OPC UA endpoint."""

    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(4840, ge=0, le=65535)
    """TCP port; 0 picks a free one."""
    security: tuple[SecurityPolicyName, ...] = (
        "None",
        "Basic256Sha256_Sign",
        "Basic256Sha256_SignAndEncrypt",
    )
    """Security policies offered (one endpoint each). ``None`` serves anonymous reads to any client
    and passwords only encrypted under Basic256Sha256 with this session's nonce (which needs
    ``Basic256Sha256_SignAndEncrypt`` offered too); a session over ``None`` is itself neither
    signed nor encrypted, so drop ``None`` outside a localhost demo. Over ``Basic256Sha256_Sign``
    a password must travel encrypted in its token; over ``SignAndEncrypt`` the channel encrypts it."""
    anonymous: bool = True
    """Allow anonymous (read-only) sessions."""
    trust: Literal["list", "auto"] = "list"
    """Client application certificates (Sign, SignAndEncrypt): ``list`` accepts only those in
    ``<state_dir>/pki/trusted`` (or issued by a CA there) and saves unknown ones in
    ``pki/rejected`` for ``labctl pki trust``; ``auto`` trusts every unknown certificate that is
    within its validity period on first use (a demo or test site: any program that reaches the
    port may then open a secure channel, users still log in)."""
    login_workers: int = Field(2, ge=1, le=16)
    """Threads that check passwords (one scrypt each, ~16 MiB and tens of ms): never the event loop."""
    login_pending: int = Field(32, ge=1, le=10_000)
    """Password checks waiting or running at most; further logins are refused at once (BadTooManyOperations)."""
    login_free_failures: int = Field(5, ge=1, le=1000)
    """Consecutive failed logins of one account from one address before that address is slowed down
    for that account (the back-off doubles from 1 s up to ``login_max_backoff_s``); an address's
    failures over all accounts are allowed three times as many."""
    login_max_backoff_s: float = Field(60.0, gt=0, le=86_400)
    """Longest refusal after repeated failed logins."""
    limits: OpcUaLimits = OpcUaLimits()
    """Per-client resource limits."""
    discovery: DiscoveryConfig | None = None
    """Discovery servers to register with (none by default)."""

    @model_validator(mode="after")
    def _discovery_needs_endpoint(self) -> OpcUaConfig:
        if self.discovery is not None and not self.enabled:
            raise ValueError("discovery needs the OPC UA endpoint, which enabled: false switches off")
        return self
