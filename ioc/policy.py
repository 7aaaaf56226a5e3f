"""Who may do what: one decision for every action a user can take.

Theory of operation. Every action a person or a client can ask labctl for -- write a PV,
take, renew, release or break a lock, submit, cancel or read a job, acknowledge or shelve
an alarm, reset an interlock, read the audit trail, list what there is -- is named by an
:class:`Action` and decided here, by :meth:`Policy.decide`, from three things: the
identity asking (its roles), the action, and the :class:`Target` (with what the decision
needs to know of it: the resource a PV belongs to, a job's owner, the roles a procedure
or an interlock names). It answers by returning, or by raising :class:`Forbidden` with
the action, the target and what would have allowed it. Nothing else in labctl checks a
role: the write path, the control layer and the protocol adapters ask this module, so
OPC UA and Channel Access (and the job runner, and any future protocol) decide alike.

The decision is *permission* only; whether the target's state allows the action (a lock
held by someone else, a job already finished) is the business of the part that owns
that state, and is checked after the permission, so a caller without the right learns
nothing about the state of what they may not touch.

The roles come from the site file (``roles:``, on top of the four defaults viewer,
operator, expert, admin). The README's table of what each demo account may do is tested
against this module's decisions for the demo site.

Internal actors (interlocks, jobs run on behalf of nobody, the server itself) act under
identities only the code makes (:func:`labctl.ioc.types.internal_identity`, marked by
``Identity.internal``, never by a role name): they are allowed everything here, and the
rule they still obey (a tripped interlock's safe values) is a state check that follows.
A role a site file names -- even one called ``system`` -- grants only what its
configuration says; the site loader refuses the reserved names outright.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from labctl.ioc.config.access import RoleConfig
from labctl.ioc.errors import Forbidden, PermissionDenied
from labctl.ioc.types import Identity


class Action(enum.StrEnum):
    """Everything a user can ask for. The value is the audit record's action (a PV write's is ``write``)."""

    PV_WRITE = "write"
    LOCK_LIST = "lock.list"
    LOCK_REQUEST = "lock.request"
    LOCK_RENEW = "lock.renew"
    LOCK_RELEASE = "lock.release"
    LOCK_BREAK = "lock.break"
    PROCEDURE_LIST = "procedure.list"
    JOB_LIST = "job.list"
    JOB_SUBMIT = "job.submit"
    JOB_VIEW = "job.view"
    JOB_CANCEL = "job.cancel"
    ALARM_LIST = "alarm.list"
    ALARM_ACK = "alarm.ack"
    ALARM_SHELVE = "alarm.shelve"
    ALARM_UNSHELVE = "alarm.unshelve"
    INTERLOCK_LIST = "interlock.list"
    INTERLOCK_RESET = "interlock.reset"
    AUDIT_READ = "audit.read"


#: How a refusal names each action ({} is the target).
VERBS: dict[Action, str] = {
    Action.PV_WRITE: "write {}",
    Action.LOCK_LIST: "list locks",
    Action.LOCK_REQUEST: "lock {}",
    Action.LOCK_RENEW: "renew the lock of {}",
    Action.LOCK_RELEASE: "release the lock of {}",
    Action.LOCK_BREAK: "break the lock of {}",
    Action.PROCEDURE_LIST: "list procedures",
    Action.JOB_LIST: "list jobs",
    Action.JOB_SUBMIT: "submit {}",
    Action.JOB_VIEW: "read the log and results of {}",
    Action.JOB_CANCEL: "cancel {}",
    Action.ALARM_LIST: "list alarms",
    Action.ALARM_ACK: "acknowledge the alarm of {}",
    Action.ALARM_SHELVE: "shelve the alarm of {}",
    Action.ALARM_UNSHELVE: "unshelve the alarm of {}",
    Action.INTERLOCK_LIST: "list interlocks",
    Action.INTERLOCK_RESET: "reset interlock {}",
    Action.AUDIT_READ: "read the audit trail",
}

#: Actions anyone may take, anonymous sessions included: reading what there is.
PUBLIC = frozenset({Action.LOCK_LIST, Action.PROCEDURE_LIST, Action.JOB_LIST, Action.ALARM_LIST, Action.INTERLOCK_LIST})
#: Actions on a resource's PVs or lock: a role that may write the resource.
ON_RESOURCE = frozenset({Action.PV_WRITE, Action.LOCK_REQUEST, Action.LOCK_RENEW, Action.LOCK_RELEASE})


@dataclass(frozen=True, slots=True)
class Target:
    """What an action is aimed at, with what the decision needs to know of it."""

    name: str
    """The PV, resource, ``job:<id>``, procedure, alarm source or interlock, as audited."""
    resource: str | None = None
    """PV writes and lock operations: the resource."""
    owner: str | None = None
    """Job operations: the job's owner."""
    roles: frozenset[str] | None = None
    """Job submission: the procedure's roles; interlock reset: the interlock's reset roles."""


