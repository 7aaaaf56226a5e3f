"""Method signatures of the control layer over OPC UA: arguments, results, refusals, type nodes.

Theory of operation. Every method the control layer offers (:mod:`labctl.server.opcua.locking`,
:mod:`labctl.server.opcua.methods`) is declared once as a :class:`MethodSpec`: its name, its
input and output arguments ``(name, DataType id, description)`` and what it does. From it
:func:`add_method` makes the method node with its InputArguments and OutputArguments, and
:mod:`labctl.server.opcua.calls` checks a call's arguments (:func:`coerce`: numbers of any
width are accepted, nothing else is converted) before the handler runs.

A handler answers with a list of Variants (:func:`int32_variant`, :func:`string_variant`,
:func:`double_variant`; structured results are JSON strings, :func:`to_json`) or raises
:class:`Refused` with a StatusCode and a sentence; a Part 100 method that answers with a
non-zero status leaves its reason in :attr:`Caller.note`.

The type helpers (:func:`type_item`, :func:`initial`, :func:`add_mandatory_rules`) declare
the ObjectTypes the control layer adds (Part 100's LockingServicesType, the event types).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from asyncua import ua
from labctl.ioc.errors import Refused as CoreRefused
from labctl.ioc.types import Identity

if TYPE_CHECKING:
    from asyncua.server.internal_server import InternalServer
    from labctl.server.opcua.builders import Builder
    from labctl.server.opcua.sessions import LabctlSession

_S = ua.StatusCodes

#: DataType ids of the arguments.
STRING = ua.ObjectIds.String
DOUBLE = ua.ObjectIds.Double
INT32 = ua.ObjectIds.Int32
INT64 = ua.ObjectIds.Int64
BOOLEAN = ua.ObjectIds.Boolean
BYTES = ua.ObjectIds.ByteString
TEXT = ua.ObjectIds.LocalizedText


@dataclass(frozen=True)
class MethodSpec:
    """A method's name, arguments ``(name, DataType id, description)`` and what it does."""

    name: str
    inputs: tuple[tuple[str, int, str], ...] = ()
    outputs: tuple[tuple[str, int, str], ...] = ()
    description: str = ""
    di: bool = False
    """Its BrowseName is in the DI namespace (Part 100's own methods)."""


#: The one output of a method answering with JSON.
JSON_RESULT = (("Json", STRING, "the result as JSON (schema in the labctl documentation)"),)


class Refused(Exception):
    """A method call refused with a StatusCode OPC UA names specifically, for a refusal of the core.

    Most refusals need no such wrapper: the core's typed refusal propagates and
    :func:`labctl.server.opcua.refusals.status_of` picks its code. This one is for the codes
    a companion specification defines (Part 9's BadEventIdUnknown...); ``error`` is still
    audited by the core and sent to the client as data.
    """

    def __init__(self, code: int, error: CoreRefused) -> None:
        self.code = code
        self.error = error
        super().__init__(str(error))


@dataclass
class Caller:
    """Who calls, from which session; ``note`` is the reason of a non-zero Part 100 status, ``refusal`` its data."""

    session: LabctlSession
    identity: Identity
    client: str
    note: str = ""
    refusal: CoreRefused | None = None


def client_id(session: Any) -> str:
    """The lock client of an OPC UA session."""
    return f"opcua:session-{session.session_id.Identifier}@{session.host or '?'}"


def to_json(value: Any) -> ua.Variant:
    """A JSON string Variant (tuples as lists; NaN and infinities as JSON's non-standard literals, which Python reads)."""
    return ua.Variant(json.dumps(value, default=_plain, separators=(",", ":")), ua.VariantType.String)


def _plain(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, bytes):
        return value.hex()
    return repr(value)


# ---- nodes -----------------------------------------------------------------------------------------------


def argument(name: str, dtype: int, description: str) -> ua.Argument:
    """A scalar method argument."""
    arg = ua.Argument()
    arg.Name = name
    arg.DataType = ua.NodeId(dtype)
    arg.ValueRank = ua.ValueRank.Scalar
    arg.ArrayDimensions = []
    arg.Description = ua.LocalizedText(description)
    return arg


