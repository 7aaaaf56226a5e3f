"""The write path's hooks, and the audit record of every action.

The write path (see :mod:`labctl.ioc.database`) asks, in order: is the PV writable at all, do
the identity's roles allow writing its resource (:mod:`labctl.ioc.policy` decides), does the
identity hold the resource's lock, is the value acceptable, does an interlock forbid it.
This module defines the hooks for the lock and interlock checks, so the arbiter and the
interlocks plug in without the database knowing their internals, the audit record, and
the :class:`AuditJournal` hook through which the write path waits until its record is
durable (the server's journal, :mod:`labctl.server.journal`; the core stores nothing).
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

from labctl.ioc.types import Identity

#: The audit action of a write the instrument took but whose read-back failed: not
#: refused (``accepted`` is True), not confirmed either. A value of the ``action`` column,
#: so the historian's audit table and every older record stay as they are.
WRITE_UNCONFIRMED = "write.unconfirmed"


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


class AuditJournal(Protocol):
    """Where audit records become durable (the server's journal); the write path awaits it."""

    healthy: bool
    """False while records cannot be made durable: writes are refused before they reach an instrument."""

    def append(self, record: AuditRecord) -> Awaitable[None]:
        """Queue ``record`` (called on the loop, in audit order); the awaitable resolves once it is durable.

        It raises OSError if the record could not be made durable.
        """
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
    uid: str = field(default="", compare=False)
    """A unique id, given by :meth:`labctl.ioc.database.Database.audit` ("" before): the archive's key,
    so a record handed to the historian twice (a journal replayed after a crash) is stored once."""

    @classmethod
    def of(cls, time: float, action: str, who: Identity, target: str, **kw: Any) -> AuditRecord:
        """Build from an identity."""
        return cls(time, action, who.user, who.protocol, who.host, target, **kw)

    @property
    def outcome(self) -> str:
        """``accepted``, ``refused``, or ``written-unconfirmed`` (the instrument took it; the read-back failed)."""
        if not self.accepted:
            return "refused"
        return "written-unconfirmed" if self.action == WRITE_UNCONFIRMED else "accepted"

    def __str__(self) -> str:
        outcome = self.outcome
        verdict = {"accepted": "accepted", "refused": f"REFUSED ({self.reason})"}.get(outcome, f"written, NOT CONFIRMED ({self.reason})")
        is_write = self.action in ("write", WRITE_UNCONFIRMED)
        change = f" {self.old!r} -> {self.new!r}" if is_write else (f" {self.new}" if self.new is not None else "")
        return f"{self.action} {self.target}{change} by {self.user}@{self.host or '-'} via {self.protocol}: {verdict}"