class Policy:
    """The site's roles, and the one decision of every action from them."""

    def __init__(self, roles: Mapping[str, RoleConfig]) -> None:
        self.roles = dict(roles)

    # ---- the decision ------------------------------------------------------------------------------

    def decide(self, who: Identity, action: Action, target: Target) -> None:
        """Return if ``who`` may take ``action`` on ``target``; else raise :class:`Forbidden`.

        A PV write is refused with :class:`PermissionDenied` (a write refusal carrying the PV).
        """
        needs = self.needs(who, action, target)
        if needs is None:
            return
        if action is Action.PV_WRITE:
            raise PermissionDenied(target.name, who.user, target.resource or "")
        raise Forbidden(
            f"user {who.user!r} may not {VERBS[action].format(target.name)}: needs {needs}",
            action=action.value,
            target=target.name,
            user=who.user,
            needs=needs,
        )

    def allows(self, who: Identity, action: Action, target: Target) -> bool:
        """Whether :meth:`decide` would return."""
        return self.needs(who, action, target) is None

    def needs(self, who: Identity, action: Action, target: Target) -> str | None:
        """None if ``who`` may; else what it would take, in words."""
        if self._internal(who) or action in PUBLIC:
            return None
        granted = [self.roles[r] for r in who.roles if r in self.roles]
        admin = any(r.admin for r in granted)
        if action in ON_RESOURCE:
            resource = target.resource or ""
            ok = any(r.may_write(resource) for r in granted)
            return None if ok else f"a role that may write {resource!r}"
        if action is Action.LOCK_BREAK:
            return None if admin else "the admin role"
        if action is Action.JOB_SUBMIT:
            allowed = target.roles or frozenset()
            return None if admin or set(who.roles) & allowed else f"one of the roles {sorted(allowed)}"
        if action in (Action.JOB_VIEW, Action.JOB_CANCEL):
            return None if admin or (target.owner is not None and target.owner == who.user) else f"to be its owner ({target.owner}) or an admin"
        if action is Action.ALARM_ACK:
            return None if any(r.admin or r.acknowledge for r in granted) else "a role that may acknowledge alarms"
        if action in (Action.ALARM_SHELVE, Action.ALARM_UNSHELVE):
            return None if any(r.admin or r.shelve for r in granted) else "a role that may shelve alarms"
        if action is Action.INTERLOCK_RESET:
            allowed = target.roles or frozenset()
            return None if admin or set(who.roles) & allowed else f"one of the roles {sorted(allowed)}"
        if action is Action.AUDIT_READ:
            return None if granted else "a role: log in"
        raise AssertionError(f"no rule for {action}")  # every Action has a rule above

    # ---- shorthands the core uses -------------------------------------------------------------------

    def may_write(self, who: Identity, resource: str) -> bool:
        """Whether ``who`` may write PVs of ``resource`` (for access levels shown to clients)."""
        return self.allows(who, Action.PV_WRITE, Target(resource, resource=resource))

    def check_write(self, who: Identity, pv: str, resource: str) -> None:
        """Raise :class:`PermissionDenied` unless ``who`` may write ``pv`` of ``resource``."""
        self.decide(who, Action.PV_WRITE, Target(pv, resource=resource))

    @staticmethod
    def _internal(who: Identity) -> bool:
        """Only code marks an identity internal; no role name does."""
        return who.internal