def add_method(b: Builder, nid: ua.NodeId, spec: MethodSpec, parent: ua.NodeId, di_index: int) -> None:
    """The method node of ``spec`` under ``parent`` (BrowseName in the DI namespace for Part 100's methods)."""
    b.method(
        nid,
        ua.QualifiedName(spec.name, di_index if spec.di else b.idx),
        parent,
        inputs=[argument(*a) for a in spec.inputs],
        outputs=[argument(*a) for a in spec.outputs],
        description=spec.description,
    )


def type_item(nodeid: ua.NodeId, browse: ua.QualifiedName, supertype: int, description: str) -> ua.AddNodesItem:
    """The AddNodes item of an ObjectType (a subtype of ``supertype``)."""
    attrs = ua.ObjectTypeAttributes()
    attrs.DisplayName = ua.LocalizedText(browse.Name)
    attrs.Description = ua.LocalizedText(description)
    attrs.IsAbstract = False
    attrs.WriteMask = attrs.UserWriteMask = 0
    item = ua.AddNodesItem()
    item.RequestedNewNodeId = nodeid
    item.BrowseName = browse
    item.NodeClass = ua.NodeClass.ObjectType
    item.ParentNodeId = ua.NodeId(supertype)
    item.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HasSubtype)
    item.NodeAttributes = attrs
    return item


def initial(dtype: int) -> ua.Variant:
    """The initial value of a property of DataType ``dtype`` (Boolean, Duration or String)."""
    if dtype == ua.ObjectIds.Boolean:
        return ua.Variant(False, ua.VariantType.Boolean)
    if dtype == ua.ObjectIds.Duration:
        return ua.Variant(0.0, ua.VariantType.Double)
    return ua.Variant("", ua.VariantType.String)


def add_mandatory_rules(iserver: InternalServer, b: Builder, declarations: list[ua.NodeId]) -> None:
    """Make a type's declarations Mandatory (after adding the nodes ``b`` holds)."""
    refs = []
    for nid in declarations:
        ref = ua.AddReferencesItem()
        ref.SourceNodeId = nid
        ref.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HasModellingRule)
        ref.IsForward = True
        ref.TargetNodeId = ua.NodeId(ua.ObjectIds.ModellingRule_Mandatory)
        ref.TargetNodeClass = ua.NodeClass.Object
        refs.append(ref)
    b.flush()  # the declarations must exist before references are added to them
    for ref, status in zip(refs, iserver.node_mgt_service.add_references(refs), strict=True):
        if not status.is_good():
            raise RuntimeError(f"cannot add a modelling rule to {ref.SourceNodeId}: {status.name}")


# ---- arguments and results -------------------------------------------------------------------------------


def coerce(variant: ua.Variant, dtype: int) -> Any:
    """An input argument in the declared type; numbers of any width are accepted, nothing else is converted."""
    v = variant.Value if isinstance(variant, ua.Variant) else variant
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if dtype == DOUBLE and number:
        return float(v)
    if dtype in (INT32, INT64) and isinstance(v, int) and not isinstance(v, bool):
        return v
    if dtype == BOOLEAN and isinstance(v, bool):
        return v
    if dtype == STRING and (v is None or isinstance(v, str)):
        return v or ""
    if dtype == TEXT and (v is None or isinstance(v, (str, ua.LocalizedText))):
        return (v.Text or "") if isinstance(v, ua.LocalizedText) else (v or "")
    if dtype == BYTES and (v is None or isinstance(v, bytes)):
        return v or b""
    expected = {DOUBLE: "a number", INT32: "an integer", INT64: "an integer", BOOLEAN: "a Boolean", STRING: "a String",
                TEXT: "a LocalizedText", BYTES: "a ByteString"}[dtype]  # fmt: skip
    raise TypeError(f"expected {expected}, got {type(v).__name__} {v!r}")


def int32_variant(v: int) -> ua.Variant:
    """An Int32 result."""
    return ua.Variant(v, ua.VariantType.Int32)


def string_variant(v: str) -> ua.Variant:
    """A String result."""
    return ua.Variant(v, ua.VariantType.String)


def double_variant(v: float) -> ua.Variant:
    """A Double result."""
    return ua.Variant(float(v), ua.VariantType.Double)
