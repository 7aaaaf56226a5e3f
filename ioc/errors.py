"""Errors raised by the process database, drawn as a tree::

    LabctlError
    ├── ConfigError                 a site file is malformed (lists every problem)
    ├── Refused                     the rules refuse an action (expected: INFO + one audit record)
    │   ├── Forbidden               the identity may not do this              kind "forbidden"
    │   │   ├── PermissionDenied    its roles do not allow writing the PV's resource
    │   │   └── NotWritable         the PV is read-only
    │   ├── NotFound                no such PV, resource, job, alarm...       kind "not_found"
    │   │   └── UnknownPV           no PV has that name
    │   ├── Conflict                the target's state does not allow it now  kind "conflict"
    │   │   ├── LockedBy            the PV's resource is locked by someone else
    │   │   └── Interlocked         an interlock forbids writing the resource
    │   ├── InvalidArgument         the request itself is wrong               kind "invalid"
    │   │   ├── WrongType           the value is not of the PV's type (or is NaN, too long...)
    │   │   └── OutOfRange          the value is outside the PV's drive limits
    │   └── Unavailable             something it needs is away                kind "unavailable"
    └── DriverError                 the instrument side failed
        ├── DriverFault             the instrument answered wrongly or the link is down
        ├── DriverTimeout           the instrument did not answer in time
        ├── DriverFailed            the driver raised something else (a bug): the link restarts
        └── WrittenUnconfirmed      the instrument took a write, but its read-back failed

The write refusals (``PermissionDenied`` ... ``OutOfRange``) are also ``WriteRefused``,
which carries the PV. The arbiter, the job manager, the alarm table and the interlocks
add their own refusals under the same five kinds (``NoSuchJob(JobRefused, NotFound)``,
``NoLease(LockRefused, Conflict)``...), each with its fields.

``Refused`` means *you asked for something the rules refuse* (expected: logged at INFO
and audited once, by the core, no traceback); ``DriverError`` means *the peer
misbehaved*. Every refusal carries its ``kind``, the ``action`` and ``target`` it
refused, and its fields (``pv``, ``owner``, ``until``, ``limit``...): each protocol
adapter maps it to its own status through one table, and sends :meth:`Refused.to_dict`
to clients as data, so no client has to parse its ``str()`` -- a sentence a person
understands.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from typing import Any, ClassVar


class LabctlError(Exception):
    """Base of every error labctl raises on purpose."""


class ConfigError(LabctlError):
    """A site file is malformed. ``problems`` holds one line per problem."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{source}: {n} problem{'s' if n != 1 else ''}"
        super().__init__("\n".join([head, *self.problems]))


