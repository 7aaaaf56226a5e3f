"""OPC UA writes: every Write of a PV's Value goes through the core write path.

Theory of operation. asyncua's per-node asynchronous point is the attribute service's
``write`` (one StatusCode per node of a Write request); value setters are synchronous
and a PreWrite callback can only fail a whole request. :class:`PVAttributeService`
replaces asyncua's attribute service and sends each PV Value write to
:func:`write_pv`, which awaits :meth:`labctl.ioc.database.Database.write` with the session's
identity, so roles, locks, limits and interlocks decide and every write, accepted or
refused, is audited by the core.

A refusal is mapped to a StatusCode through the one table :data:`REFUSALS`, keyed by
the error class (the most specific class in its MRO wins), and its sentence (``who
holds the lock until when``, ``which limit``) is kept on the session, where the client
reads it from ``Objects/<site>/Session/LastWriteRefusal``; the server log has it too.

Anything else is refused: other attributes of PV nodes and every attribute of other
nodes, for every external session. asyncua's own default lets its ``Admin`` role write
everything; only the server's internal session has that role here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from asyncua import ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.address_space import AttributeService
from labctl.ioc.errors import (
    DriverError,
    DriverTimeout,
    Interlocked,
    LockedBy,
    NotWritable,
    OutOfRange,
    PermissionDenied,
    UnknownPV,
    WriteRefused,
    WrongType,
)
from labctl.ioc.types import SYSTEM, Identity, PVType
from labctl.server.opcua.users import SessionUser

if TYPE_CHECKING:
    from labctl.ioc.database import Database
    from labctl.server.opcua.address_space import PVNode, SiteNodes

log = logging.getLogger(__name__)

_S = ua.StatusCodes

#: Error class -> the StatusCode a Write returns for it.
REFUSALS: dict[type[Exception], int] = {
    NotWritable: _S.BadNotWritable,
    PermissionDenied: _S.BadUserAccessDenied,
    LockedBy: _S.BadLocked,
    WrongType: _S.BadTypeMismatch,
    OutOfRange: _S.BadOutOfRange,
    Interlocked: _S.BadInvalidState,
    WriteRefused: _S.BadUserAccessDenied,  # a refusal kind this table does not know yet
    DriverTimeout: _S.BadTimeout,
    DriverError: _S.BadCommunicationError,
    UnknownPV: _S.BadNodeIdUnknown,
}


def status_of(error: Exception) -> int:
    """The StatusCode of a refused or failed write."""
    for cls in type(error).__mro__:
        if cls in REFUSALS:
            return REFUSALS[cls]
    return _S.BadInternalError


def python_value(node: PVNode, value: ua.Variant | None) -> Any:
    """The Python value a client wrote, for the core to check against the PV's type.

    Deliberately no coercion here: the core decides what a PV accepts (e.g. an Int32 for
    a float64 PV, a state name for an enum) and refuses the rest with a reason.
    """
    if value is None:
        return None
    v = value.Value
    if isinstance(v, ua.LocalizedText) and node.info.type is PVType.ENUM:
        return v.Text
    return v


def identity_of(user: User) -> Identity:
    """The identity a write is made with (the server itself for its internal session)."""
    if isinstance(user, SessionUser):
        return user.identity
    if user.role is UserRole.Admin:
        return SYSTEM
    return Identity("anonymous", frozenset(), "opcua")


async def write_pv(db: Database, node: PVNode, wv: ua.WriteValue, user: User) -> ua.StatusCode:
    """Write one PV Value through the core; return the StatusCode for this node."""
    identity = identity_of(user)
    name = node.info.name
    if wv.IndexRange:
        return _refuse(user, name, identity, _S.BadWriteNotSupported, "writing part of a value (IndexRange) is not supported")
    dv = wv.Value
    if dv.StatusCode is not None and not dv.StatusCode.is_good():
        return _refuse(user, name, identity, _S.BadWriteNotSupported, "writing a StatusCode is not supported")
    try:
        await db.write(name, python_value(node, dv.Value), identity)
    except (WriteRefused, DriverError, UnknownPV) as e:
        code = status_of(e)
        text = str(e) if isinstance(e, WriteRefused) else f"{name}: write failed: {e}"
        if isinstance(user, SessionUser):
            user.last_refusal = text
        log.info("opcua write by %s -> %s: %s", identity, ua.StatusCode(code).name, text)
        return ua.StatusCode(code)
    except Exception:  # a bug in a driver or the core: report it here, once, and keep serving
        log.exception("opcua write of %s by %s failed unexpectedly", name, identity)
        if isinstance(user, SessionUser):
            user.last_refusal = f"{name}: write failed: internal server error (see the server log)"
        return ua.StatusCode(_S.BadInternalError)
    if isinstance(user, SessionUser):
        user.last_refusal = ""
    return ua.StatusCode()


def _refuse(user: User, name: str, identity: Identity, code: int, reason: str) -> ua.StatusCode:
    text = f"{name}: write refused: {reason}"
    if isinstance(user, SessionUser):
        user.last_refusal = text
    log.info("opcua write by %s -> %s: %s", identity, ua.StatusCode(code).name, text)
    return ua.StatusCode(code)


class PVAttributeService(AttributeService):
    """asyncua's attribute service with writes routed to the core (see the module docstring)."""

    def __init__(self, aspace: Any) -> None:
        super().__init__(aspace)
        self.db: Database | None = None
        self.nodes: SiteNodes | None = None

    def bind(self, db: Database, nodes: SiteNodes) -> None:
        """Route writes of ``nodes``' PVs to ``db`` (called once the address space is built)."""
        self.db = db
        self.nodes = nodes

    async def write(self, params: ua.WriteParameters, user: User = User(role=UserRole.Admin)) -> list[ua.StatusCode]:  # noqa: B008 -- asyncua's signature
        """One StatusCode per node: PV values through the core, the rest refused to clients."""
        results: list[ua.StatusCode] = []
        for wv in params.NodesToWrite:
            node = self.nodes.pv(wv.NodeId) if self.nodes is not None else None
            if node is not None and self.db is not None:
                if wv.AttributeId == ua.AttributeIds.Value:
                    results.append(await write_pv(self.db, node, wv, user))
                else:
                    results.append(ua.StatusCode(_S.BadNotWritable))
            elif user.role is UserRole.Admin and not isinstance(user, SessionUser):
                # the server's own internal session (asyncua start-up, server status nodes)
                results.extend(await super().write(ua.WriteParameters(NodesToWrite=[wv]), user))
            else:
                log.info("opcua write by %s of %s refused: not a PV value", identity_of(user), wv.NodeId.to_string())
                results.append(ua.StatusCode(_S.BadUserAccessDenied))
        return results
