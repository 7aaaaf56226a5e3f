"""Errors the client library raises, drawn as a tree::

    ClientError                     base; ``str()`` is one line a person understands
    ├── ConnectError                unreachable, login refused, or the security is not offered   kind "connection"
    │   └── LoginRefused            the user name or password was refused (not worth retrying)
    ├── ConnectionLost              the connection broke (while monitoring, or mid-request)      kind "connection"
    ├── ServerDown                  a PV's server (another of the site) is down or unreachable    kind "connection"
    ├── TooManySessions             every session to other servers a client may open is in use    kind "unavailable"
    ├── RequestTimeout (TimeoutError)   the server did not answer in time                        kind "timeout"
    ├── LockWaitTimeout (TimeoutError)  a queued lock request was not granted in time            kind "timeout"
    ├── WriteUnconfirmed            a write was sent, but the instrument's read-back failed      kind "unconfirmed"
    └── Refused                     the server refused an action (its kind, action, target, fields)
        ├── Forbidden               the identity may not do this                                 kind "forbidden"
        │   └── AccessDenied        a control call refused for the user's roles (BadUserAccessDenied)
        ├── NotFound                no such PV, resource, job, alarm...                          kind "not_found"
        │   └── NoSuchPV (KeyError) the server has no PV of that name
        ├── Conflict                the target's state does not allow it now                     kind "conflict"
        │   └── CommandConflict
        │       └── LockUnavailable the resource is locked by someone else (BadLocked)
        ├── InvalidArgument         the request itself is wrong                                  kind "invalid"
        ├── Unavailable             something the action needs is away                           kind "unavailable"
        ├── PutRefused              the server refused (or failed) a write: kind by its StatusCode
        │   └── PutForbidden, PutNotFound, PutConflict, PutInvalid, PutUnavailable
        └── CommandRefused          the server refused (or failed) a control call: kind by its StatusCode
            └── AccessDenied, CommandNotFound, CommandConflict, CommandInvalid, CommandUnavailable

Every error has a ``kind`` (one of :data:`KINDS`), so a program tells refusals apart by
kind and fields, never by parsing ``str()``.

A :class:`Refused` carries the refusal as data: ``kind``, ``error`` (the type name of the
server's error, e.g. ``OutOfRange``), ``action`` (``write``, ``lock.request``...),
``target`` (a PV, a resource, ``job:42``...), ``fields`` (``pv``, ``owner``, ``until``,
``limit``...) and ``message`` (the sentence). :func:`refusal_from_dict` builds the right
class from the dictionary the server sends (``labctl.ioc.errors.Refused.to_dict()``): a
write's refusal (action ``write``) is a :class:`PutRefused` of its kind, any other a
:class:`CommandRefused` of its kind, so ``except PutRefused`` and ``except Forbidden`` both
catch a forbidden write.

Until the server sends that dictionary, :class:`PutRefused` and :class:`CommandRefused`
carry the server's StatusCode name and number (``status``, ``code``) and its reason (kept
per session in ``Objects/<site>/Session/LastWriteRefusal`` and ``.../LastCallRefusal``),
and take their kind from the StatusCode (:data:`STATUS_KINDS`).
"""

from __future__ import annotations

from typing import Any, ClassVar

#: Every kind of error, in the order the README lists them.
KINDS = ("forbidden", "not_found", "conflict", "invalid", "unavailable", "unconfirmed", "connection", "timeout", "usage")

#: StatusCode name -> the kind of refusal it stands for (when the server sent no refusal data).
STATUS_KINDS: dict[str, str] = {
    "BadUserAccessDenied": "forbidden",
    "BadNotWritable": "forbidden",
    "BadWriteNotSupported": "forbidden",
    "BadLocked": "conflict",
    "BadInvalidState": "conflict",
    "BadConditionBranchAlreadyAcked": "conflict",
    "BadOutOfRange": "invalid",
    "BadTypeMismatch": "invalid",
    "BadInvalidArgument": "invalid",
    "BadNodeIdUnknown": "not_found",
    "BadNodeIdInvalid": "not_found",
    "BadMethodInvalid": "not_found",
    "BadEventIdUnknown": "not_found",
    "BadNotFound": "not_found",
    "BadNoMatch": "not_found",
    "BadTimeout": "unavailable",
    "BadCommunicationError": "unavailable",
    "BadResourceUnavailable": "unavailable",
    "BadServerHalted": "unavailable",
}


