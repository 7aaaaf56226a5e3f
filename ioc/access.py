"""The write path's hooks, and the audit record of every action.

The write path (see :mod:`labctl.ioc.database`) asks, in order: is the PV writable at all, do
the identity's roles allow writing its resource (:mod:`labctl.ioc.policy` decides), does the
identity hold the resource's lock, is the value acceptable, does an interlock forbid it.
This module defines the hooks for the lock and interlock checks, so the arbiter and the
interlocks plug in without the database knowing their internals, and the audit record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from labctl.ioc.types import Identity


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
