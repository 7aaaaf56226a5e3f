"""Refusals over OPC UA: one table from the core's typed refusals to StatusCodes, and the refusal as data.

Theory of operation. The core decides and refuses (:mod:`labctl.ioc.policy`,
:mod:`labctl.ioc.errors`); this adapter only translates. :func:`status_of` picks the
StatusCode of a refused or failed operation -- a Write of a PV's value or a method call
-- from :data:`SPECIFIC` (the most specific class in the error's MRO that has a code: the
codes OPC UA names for a case, BadLocked, BadOutOfRange...) and else from the refusal's
kind (:data:`BY_KIND`).

A client also gets the refusal itself, as data: :func:`diagnostic` packs
:meth:`labctl.ioc.errors.Refused.to_dict` (kind, error, action, target, fields, message) as
JSON into a DiagnosticInfo's AdditionalInfo, which the server returns in the
``DiagnosticInfos`` of the Write or Call response, one per operation, beside its
StatusCode (:class:`labctl.server.opcua.processor.LabctlProcessor`). A client that asks for
diagnostics (RequestHeader.ReturnDiagnostics, as labctl's client library does) reads why
in the same round trip; one that does not gets the StatusCode as before.

Written, not confirmed. A write the instrument took but whose read-back failed
(:class:`~labctl.ioc.errors.WrittenUnconfirmed`) is neither Good (nothing confirms the
value) nor Bad (the value was sent, and the instrument very likely holds it: a client
that retried would write twice). It gets **UncertainNoCommunicationLastUsableValue**
(0x408F0000): the Uncertain severity says "done, but not known to be right" -- a generic
client shows it as neither success nor failure -- and the sub-code says what went wrong,
communication with the data source, which is exactly the read-back's failure. The
alternatives say something false: GoodCompletesAsynchronously promises a completion that
never comes, GoodPostActionFailed names Part 4's post-actions, and the Bad codes say the
write did not happen. Its DiagnosticInfo carries the error as data (kind ``unconfirmed``,
the PV, the value sent and the read-back's error), from which labctl's client library
raises ``WriteUnconfirmed``.
"""

from __future__ import annotations

import json

from asyncua import ua
from labctl.ioc.arbiter import LockHeld
from labctl.ioc.errors import (
    DriverError,
    DriverTimeout,
    Interlocked,
    LabctlError,
    LockedBy,
    NotWritable,
    OutOfRange,
    Refused,
    UnknownPV,
    WrittenUnconfirmed,
    WrongType,
)

_S = ua.StatusCodes

#: Error class -> the StatusCode OPC UA names for that case (the first class in the MRO wins).
SPECIFIC: dict[type[Exception], int] = {
    NotWritable: _S.BadNotWritable,
    LockedBy: _S.BadLocked,
    LockHeld: _S.BadLocked,  # a lock request (RequestLock) without waiting
    WrongType: _S.BadTypeMismatch,
    OutOfRange: _S.BadOutOfRange,
    Interlocked: _S.BadInvalidState,
    UnknownPV: _S.BadNodeIdUnknown,
    WrittenUnconfirmed: _S.UncertainNoCommunicationLastUsableValue,  # sent, read-back failed (module docstring)
    DriverTimeout: _S.BadTimeout,
    DriverError: _S.BadCommunicationError,
}

#: A refusal's kind -> its StatusCode, where no class above has one.
BY_KIND: dict[str, int] = {
    "forbidden": _S.BadUserAccessDenied,
    "not_found": _S.BadInvalidArgument,  # a method argument naming nothing: a job, a procedure, an alarm...
    "conflict": _S.BadInvalidState,
    "invalid": _S.BadInvalidArgument,
    "unavailable": _S.BadResourceUnavailable,
}

#: Bit of RequestHeader.ReturnDiagnostics: operation-level AdditionalInfo (Part 4, DiagnosticsMask).
OPERATION_ADDITIONAL_INFO = 0x80


def status_of(error: BaseException) -> int:
    """The StatusCode of a refused or failed operation."""
    for cls in type(error).__mro__:
        if cls in SPECIFIC:
            return SPECIFIC[cls]
    if isinstance(error, Refused):
        return BY_KIND.get(error.kind, _S.BadUserAccessDenied)
    return _S.BadInternalError


def refusal_data(error: LabctlError) -> dict:
    """The refusal (or driver failure) as JSON data for the client."""
    if isinstance(error, (Refused, WrittenUnconfirmed)):
        return error.to_dict()
    kind = "unavailable" if isinstance(error, DriverError) else "internal"
    return {"kind": kind, "error": type(error).__name__, "action": "", "target": "", "fields": {}, "message": str(error)}


def diagnostic(error: LabctlError) -> ua.DiagnosticInfo:
    """A DiagnosticInfo carrying the refusal as JSON in its AdditionalInfo."""
    info = ua.DiagnosticInfo()
    info.AdditionalInfo = json.dumps(refusal_data(error), separators=(",", ":"), allow_nan=False, default=str)
    return info