class ClientError(Exception):
    """Base of the errors this library raises; ``str()`` is one line a person understands."""

    #: What went wrong, for programs (one of :data:`KINDS`); "unavailable" unless a subclass says.
    kind: ClassVar[str] = "unavailable"


class ConnectError(ClientError):
    """The server cannot be reached, refused the login, or does not offer the security asked for."""

    kind = "connection"


class LoginRefused(ConnectError):
    """The server refused the user name or password (or requires one): the same ones will not do on a retry."""


class ConnectionLost(ClientError):
    """The connection to the server broke while monitoring (or mid-request)."""

    kind = "connection"


class ServerDown(ClientError):
    """The server of the site that owns a PV is down (the site directory says so), or cannot be reached.

    ``server`` is its name, ``endpoint`` its OPC UA endpoint, ``pvs`` the PVs asked for,
    ``down`` whether the site directory says it is down (False: it could not be reached,
    ``reason`` says why).
    """

    kind = "connection"

    def __init__(self, pvs: list[str], server: str, endpoint: str, *, down: bool, reason: str = "") -> None:
        self.pvs = list(pvs)
        self.server = server
        self.endpoint = endpoint
        self.down = down
        self.reason = reason
        self.error = "ServerDown"
        self.action = ""
        self.target = self.pvs[0] if len(self.pvs) == 1 else ""
        self.fields: dict[str, Any] = {"pvs": self.pvs, "server": server, "endpoint": endpoint, "down": down}
        shown = ", ".join(self.pvs[:3]) + (f" and {len(self.pvs) - 3} more" if len(self.pvs) > 3 else "")
        where = f"server {server!r}" + (f" ({endpoint})" if endpoint else "")
        if down:
            why = "which is down (the site directory says so)"
        else:
            why = f"which cannot be reached: {reason or 'no answer'}"
        super().__init__(f"{shown}: served by {where}, {why}")


class TooManySessions(ClientError):
    """A PV of yet another server of the site, while every session to other servers this session may open is in use."""

    kind = "unavailable"


class RequestTimeout(ClientError, TimeoutError):
    """The server did not answer in time."""

    kind = "timeout"


class LockWaitTimeout(ClientError, TimeoutError):
    """A queued lock request was not granted in time (the request is withdrawn)."""

    kind = "timeout"