def _plain(value: Any) -> Any:
    """A field value as JSON data: sets and tuples as lists, non-finite floats as None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class Refused(LabctlError):
    """An action the rules refuse. Subclasses say which kind of refusal, and carry its fields.

    ``action`` is what was refused (``write``, ``lock.request``, ``job.cancel``...; see
    :class:`labctl.ioc.policy.Action`), ``target`` what it was aimed at (a PV, a resource,
    ``job:42``, an alarm's source, an interlock), ``reason`` the sentence that says why.
    """

    kind: ClassVar[str] = "refused"
    #: Names of the attributes that are this refusal's fields (besides action and target).
    FIELDS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, reason: str, *, action: str = "", target: str = "", message: str | None = None) -> None:
        self.reason = reason
        self.action = action
        self.target = target
        super().__init__(message if message is not None else (f"{target}: {reason}" if target else reason))

    def fields(self) -> dict[str, Any]:
        """This refusal's fields as JSON data."""
        return {name: _plain(getattr(self, name, None)) for name in self.FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """The refusal as data for clients: kind, error type, action, target, fields, the reason and the whole sentence."""
        return {
            "kind": self.kind,
            "error": type(self).__name__,
            "action": self.action,
            "target": self.target,
            "fields": self.fields(),
            "reason": self.reason,
            "message": str(self),
        }


class Forbidden(Refused):
    """The identity may not do this (its roles do not grant it, or the target is someone else's)."""

    kind = "forbidden"
    FIELDS = ("user", "needs")

    def __init__(self, reason: str, *, action: str, target: str, user: str = "", needs: str = "") -> None:
        self.user = user
        self.needs = needs
        """What would allow it (a role, a capability, being the owner), in words."""
        super().__init__(reason, action=action, target=target)


class NotFound(Refused):
    """The target does not exist."""

    kind = "not_found"


class Conflict(Refused):
    """The target's state does not allow this now (locked, finished, not waiting for a reset...)."""

    kind = "conflict"


class InvalidArgument(Refused):
    """The request itself is wrong: a value, a parameter, a duration."""

    kind = "invalid"


class Unavailable(Refused):
    """Something the action needs is away (a database, a service)."""

    kind = "unavailable"


# ---- PV writes --------------------------------------------------------------------------------------


class WriteRefused(Refused):
    """A write was refused by the rules. Subclasses say which rule (and which kind of refusal)."""

    def __init__(self, pv: str, reason: str) -> None:
        self.pv = pv
        # Refused's, not super()'s: the kind class that follows in a subclass's MRO takes other arguments
        Refused.__init__(self, reason, action="write", target=pv, message=f"{pv}: write refused: {reason}")

    def fields(self) -> dict[str, Any]:
        """The PV and the subclass's fields."""
        return {"pv": self.pv, **super().fields()}


class UnknownPV(NotFound, KeyError):
    """No PV has this name."""

    FIELDS = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name
        Refused.__init__(self, f"no PV named {name!r}", target=name, message=f"no PV named {name!r}")

    def __str__(self) -> str:
        return f"no PV named {self.name!r}"


class PermissionDenied(WriteRefused, Forbidden):
    """The identity's roles do not allow writing this PV."""

    FIELDS = ("user", "resource")

    def __init__(self, pv: str, user: str, resource: str) -> None:
        self.user = user
        self.resource = resource
        self.needs = f"a role that may write {resource!r}"
        WriteRefused.__init__(self, pv, f"user {user!r} may not write resource {resource!r}")


class NotWritable(WriteRefused, Forbidden):
    """The PV is read-only."""

    def __init__(self, pv: str) -> None:
        WriteRefused.__init__(self, pv, "the PV is read-only")


def utc_clock(ts: float) -> str:
    """A time as refusals say it: ``14:05:03 UTC``."""
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%H:%M:%S UTC")


class LockedBy(WriteRefused, Conflict):
    """The PV's resource is locked by someone else (or is lockable and nobody holds it)."""

    FIELDS = ("resource", "owner", "until", "job", "client")

    def __init__(self, pv: str, resource: str, owner: str, until: float | None, job: int | None = None, client: str = "") -> None:
        self.resource = resource
        self.owner = owner
        self.until = until
        self.job = job
        self.client = client
        """The session holding the lease (``opcua:session-<n>@<host>``, ``ca:...``, ``job:<id>``)."""
        who = owner + (f" (job {job})" if job is not None else "")
        reason = f"resource {resource!r} is locked by {who}"
        if until is not None:
            reason += f" until {utc_clock(until)}"
        elif owner == "":
            reason = f"resource {resource!r} is lockable: take its lock before writing"
        if client:
            reason += f", held by client {client}"
        WriteRefused.__init__(self, pv, reason)


class WrongType(WriteRefused, InvalidArgument):
    """The value is not of the PV's type, or not acceptable for it (NaN, too long, bad state)."""

    def __init__(self, pv: str, reason: str, value: Any = None) -> None:
        self.value = value
        WriteRefused.__init__(self, pv, reason)


class OutOfRange(WriteRefused, InvalidArgument):
    """The value is outside the PV's drive limits."""

    FIELDS = ("value", "low", "high")

    def __init__(self, pv: str, value: Any, low: float | None, high: float | None) -> None:
        self.value = value
        self.low = low
        self.high = high
        self.limit = (low, high)
        WriteRefused.__init__(self, pv, f"{value!r} is outside the drive limits [{low}, {high}]")


class Interlocked(WriteRefused, Conflict):
    """An interlock forbids writing the PV's resource."""

    FIELDS = ("interlock",)

    def __init__(self, pv: str, interlock: str, detail: str = "") -> None:
        self.interlock = interlock
        extra = f": {detail}" if detail else ""
        WriteRefused.__init__(self, pv, f"interlock {interlock!r} is tripped{extra}")


# ---- the instrument side -------------------------------------------------------------------------


class DriverError(LabctlError):
    """The instrument side failed."""

    def __init__(self, instrument: str, message: str) -> None:
        self.instrument = instrument
        super().__init__(f"{instrument}: {message}")


class DriverFault(DriverError):
    """The instrument answered wrongly, or its link is down."""


class DriverTimeout(DriverError):
    """The instrument did not answer in time."""


class DriverFailed(DriverError):
    """The driver raised something other than a DriverError (a bug); the original is the ``__cause__``.

    The link treats it as a lost instrument (PVs INVALID, reconnect with backoff) and logs
    its traceback once.
    """


class WrittenUnconfirmed(DriverError):
    """The instrument took a write, but reading the value back failed: sent, not confirmed.

    Not a refusal and not a failed write: the audit records it as ``write.unconfirmed``
    and the protocols answer with a status that says so (OPC UA
    UncertainNoCommunicationLastUsableValue, Channel Access ECA_IOINPROGRESS). ``pv`` and
    ``value`` say what was written; ``cause`` is the read-back's error (also the ``__cause__``).
    """

    FIELDS = ("pv", "value", "cause")

    def __init__(self, instrument: str, pv: str, value: Any, cause: DriverError) -> None:
        self.pv = pv
        self.value = value
        self.cause = str(cause)
        super().__init__(instrument, f"{pv}: written, not confirmed: the read-back failed: {cause}")
        self.args = (f"{pv}: written, not confirmed: the read-back failed: {cause}",)

    def to_dict(self) -> dict[str, Any]:
        """As data for clients, shaped like :meth:`Refused.to_dict` (kind ``unconfirmed``)."""
        return {
            "kind": "unconfirmed",
            "error": type(self).__name__,
            "action": "write",
            "target": self.pv,
            "fields": {name: _plain(getattr(self, name)) for name in self.FIELDS},
            "reason": f"written, not confirmed: the read-back failed: {self.cause}",
            "message": str(self),
        }
