"""The OPC UA endpoint's section of the site file (``server.opcua``)."""

from __future__ import annotations

from typing import Literal

from labctl.ioc.config.base import Model
from pydantic import Field


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


class OpcUaConfig(Model):
    """The OPC UA endpoint."""

    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(4840, ge=0, le=65535)
    """TCP port; 0 picks a free one."""
    security: tuple[Literal["None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"], ...] = (
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
