"""Who may do what: roles, and the audit record of every write.

The write path (see :mod:`labctl.ioc.database`) asks, in order: is the PV writable at all, do
the identity's roles allow writing its resource, does the identity hold the resource's
lock, is the value acceptable, does an interlock forbid it. This module answers the role
question and defines the hooks for the others, so the arbiter and the interlocks plug in
without the database knowing their internals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from labctl.ioc.config.access import RoleConfig
from labctl.ioc.errors import PermissionDenied
from labctl.ioc.types import Identity

Capability = Literal["acknowledge", "shelve", "admin"]


class RolePolicy:
    """Role-based permissions from the site file's roles.

    The ``system`` role (the server acting on its own: interlocks, start-up) may do
    everything; an identity with no known role may do nothing but read.
    """

    def __init__(self, roles: Mapping[str, RoleConfig]) -> None:
        self.roles = dict(roles)

    def may_write(self, identity: Identity, resource: str) -> bool:
        """Whether ``identity``'s roles allow writing PVs of ``resource``."""
        if "system" in identity.roles:
            return True
        return any(self.roles[r].may_write(resource) for r in identity.roles if r in self.roles)

    def check_write(self, identity: Identity, pv: str, resource: str) -> None:
        """Raise PermissionDenied unless the roles allow the write."""
        if not self.may_write(identity, resource):
            raise PermissionDenied(pv, identity.user, resource)

    def can(self, identity: Identity, capability: Capability) -> bool:
        """Whether any of the identity's roles grants ``capability`` (admins have all)."""
        if "system" in identity.roles:
            return True
        granted = [self.roles[r] for r in identity.roles if r in self.roles]
        return any(r.admin or getattr(r, capability) for r in granted)


class LockCheck(Protocol):
    """The arbiter's part of the write path."""

    def check_write(self, identity: Identity, pv: str, resource: str, now: float) -> None:
        """Raise LockedBy unless ``identity`` may write ``resource`` now."""
        ...


class InterlockCheck(Protocol):
    """The interlocks' part of the write path."""

    def check_write(self, identity: Identity, pv: str, resource: str, value: Any) -> None:
        """Raise Interlocked if a tripped interlock forbids this write."""
        ...


class NoLocks:
    """No arbiter: lock checks always pass."""

    def check_write(self, identity: Identity, pv: str, resource: str, now: float) -> None:
        """Allow."""


class NoInterlocks:
    """No interlocks: interlock checks always pass."""

    def check_write(self, identity: Identity, pv: str, resource: str, value: Any) -> None:
        """Allow."""


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audited action: a write (accepted or refused), a lock change, a job transition."""

    time: float
    action: str
    """``write``, ``lock.grant``, ``lock.release``, ``alarm.ack``, ``job.state``..."""
    user: str
    protocol: str
    host: str
    target: str
    """The PV, resource, alarm or job acted on."""
    old: Any = None
    new: Any = None
    accepted: bool = True
    reason: str = ""

    @classmethod
    def of(cls, time: float, action: str, who: Identity, target: str, **kw: Any) -> AuditRecord:
        """Build from an identity."""
        return cls(time, action, who.user, who.protocol, who.host, target, **kw)

    def __str__(self) -> str:
        verdict = "accepted" if self.accepted else f"REFUSED ({self.reason})"
        change = f" {self.old!r} -> {self.new!r}" if self.action == "write" else (f" {self.new}" if self.new is not None else "")
        return f"{self.action} {self.target}{change} by {self.user}@{self.host or '-'} via {self.protocol}: {verdict}"
