"""OPC UA writes: every Write of a PV's Value goes through the core write path.

Theory of operation. asyncua's per-node asynchronous point is the attribute service's
``write`` (one StatusCode per node of a Write request); value setters are synchronous
and a PreWrite callback can only fail a whole request. :class:`PVAttributeService`
replaces asyncua's attribute service and sends each PV Value write to
:func:`write_pv`, which awaits :meth:`labctl.ioc.database.Database.write` with the session's
identity, so roles, locks, limits and interlocks decide and every write, accepted or
refused, is audited by the core.

A refusal is mapped to a StatusCode through the one table of
:mod:`labctl.server.opcua.refusals`, with one case only the adapter tells apart: a state
index outside a MultiStateDiscrete PV's EnumStrings is BadOutOfRange, as Part 8 says,
where the core refuses it as a wrong value for the type (:func:`status_of_write`). The
refusal itself (kind, fields, sentence: ``who holds the lock until when``, ``which
limit``) goes back with the response as the node's DiagnosticInfo; the sentence is also kept on the session
(``Objects/<site>/Session/LastWriteRefusal``, for people browsing with a generic client).

Anything else is refused, and audited once by the core like any refusal: other
attributes of PV nodes, part of a value (IndexRange), a StatusCode, and every attribute
of other nodes, for every external session. asyncua's own default lets its ``Admin`` role
write everything; only the server's internal session has that role here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from asyncua import ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.address_space import AttributeService
from labctl.ioc.errors import (
    DriverError,
    Forbidden,
    InvalidArgument,
    LabctlError,
    Refused,
    WrittenUnconfirmed,
    WrongType,
)
from labctl.ioc.policy import Action
from labctl.ioc.types import SYSTEM, Identity, PVType
from labctl.server.opcua.refusals import status_of
from labctl.server.opcua.users import SessionUser

if TYPE_CHECKING:
    from labctl.ioc.database import Database
    from labctl.server.opcua.address_space import PVNode, SiteNodes

log = logging.getLogger(__name__)

_S = ua.StatusCodes

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


def status_of_write(node: PVNode, error: BaseException) -> int:
    """The StatusCode of a refused write of ``node``: the refusal table's, except an enum state index out of range.

    Part 8 (MultiStateDiscreteType): a value outside the EnumStrings is BadOutOfRange.
    """
    if isinstance(error, WrongType) and node.info.type is PVType.ENUM:
        v = error.value
        index = v if isinstance(v, int) and not isinstance(v, bool) else (int(v) if isinstance(v, float) and v.is_integer() else None)
        if index is not None and not 0 <= index < len(node.info.states):
            return _S.BadOutOfRange
    return status_of(error)


def identity_of(user: User) -> Identity:
    """The identity a write is made with (the server itself for its internal session)."""
    if isinstance(user, SessionUser):
        return user.identity
    if user.role is UserRole.Admin:
        return SYSTEM
    return Identity("anonymous", frozenset(), "opcua")


def _note(user: User, error: LabctlError | None, text: str = "") -> None:
    if isinstance(user, SessionUser):
        user.last_refusal = text
        user.operation_errors.append(error)


def refuse(db: Database, user: User, error: Refused, code: int | None = None) -> ua.StatusCode:
    """A Write of one node refused by this adapter: audited once by the core, noted for the response."""
    db.refuse(identity_of(user), error)
    _note(user, error, str(error))
    return ua.StatusCode(code if code is not None else status_of(error))


async def write_pv(db: Database, node: PVNode, wv: ua.WriteValue, user: User) -> ua.StatusCode:
    """Write one PV Value through the core; return the StatusCode for this node."""
    identity = identity_of(user)
    name = node.info.name
    if wv.IndexRange:
        return refuse(db, user, InvalidArgument("writing part of a value (IndexRange) is not supported", action=Action.PV_WRITE, target=name), _S.BadWriteNotSupported)
    dv = wv.Value
    if dv.StatusCode is not None and not dv.StatusCode.is_good():
        return refuse(db, user, InvalidArgument("writing a StatusCode is not supported", action=Action.PV_WRITE, target=name), _S.BadWriteNotSupported)
    try:
        await db.write(name, python_value(node, dv.Value), identity)
    except (Refused, DriverError) as e:  # the core audited it and logged it once
        _note(user, e, str(e) if isinstance(e, (Refused, WrittenUnconfirmed)) else f"{name}: write failed: {e}")
        return ua.StatusCode(status_of_write(node, e))
    except Exception:  # a bug in a driver or the core: report it here, once, and keep serving
        log.exception("opcua write of %s by %s failed unexpectedly", name, identity)
        _note(user, None, f"{name}: write failed: internal server error (see the server log)")
        return ua.StatusCode(_S.BadInternalError)
    _note(user, None)
    return ua.StatusCode()


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
        if isinstance(user, SessionUser):
            user.operation_errors = []
        for wv in params.NodesToWrite:
            node = self.nodes.pv(wv.NodeId) if self.nodes is not None else None
            if node is not None and self.db is not None:
                if wv.AttributeId == ua.AttributeIds.Value:
                    results.append(await write_pv(self.db, node, wv, user))
                else:
                    attribute = ua.AttributeIds(wv.AttributeId).name if wv.AttributeId in ua.AttributeIds._value2member_map_ else str(wv.AttributeId)
                    error = Forbidden(f"only its Value may be written, not its {attribute}", action=Action.PV_WRITE, target=node.info.name)
                    results.append(refuse(self.db, user, error, _S.BadNotWritable))
            elif user.role is UserRole.Admin and not isinstance(user, SessionUser):
                # the server's own internal session (asyncua start-up, server status nodes)
                results.extend(await super().write(ua.WriteParameters(NodesToWrite=[wv]), user))
            elif self.db is not None:
                target = wv.NodeId.to_string()
                results.append(refuse(self.db, user, Forbidden("not a PV's value: nothing else may be written", action="node.write", target=target)))
            else:
                results.append(ua.StatusCode(_S.BadUserAccessDenied))
        return results