class WriteUnconfirmed(ClientError):
    """A write the server sent to the instrument, whose read-back then failed: written, not confirmed.

    Neither a refusal nor a failure: the instrument very likely holds ``value`` (do not
    simply write again), but nothing confirmed it, and the PV reads INVALID until the
    instrument is read again. The server answers such a write with
    UncertainNoCommunicationLastUsableValue (``status``, ``code``); ``cause`` is why the
    read-back failed, ``fields`` the server's data (``pv``, ``value``, ``cause``).
    """

    kind = "unconfirmed"

    def __init__(
        self,
        pv: str,
        *,
        value: Any = None,
        cause: str = "",
        message: str | None = None,
        fields: dict[str, Any] | None = None,
        status: str = "",
        code: int = 0,
    ) -> None:
        self.pv = pv
        self.value = value
        self.cause = cause
        self.action = "write"
        self.target = pv
        self.error = "WrittenUnconfirmed"
        self.fields: dict[str, Any] = dict(fields) if fields is not None else {"pv": pv, "value": value, "cause": cause}
        self.status = status
        self.code = code
        super().__init__(message or f"{pv}: written, not confirmed: {cause or status or 'the read-back failed'}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, status: str = "", code: int = 0) -> WriteUnconfirmed:
        """From the server's data (``kind`` ``unconfirmed``)."""
        fields = dict(d.get("fields") or {})
        pv = str(fields.get("pv") or d.get("target", ""))
        return cls(
            pv, value=fields.get("value"), cause=str(fields.get("cause", "")), message=str(d.get("message", "")) or None,
            fields=fields, status=status, code=code,
        )  # fmt: skip


# ---- refusals -----------------------------------------------------------------------------------


class Refused(ClientError):
    """The server refused an action: its ``kind``, ``error``, ``action``, ``target``, ``fields`` and ``message``.

    ``status`` and ``code`` are the OPC UA StatusCode it came with (name and number; empty
    and 0 when unknown).
    """

    kind: str = "refused"  # type: ignore[misc]  # an instance may say better (PutRefused's StatusCode)

    def __init__(
        self,
        message: str,
        *,
        action: str = "",
        target: str = "",
        fields: dict[str, Any] | None = None,
        error: str | None = None,
        status: str = "",
        code: int = 0,
    ) -> None:
        self.message = message
        self.action = action
        self.target = target
        self.fields: dict[str, Any] = dict(fields or {})
        self.error = error or type(self).__name__
        """The type name of the server's error (``OutOfRange``, ``LockedBy``...), else this class's."""
        self.status = status
        self.code = code
        super().__init__(message)

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        """The refusal as data, in the server's shape: kind, error, action, target, fields, message."""
        return {"kind": self.kind, "error": self.error, "action": self.action, "target": self.target,
                "fields": dict(self.fields), "message": self.message}  # fmt: skip


class Forbidden(Refused):
    """The identity may not do this (its roles do not grant it, or the target is someone else's)."""

    kind = "forbidden"


class NotFound(Refused):
    """The target does not exist (a PV, resource, job, procedure, alarm, interlock)."""

    kind = "not_found"


class Conflict(Refused):
    """The target's state does not allow this now (locked, finished, not tripped...)."""

    kind = "conflict"


class InvalidArgument(Refused):
    """The request itself is wrong: a value, a parameter, a duration."""

    kind = "invalid"


class Unavailable(Refused):
    """Something the action needs is away (an instrument, a database, a service)."""

    kind = "unavailable"


class NoSuchPV(NotFound, KeyError):
    """The server has no PV of that name."""

    def __init__(self, name: str, *, message: str | None = None, error: str | None = None, fields: dict[str, Any] | None = None) -> None:
        self.name = name
        super().__init__(message or f"no PV named {name!r}", target=name, fields=fields or {"name": name}, error=error)

    def __str__(self) -> str:
        return self.message


def _status_kind(cls: type[Refused], status: str) -> str:
    return cls.kind if cls.kind != "refused" else STATUS_KINDS.get(status, "unavailable")


class PutRefused(Refused):
    """The server refused (or failed) a write. ``status`` is its StatusCode name, ``reason`` its sentence."""

    def __init__(
        self,
        pv: str,
        status: str,
        code: int,
        reason: str,
        *,
        message: str | None = None,
        error: str | None = None,
        fields: dict[str, Any] | None = None,
    ) -> None:
        self.pv = pv
        self.reason = reason
        super().__init__(
            message or f"{pv}: write refused ({status}): {reason}",
            action="write", target=pv, fields=fields if fields is not None else {"pv": pv},
            error=error, status=status, code=code,
        )  # fmt: skip
        self.kind = _status_kind(type(self), status)


class PutForbidden(PutRefused, Forbidden):
    """A write the identity may not make (its roles, a read-only PV)."""


class PutNotFound(PutRefused, NotFound):
    """A write to something that does not exist."""


class PutConflict(PutRefused, Conflict):
    """A write the PV's state does not allow now (locked by someone else, interlocked)."""


class PutInvalid(PutRefused, InvalidArgument):
    """A write of a wrong value (type, drive limits)."""


class PutUnavailable(PutRefused, Unavailable):
    """A write that failed because something it needs is away (the instrument)."""


class CommandRefused(Refused):
    """The server refused (or failed) a control call: ``command`` is the method, ``status`` its StatusCode name, ``reason`` its sentence."""

    def __init__(
        self,
        command: str,
        status: str,
        code: int,
        reason: str,
        *,
        action: str = "",
        target: str = "",
        message: str | None = None,
        error: str | None = None,
        fields: dict[str, Any] | None = None,
    ) -> None:
        self.command = command
        self.reason = reason
        super().__init__(
            message or f"{reason} ({status})",
            action=action or command, target=target, fields=fields, error=error, status=status, code=code,
        )  # fmt: skip
        self.kind = _status_kind(type(self), status)


class AccessDenied(CommandRefused, Forbidden):
    """The user's roles do not allow it (BadUserAccessDenied)."""


class CommandNotFound(CommandRefused, NotFound):
    """A control call on something that does not exist (job, procedure, resource, alarm, interlock)."""


class CommandConflict(CommandRefused, Conflict):
    """A control call the target's state does not allow now (BadInvalidState)."""


class LockUnavailable(CommandConflict):
    """The resource is locked by someone else (BadLocked); the reason names the holder and until when."""


class CommandInvalid(CommandRefused, InvalidArgument):
    """A control call with a wrong argument (BadInvalidArgument)."""


class CommandUnavailable(CommandRefused, Unavailable):
    """A control call that failed because something it needs is away."""


#: kind -> the class of a write's refusal, and of a control call's.
PUT_REFUSALS: dict[str, type[PutRefused]] = {
    "forbidden": PutForbidden, "not_found": PutNotFound, "conflict": PutConflict, "invalid": PutInvalid, "unavailable": PutUnavailable,
}  # fmt: skip
COMMAND_REFUSALS: dict[str, type[CommandRefused]] = {
    "forbidden": AccessDenied, "not_found": CommandNotFound, "conflict": CommandConflict, "invalid": CommandInvalid,
    "unavailable": CommandUnavailable,
}  # fmt: skip


def refusal_from_dict(d: dict[str, Any], *, status: str = "", code: int = 0, command: str = "") -> Refused:
    """The typed refusal of the server's ``{"kind", "error", "action", "target", "fields", "message"}``.

    A write's refusal (``action`` ``write``) is the :class:`PutRefused` of its kind, any
    other the :class:`CommandRefused` of its kind (:class:`LockUnavailable` for a lock
    held by someone else: error ``LockHeld`` or status ``BadLocked``); an unknown PV is
    :class:`NoSuchPV`. ``status``/``code`` are the StatusCode it came with, ``command``
    the method called. An unknown kind is :class:`Unavailable`'s, keeping the sentence.
    """
    kind = str(d.get("kind", ""))
    error = str(d.get("error", "")) or None
    action = str(d.get("action", ""))
    target = str(d.get("target", ""))
    fields = dict(d.get("fields") or {})
    message = str(d.get("message", ""))
    reason = _reason(d, target, message)
    if kind not in PUT_REFUSALS:
        kind = "unavailable"
    if kind == "not_found" and error == "UnknownPV":
        return NoSuchPV(str(fields.get("name") or target), message=message, error=error, fields=fields)
    # With a StatusCode, the sentence reads as before the server sent data ("X: write refused (BadLocked): ...").
    shown = None if status else message
    if action in ("write", "pv.write"):
        pv = str(fields.get("pv") or target)
        return PUT_REFUSALS[kind](pv, status, code, reason, message=shown, error=error, fields=fields)
    cls = COMMAND_REFUSALS[kind]
    if kind == "conflict" and (error in ("LockHeld", "LockedBy") or status == "BadLocked"):
        cls = LockUnavailable
    return cls(command or action, status, code, reason, action=action, target=target, message=shown, error=error, fields=fields)


def _reason(d: dict[str, Any], target: str, message: str) -> str:
    """Why, without the target the sentence starts with: the dict's ``reason`` if it has one, else its message less the core's fixed opening."""
    reason = d.get("reason")
    if isinstance(reason, str) and reason:
        return reason
    for opening in (f"{target}: write refused: ", f"{target}: write failed: ", f"{target}: "):
        if target and message.startswith(opening):
            return message[len(opening) :]
    return message
