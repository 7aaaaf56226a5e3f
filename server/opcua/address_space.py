"""The OPC UA address space of a site: one variable node per PV, and its data values.

Theory of operation.

*Names.* The site's namespace is ``urn:labctl:<site>``. Every PV is a variable whose
NodeId is ``ns=<idx>;s=<PV name>``: derived from the name alone, so it is the same after
every restart and SCADA configurations survive. The browse path is
``Objects/<site>/<instrument>/<channel>``; soft PVs live under ``Objects/<site>/soft``
and derived PVs under ``Objects/<site>/derived``, with the PV name as browse name.
asyncua checks every new node against all its siblings, so a folder that would hold more
than :data:`MAX_CHILDREN` nodes is split into sub-folders, first by the colon-separated
segments of the PV names (``CRYO``, then ``MXC``...), else into numbered ranges. Other
nodes use NodeIds PV names cannot have: folders ``/<site>/...`` (PV names have no
``/``), properties ``<PV>.EURange`` (PV names have no ``.``).

*Types.* float64 -> Double, int -> Int64, bool -> Boolean, string -> String, enum ->
UInt32 on a MultiStateDiscreteType with EnumStrings (Part 8 gives that type an unsigned
DataType), float64[] -> Double with ValueRank 1 and ArrayDimensions [length, or 0 when
the length may vary]. Numeric PVs are AnalogItemType with EngineeringUnits and EURange
(the display range, else the drive limits); a numeric PV with neither range is a
BaseAnalogType, whose EURange is optional. Description is the PV's description.

*Building.* Folders and PV variables are made by :class:`BulkBuilder` straight into
asyncua's node table, with what asyncua's AddNodes service would make but one object per
distinct immutable attribute value: about 1.5 KB and 15 us per PV instead of 8 KB and
200 us, so 100 000 PVs take a couple of seconds. :class:`Builder` (AddNodes, node by
node) makes the few other nodes (types, methods) and serves as the reference the bulk
nodes are tested against.

*Session.* ``Objects/<site>/Session`` shows each client its own user, roles and the
reasons of its last refused write and method call (``LastWriteRefusal``,
``LastCallRefusal``); :mod:`server.opcua.sessions` answers them per session.

*Values and quality.* :func:`data_value` turns a :class:`~ioc.types.Reading` into a
DataValue: SourceTimestamp is the reading's timestamp, ServerTimestamp the time it was
published. The StatusCode follows :data:`QUALITY`:

* INVALID is Bad, with the code saying why (COMM -> BadCommunicationError, TIMEOUT ->
  BadTimeout, UDF -> BadWaitingForInitialData, ...), and the value is null as Part 4
  7.7.1 requires: a lost instrument never shows a value that looks good.
* A MINOR alarm is Good: the value is a trustworthy measurement, and SCADA tools must not
  grey out a temperature because it is high. The LimitBits say which side (HIGH ->
  High, LOW -> Low).
* A MAJOR alarm is UncertainEngineeringUnitsExceeded with the LimitBits, since the value
  is beyond the range the site declared acceptable; clients that show quality flag it.

So a client recovers severity and status from the StatusCode alone (the client library
does, in :mod:`clients.session`).
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from asyncua import ua
from asyncua.server.address_space import AttributeValue, NodeData
from asyncua.server.internal_server import InternalServer

from ioc.pv import PVInfo
from ioc.types import PVType, Reading, Severity, Status
from server.opcua.units import eu_information

log = logging.getLogger(__name__)

#: Largest number of children asyncua should have to compare a new node with.
MAX_CHILDREN = 100

#: Folder of soft PVs (no instrument, no expression).
SOFT_FOLDER = "soft"
#: Folder of derived PVs (computed from other PVs).
DERIVED_FOLDER = "derived"
#: Object whose variables show each client its own session (user, roles, last refusal).
SESSION_OBJECT = "Session"

#: OPC UA StatusCode LimitBits (Part 4, 7.39): the value is at its low / high limit.
LIMIT_LOW = 0x100
LIMIT_HIGH = 0x200

_S = ua.StatusCodes

#: (severity, status) -> StatusCode of a reading; severity alone as the fallback key.
QUALITY: dict[tuple[Severity, Status | None], int] = {
    (Severity.NO_ALARM, None): _S.Good,
    (Severity.MINOR, Status.HIGH): _S.Good | LIMIT_HIGH,
    (Severity.MINOR, Status.LOW): _S.Good | LIMIT_LOW,
    (Severity.MINOR, None): _S.Good,
    (Severity.MAJOR, Status.HIHI): _S.UncertainEngineeringUnitsExceeded | LIMIT_HIGH,
    (Severity.MAJOR, Status.LOLO): _S.UncertainEngineeringUnitsExceeded | LIMIT_LOW,
    (Severity.MAJOR, None): _S.Uncertain,
    (Severity.INVALID, Status.COMM): _S.BadCommunicationError,
    (Severity.INVALID, Status.TIMEOUT): _S.BadTimeout,
    (Severity.INVALID, Status.UDF): _S.BadWaitingForInitialData,
    (Severity.INVALID, Status.READ): _S.BadDeviceFailure,
    (Severity.INVALID, Status.LINK): _S.BadNoCommunication,
    (Severity.INVALID, Status.CALC): _S.BadDataUnavailable,
    (Severity.INVALID, Status.HWLIMIT): _S.BadSensorFailure,
    (Severity.INVALID, Status.DISABLE): _S.BadOutOfService,
    (Severity.INVALID, None): _S.Bad,
}

VARIANT_TYPES: dict[PVType, ua.VariantType] = {
    PVType.FLOAT64: ua.VariantType.Double,
    PVType.INT: ua.VariantType.Int64,
    PVType.BOOL: ua.VariantType.Boolean,
    PVType.ENUM: ua.VariantType.UInt32,
    PVType.STRING: ua.VariantType.String,
    PVType.FLOAT64_ARRAY: ua.VariantType.Double,
}

DATA_TYPES: dict[PVType, ua.NodeId] = {
    PVType.FLOAT64: ua.NodeId(ua.ObjectIds.Double),
    PVType.INT: ua.NodeId(ua.ObjectIds.Int64),
    PVType.BOOL: ua.NodeId(ua.ObjectIds.Boolean),
    PVType.ENUM: ua.NodeId(ua.ObjectIds.UInt32),
    PVType.STRING: ua.NodeId(ua.ObjectIds.String),
    PVType.FLOAT64_ARRAY: ua.NodeId(ua.ObjectIds.Double),
}

READ = ua.AccessLevel.CurrentRead.mask
WRITE = ua.AccessLevel.CurrentWrite.mask
HISTORY_READ = ua.AccessLevel.HistoryRead.mask


def namespace_uri(site: str) -> str:
    """The namespace of a site's PVs."""
    return f"urn:labctl:{site}"


def application_uri(site: str) -> str:
    """The server's ApplicationUri (also in its certificate); distinct from the namespace."""
    return f"urn:labctl:{site}:server"


#: One StatusCode object per code of :data:`QUALITY`, shared by the DataValues (never mutated).
_STATUS_CODES: dict[tuple[Severity, Status | None], ua.StatusCode] = {key: ua.StatusCode(code) for key, code in QUALITY.items()}


def status_code(reading: Reading) -> ua.StatusCode:
    """The StatusCode of a reading (see :data:`QUALITY`); shared, not to be mutated."""
    code = _STATUS_CODES.get((reading.severity, reading.status))
    if code is None:
        code = _STATUS_CODES[(reading.severity, None)]
    return code


def _utc(ts: float) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC)


def variant(info: PVInfo, value: object) -> ua.Variant:
    """A PV value (in its canonical Python type) as a Variant of the node's type."""
    vtype = VARIANT_TYPES[info.type]
    if info.type is PVType.FLOAT64_ARRAY:
        return ua.Variant(list(value), vtype, is_array=True)  # type: ignore[call-overload]
    return ua.Variant(value, vtype)


def data_value(info: PVInfo, reading: Reading, now: float | None = None) -> ua.DataValue:
    """The DataValue of a reading: value (null when Bad), StatusCode, timestamps."""
    code = status_code(reading)
    server_ts = _utc(now) if now is not None else _dt.datetime.now(_dt.UTC)
    if code.is_bad():
        var = ua.Variant(None, ua.VariantType.Null)
    else:
        var = variant(info, reading.value)
    return ua.DataValue(var, code, SourceTimestamp=_utc(reading.timestamp), ServerTimestamp=server_ts)


def access_level(info: PVInfo, *, history: bool = False) -> int:
    """The AccessLevel attribute: what the PV allows anyone (roles aside)."""
    return READ | (WRITE if info.writable else 0) | (HISTORY_READ if history else 0)


@dataclass(eq=False, slots=True)
class PVNode:
    """A PV's variable node: its description, NodeId and the attribute holding its value."""

    info: PVInfo
    nodeid: ua.NodeId
    value: AttributeValue
    """asyncua's holder of the Value attribute, written in place by the publisher."""


@dataclass
class _Folder:
    name: str
    path: str
    children: list[_Folder] = field(default_factory=list)
    pvs: list[tuple[str, PVInfo]] = field(default_factory=list)


@dataclass
class SiteNodes:
    """The nodes of a site: PV nodes by name and by NodeId, and the session variables."""

    namespace_index: int
    site_folder: ua.NodeId
    pvs: dict[str, PVNode]
    by_nodeid: dict[ua.NodeId, PVNode]
    session_user: ua.NodeId
    session_roles: ua.NodeId
    session_refusal: ua.NodeId
    session_call_refusal: ua.NodeId

    def pv(self, nodeid: ua.NodeId) -> PVNode | None:
        """The PV node with this NodeId, or None for any other node."""
        return self.by_nodeid.get(nodeid)


def folder_layout(site: str, infos: Iterable[PVInfo]) -> _Folder:
    """The folder tree of a site's PVs (pure; no nodes created)."""
    root = _Folder(site, f"/{site}")
    groups: dict[str, list[tuple[str, PVInfo]]] = {}
    for info in infos:
        if info.instrument is not None:
            folder, browse = info.instrument, info.channel or info.name
        else:
            folder, browse = (DERIVED_FOLDER if info.expr else SOFT_FOLDER), info.name
        groups.setdefault(folder, []).append((browse, info))
    for name, members in groups.items():
        root.children.append(_split(_Folder(name, f"{root.path}/{name}"), _unique(members), depth=0))
    return root


def _unique(members: list[tuple[str, PVInfo]]) -> list[tuple[str, PVInfo]]:
    """Browse names unique within a folder: a repeated one falls back to the PV name."""
    seen: set[str] = set()
    out = []
    for browse, info in members:
        if browse in seen:
            browse = info.name
        seen.add(browse)
        out.append((browse, info))
    return out


def _split(folder: _Folder, members: list[tuple[str, PVInfo]], depth: int) -> _Folder:
    if len(members) <= MAX_CHILDREN:
        folder.pvs = members
        return folder
    by_segment: dict[str, list[tuple[str, PVInfo]]] = {}
    for browse, info in members:
        segments = info.name.split(":")
        key = segments[depth] if depth < len(segments) - 1 else ""
        by_segment.setdefault(key, []).append((browse, info))
    if "" not in by_segment and 1 < len(by_segment) <= MAX_CHILDREN:
        for key, group in by_segment.items():
            folder.children.append(_split(_Folder(key, f"{folder.path}/{key}"), group, depth + 1))
        return folder
    # No name structure to follow: numbered ranges, each small enough.
    for start in range(0, len(members), MAX_CHILDREN):
        chunk = members[start : start + MAX_CHILDREN]
        name = f"{start + 1:04d}-{start + len(chunk):04d}"
        folder.children.append(_split(_Folder(name, f"{folder.path}/{name}"), chunk, depth))
    return folder


class Builder:
    """Creates a site's nodes in an asyncua internal server, in batches of AddNodes items."""

    def __init__(self, iserver: InternalServer, idx: int) -> None:
        self.iserver = iserver
        self.idx = idx
        self._items: list[ua.AddNodesItem] = []

    def flush(self) -> None:
        """Add the pending nodes; raise if asyncua refused any (a bug: names are unique)."""
        results = self.iserver.node_mgt_service.add_nodes(self._items)
        for item, result in zip(self._items, results, strict=True):
            if not result.StatusCode.is_good():
                raise RuntimeError(f"cannot create OPC UA node {item.RequestedNewNodeId}: {result.StatusCode.name}")
        self._items = []

    def add(self, item: ua.AddNodesItem) -> None:
        """Queue a prepared AddNodes item (types and other nodes this builder has no shortcut for)."""
        self._items.append(item)

    def _add(
        self,
        nodeid: ua.NodeId,
        browse: ua.QualifiedName,
        parent: ua.NodeId,
        reference: int,
        nodeclass: ua.NodeClass,
        typedef: int,
        attrs: ua.ObjectAttributes | ua.VariableAttributes,
    ) -> None:
        item = ua.AddNodesItem()
        item.RequestedNewNodeId = nodeid
        item.BrowseName = browse
        item.NodeClass = nodeclass
        item.ParentNodeId = parent
        item.ReferenceTypeId = ua.NodeId(reference)
        item.TypeDefinition = ua.NodeId(typedef)
        item.NodeAttributes = attrs
        self._items.append(item)

    def object(self, path: str, name: str, parent: ua.NodeId, typedef: int = ua.ObjectIds.FolderType) -> ua.NodeId:
        """A folder (or plain object) organized under ``parent``."""
        nodeid = ua.NodeId(path, self.idx)
        attrs = ua.ObjectAttributes()
        attrs.DisplayName = ua.LocalizedText(name)
        attrs.Description = ua.LocalizedText(name)
        attrs.EventNotifier = 0
        attrs.WriteMask = attrs.UserWriteMask = 0
        ref = ua.ObjectIds.Organizes if typedef == ua.ObjectIds.FolderType else ua.ObjectIds.HasComponent
        self._add(nodeid, ua.QualifiedName(name, self.idx), parent, ref, ua.NodeClass.Object, typedef, attrs)
        return nodeid

    def variable(
        self,
        nodeid: ua.NodeId,
        browse: ua.QualifiedName,
        parent: ua.NodeId,
        *,
        reference: int,
        typedef: int,
        value: ua.Variant,
        datatype: ua.NodeId,
        description: str = "",
        value_rank: int = ua.ValueRank.Scalar,
        dimensions: list[int] | None = None,
        access: int = READ,
        sampling_ms: float = 0.0,
    ) -> None:
        """A variable (or property) node."""
        attrs = ua.VariableAttributes()
        attrs.DisplayName = ua.LocalizedText(browse.Name)
        attrs.Description = ua.LocalizedText(description)
        attrs.DataType = datatype
        attrs.Value = value
        attrs.ValueRank = value_rank
        attrs.ArrayDimensions = dimensions
        attrs.AccessLevel = access
        # What the node offers a session by default; sessions.LabctlSession answers per user.
        attrs.UserAccessLevel = READ
        attrs.WriteMask = attrs.UserWriteMask = 0
        attrs.Historizing = False
        attrs.MinimumSamplingInterval = sampling_ms
        self._add(nodeid, browse, parent, reference, ua.NodeClass.Variable, typedef, attrs)

    def method(
        self,
        nodeid: ua.NodeId,
        browse: ua.QualifiedName,
        parent: ua.NodeId,
        *,
        inputs: list[ua.Argument],
        outputs: list[ua.Argument],
        description: str = "",
    ) -> None:
        """A method with its InputArguments and OutputArguments properties (``<method id>/InputArguments``)."""
        attrs = ua.MethodAttributes()
        attrs.DisplayName = ua.LocalizedText(browse.Name)
        attrs.Description = ua.LocalizedText(description)
        attrs.Executable = attrs.UserExecutable = True
        attrs.WriteMask = attrs.UserWriteMask = 0
        item = ua.AddNodesItem()
        item.RequestedNewNodeId = nodeid
        item.BrowseName = browse
        item.NodeClass = ua.NodeClass.Method
        item.ParentNodeId = parent
        item.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HasComponent)
        item.NodeAttributes = attrs
        self.add(item)
        for name, args in (("InputArguments", inputs), ("OutputArguments", outputs)):
            if not args:
                continue
            self.variable(
                ua.NodeId(f"{nodeid.Identifier}/{name}", nodeid.NamespaceIndex),
                ua.QualifiedName(name, 0),
                nodeid,
                reference=ua.ObjectIds.HasProperty,
                typedef=ua.ObjectIds.PropertyType,
                value=ua.Variant(args, ua.VariantType.ExtensionObject, is_array=True),
                datatype=ua.NodeId(ua.ObjectIds.Argument),
                value_rank=ua.ValueRank.OneDimension,
                dimensions=[len(args)],
            )

    def property(self, owner: str, name: str, parent: ua.NodeId, value: ua.Variant, datatype: int) -> None:
        """A standard (namespace 0) property of a PV, e.g. EURange."""
        self.variable(
            ua.NodeId(f"{owner}.{name}", self.idx),
            ua.QualifiedName(name, 0),
            parent,
            reference=ua.ObjectIds.HasProperty,
            typedef=ua.ObjectIds.PropertyType,
            value=value,
            datatype=ua.NodeId(datatype),
            value_rank=ua.ValueRank.OneDimension if value.is_array else ua.ValueRank.Scalar,
            dimensions=[0] if value.is_array else None,
        )


_A = ua.AttributeIds
_V = ua.VariantType
#: The StatusCode of every attribute value made by :class:`BulkBuilder` (never mutated).
_GOOD = ua.StatusCode(ua.StatusCodes.Good)
_HAS_TYPE_DEFINITION = ua.NodeId(ua.ObjectIds.HasTypeDefinition)


class NamedNode(NodeData):
    """A node made by :class:`BulkBuilder`, which keeps its browse name.

    Its NodeId, BrowseName and DisplayName attributes are answered from it (the
    DisplayName is the browse name's text) rather than stored as three DataValues.
    """

    def __init__(self, nodeid: ua.NodeId, browse_name: ua.QualifiedName) -> None:
        super().__init__(nodeid)
        self.browse_name = browse_name


class BulkBuilder(Builder):
    """Creates nodes at once, building asyncua's node data directly: a site's PVs in bulk.

    asyncua's AddNodes service checks every node against the address space and makes
    fresh objects for all of its attributes and references (about 200 us and 8 KB per
    node). Folders and variables are made here with the attributes, values and
    references AddNodes would give them, in the same order, minus those checks (the
    layout makes them true: unique NodeIds and browse names, existing parents and
    types), and with few objects per node:

    * an attribute no one can change is one :class:`AttributeValue` per distinct value
      (the AccessLevel 1, the DataType Double...), shared by the nodes with that value.
      Nothing writes through them: clients may write only a PV's Value
      (:class:`~server.opcua.writes.PVAttributeService`), and a change of such an
      attribute replaces the node's AttributeValue (:func:`mark_historizing`);
    * NodeId, BrowseName and DisplayName are three shared AttributeValues whose value
      callback answers from the :class:`NamedNode` read;
    * the reference from a node to its type definition is one per type, the inverse
      reference to the parent one per parent.

    So a node holds its attribute table, its Value, its browse name and one reference
    in its parent (about 1.5 KB). Anything else (:meth:`add`, the method nodes) goes
    through AddNodes, at once rather than queued, so nodes made directly may hang below
    it.
    """

    def __init__(self, iserver: InternalServer, idx: int) -> None:
        super().__init__(iserver, idx)
        self.aspace = aspace = iserver.aspace
        self._now = _dt.datetime.now(_dt.UTC)
        self._attrs: dict[Hashable, AttributeValue] = {}
        self._nodeids: dict[int, ua.NodeId] = {}
        self._type_refs: dict[int, ua.ReferenceDescription] = {}
        self._up: tuple[ua.NodeId, int, ua.ReferenceDescription] | None = None

        def browse_name(nodeid: ua.NodeId) -> ua.QualifiedName:
            return aspace[nodeid].browse_name  # type: ignore[attr-defined,no-any-return]

        self._node_id = _answered(lambda nodeid: ua.Variant(nodeid, _V.NodeId))
        self._browse_name = _answered(lambda nodeid: ua.Variant(browse_name(nodeid), _V.QualifiedName))
        self._display_name = _answered(lambda nodeid: ua.Variant(ua.LocalizedText(browse_name(nodeid).Name), _V.LocalizedText))

    def add(self, item: ua.AddNodesItem) -> None:
        """Add a prepared AddNodes item now."""
        self._items.append(item)
        self.flush()

    def object(self, path: str, name: str, parent: ua.NodeId, typedef: int = ua.ObjectIds.FolderType) -> ua.NodeId:
        """A folder (or plain object) organized under ``parent``."""
        nodeid = ua.NodeId(path, self.idx)
        ref = ua.ObjectIds.Organizes if typedef == ua.ObjectIds.FolderType else ua.ObjectIds.HasComponent
        attrs = self._names(ua.NodeClass.Object)
        attrs[_A.Description] = self._shared(_A.Description, name, _V.LocalizedText)
        attrs[_A.WriteMask] = attrs[_A.UserWriteMask] = self._shared(_A.WriteMask, 0, _V.UInt32)
        attrs[_A.EventNotifier] = self._shared(_A.EventNotifier, 0, _V.Byte)
        self._insert(nodeid, ua.QualifiedName(name, self.idx), attrs, parent, ref, ua.NodeClass.Object, typedef)
        return nodeid

    def variable(
        self,
        nodeid: ua.NodeId,
        browse: ua.QualifiedName,
        parent: ua.NodeId,
        *,
        reference: int,
        typedef: int,
        value: ua.Variant,
        datatype: ua.NodeId,
        description: str = "",
        value_rank: int = ua.ValueRank.Scalar,
        dimensions: list[int] | None = None,
        access: int = READ,
        sampling_ms: float = 0.0,
    ) -> None:
        """A variable (or property) node, with the attributes :meth:`Builder.variable` gives it."""
        shared = self._shared
        attrs = self._names(ua.NodeClass.Variable)
        attrs[_A.Description] = shared(_A.Description, description, _V.LocalizedText)
        attrs[_A.WriteMask] = attrs[_A.UserWriteMask] = shared(_A.WriteMask, 0, _V.UInt32)
        attrs[_A.Value] = AttributeValue(ua.DataValue(value, _GOOD, SourceTimestamp=self._now, ServerTimestamp=self._now))
        attrs[_A.DataType] = shared(_A.DataType, datatype, _V.NodeId)
        attrs[_A.ValueRank] = shared(_A.ValueRank, value_rank, _V.Int32)
        attrs[_A.ArrayDimensions] = shared(_A.ArrayDimensions, None if dimensions is None else tuple(dimensions), _V.UInt32)
        attrs[_A.AccessLevel] = shared(_A.AccessLevel, access, _V.Byte)
        attrs[_A.UserAccessLevel] = shared(_A.UserAccessLevel, READ, _V.Byte)
        attrs[_A.MinimumSamplingInterval] = shared(_A.MinimumSamplingInterval, sampling_ms, _V.Double)
        attrs[_A.Historizing] = shared(_A.Historizing, False, _V.Boolean)
        self._insert(nodeid, browse, attrs, parent, reference, ua.NodeClass.Variable, typedef)

    def _names(self, nodeclass: ua.NodeClass) -> dict[ua.AttributeIds, AttributeValue]:
        return {
            _A.NodeId: self._node_id,
            _A.NodeClass: self._shared(_A.NodeClass, nodeclass, _V.Int32),
            _A.BrowseName: self._browse_name,
            _A.DisplayName: self._display_name,
        }

    def _shared(self, attr: ua.AttributeIds, value: Hashable, vtype: ua.VariantType) -> AttributeValue:
        """The one AttributeValue of an immutable attribute value (a tuple stands for an array)."""
        key = (attr, vtype, type(value), value)
        found = self._attrs.get(key)
        if found is None:
            if isinstance(value, tuple):
                variant = ua.Variant(list(value), vtype, is_array=True)
            elif attr == _A.ArrayDimensions:
                variant = ua.Variant(None, vtype, is_array=True)
            elif attr == _A.Description:
                variant = ua.Variant(ua.LocalizedText(str(value)), vtype)
            else:
                variant = ua.Variant(value, vtype)
            found = self._attrs[key] = AttributeValue(ua.DataValue(variant, _GOOD))
        return found

    def _insert(
        self,
        nodeid: ua.NodeId,
        browse: ua.QualifiedName,
        attrs: dict[ua.AttributeIds, AttributeValue],
        parent: ua.NodeId,
        reference: int,
        nodeclass: ua.NodeClass,
        typedef: int,
    ) -> None:
        """Put a node in the address space with its references: to its parent, from it, to its type."""
        if nodeid in self.aspace:
            raise RuntimeError(f"cannot create OPC UA node {nodeid}: it exists")
        node = NamedNode(nodeid, browse)
        node.attributes = attrs
        node.references = [self._parent_ref(parent, reference), self._type_ref(typedef)]
        self.aspace[parent].references.append(
            ua.ReferenceDescription(
                ReferenceTypeId=self._nodeid(reference),
                IsForward=True,
                NodeId=nodeid,
                BrowseName=browse,
                DisplayName=ua.LocalizedText(browse.Name),
                NodeClass=nodeclass,
                TypeDefinition=self._nodeid(typedef),
            )
        )
        self.aspace[nodeid] = node

    def _nodeid(self, number: int) -> ua.NodeId:
        found = self._nodeids.get(number)
        if found is None:
            found = self._nodeids[number] = ua.NodeId(number)
        return found

    def _parent_ref(self, parent: ua.NodeId, reference: int) -> ua.ReferenceDescription:
        """The inverse reference to the parent (kept for the siblings that follow)."""
        if self._up is not None and self._up[0] == parent and self._up[1] == reference:
            return self._up[2]
        ref = self._describe(parent, reference, is_forward=False)
        self._up = (parent, reference, ref)
        return ref

    def _type_ref(self, typedef: int) -> ua.ReferenceDescription:
        found = self._type_refs.get(typedef)
        if found is None:
            found = self._type_refs[typedef] = self._describe(self._nodeid(typedef), ua.ObjectIds.HasTypeDefinition, is_forward=True)
        return found

    def _describe(self, target: ua.NodeId, reference: int, *, is_forward: bool) -> ua.ReferenceDescription:
        """A reference to an existing node, described as asyncua describes it."""

        def read(attr: ua.AttributeIds) -> Any:
            return self.aspace.read_attribute_value(target, attr).Value.Value  # type: ignore[union-attr]

        desc = ua.ReferenceDescription(ReferenceTypeId=self._nodeid(reference), IsForward=is_forward, NodeId=target)
        desc.NodeClass, desc.BrowseName, desc.DisplayName = read(_A.NodeClass), read(_A.BrowseName), read(_A.DisplayName)
        if desc.NodeClass in (ua.NodeClass.Object, ua.NodeClass.Variable):
            for ref in self.aspace[target].references:
                if ref.IsForward and ref.ReferenceTypeId == _HAS_TYPE_DEFINITION:
                    desc.TypeDefinition = ref.NodeId
                    break
        return desc


def _answered(variant: Callable[[ua.NodeId], ua.Variant]) -> AttributeValue:
    """An AttributeValue whose value is made from the NodeId read, when it is read."""
    attr = AttributeValue(None)  # type: ignore[arg-type]  # asyncua's own set_attribute_value_callback leaves it None too
    attr.value_callback = lambda nodeid, _attr: ua.DataValue(variant(nodeid), _GOOD)
    return attr


def build(iserver: InternalServer, idx: int, site: str, infos: list[PVInfo], *, builder: type[Builder] = BulkBuilder) -> SiteNodes:
    """Create the folders, PV variables and session variables of a site.

    Pure work on the not yet started server's address space (some seconds for 100 000
    PVs), so it may run in a worker thread. PV values are null until
    :func:`store_readings`. ``builder`` :class:`Builder` makes the same nodes through
    asyncua's AddNodes service, node by node.
    """
    b = builder(iserver, idx)
    root = folder_layout(site, infos)
    site_folder = b.object(root.path, site, ua.NodeId(ua.ObjectIds.ObjectsFolder))

    session = b.object(f"{root.path}/{SESSION_OBJECT}", SESSION_OBJECT, site_folder, ua.ObjectIds.BaseObjectType)
    session_ids = []
    for name, value, doc in (
        ("User", ua.Variant("", ua.VariantType.String), "the user this session is logged in as"),
        ("Roles", ua.Variant([], ua.VariantType.String, is_array=True), "the roles of this session's user"),
        ("LastWriteRefusal", ua.Variant("", ua.VariantType.String), "why this session's last refused write was refused"),
        ("LastCallRefusal", ua.Variant("", ua.VariantType.String), "why this session's last refused method call was refused"),
    ):
        nodeid = ua.NodeId(f"{root.path}/{SESSION_OBJECT}/{name}", idx)
        b.variable(
            nodeid,
            ua.QualifiedName(name, idx),
            session,
            reference=ua.ObjectIds.HasComponent,
            typedef=ua.ObjectIds.BaseDataVariableType,
            value=value,
            datatype=ua.NodeId(ua.ObjectIds.String),
            description=doc,
            value_rank=ua.ValueRank.OneDimension if value.is_array else ua.ValueRank.Scalar,
            dimensions=[0] if value.is_array else None,
        )
        session_ids.append(nodeid)

    pending: list[tuple[PVInfo, ua.NodeId]] = []

    def walk(folder: _Folder, parent: ua.NodeId) -> None:
        for child in folder.children:
            walk(child, b.object(child.path, child.name, parent))
        for browse, info in folder.pvs:
            pending.append((info, _pv_variable(b, info, browse, parent)))

    walk(root, site_folder)
    b.flush()

    aspace = iserver.aspace
    pvs = {info.name: PVNode(info, nodeid, aspace[nodeid].attributes[ua.AttributeIds.Value]) for info, nodeid in pending}
    return SiteNodes(
        namespace_index=idx,
        site_folder=site_folder,
        pvs=pvs,
        by_nodeid={n.nodeid: n for n in pvs.values()},
        session_user=session_ids[0],
        session_roles=session_ids[1],
        session_refusal=session_ids[2],
        session_call_refusal=session_ids[3],
    )


def mark_historizing(iserver: InternalServer, nodes: SiteNodes) -> None:
    """Make every PV Historizing, with the HistoryRead bit in its AccessLevel.

    Each node gets new AttributeValues (one per distinct access level, shared): the old
    ones may be shared with nodes that do not change (see :class:`BulkBuilder`).
    """
    aspace = iserver.aspace
    historizing = AttributeValue(ua.DataValue(ua.Variant(True, ua.VariantType.Boolean)))
    levels: dict[int, AttributeValue] = {}
    for node in nodes.pvs.values():
        attrs = aspace[node.nodeid].attributes
        level = attrs[ua.AttributeIds.AccessLevel].value.Value.Value | HISTORY_READ  # type: ignore[union-attr]
        if level not in levels:
            levels[level] = AttributeValue(ua.DataValue(ua.Variant(level, ua.VariantType.Byte)))
        attrs[ua.AttributeIds.AccessLevel] = levels[level]
        attrs[ua.AttributeIds.Historizing] = historizing


def store_readings(nodes: SiteNodes, read: Callable[[str], Reading]) -> None:
    """Put every PV's current reading into its node."""
    for name, node in nodes.pvs.items():
        node.value.value = data_value(node.info, read(name))


def _pv_variable(b: Builder, info: PVInfo, browse: str, parent: ua.NodeId) -> ua.NodeId:
    nodeid = ua.NodeId(info.name, b.idx)
    rng = info.display or info.drive
    if info.numeric:
        typedef = ua.ObjectIds.AnalogItemType if rng is not None else ua.ObjectIds.BaseAnalogType
    elif info.type is PVType.ENUM:
        typedef = ua.ObjectIds.MultiStateDiscreteType
    else:
        typedef = ua.ObjectIds.BaseDataVariableType
    is_array = info.type is PVType.FLOAT64_ARRAY
    b.variable(
        nodeid,
        ua.QualifiedName(browse, b.idx),
        parent,
        reference=ua.ObjectIds.Organizes,
        typedef=typedef,
        value=ua.Variant(),  # store_readings() puts the current reading in
        datatype=DATA_TYPES[info.type],
        description=info.description,
        value_rank=ua.ValueRank.OneDimension if is_array else ua.ValueRank.Scalar,
        dimensions=[info.length or 0] if is_array else None,
        access=access_level(info),
        sampling_ms=(info.scan_s or 0.0) * 1000.0,
    )
    if info.numeric:
        if rng is not None:
            b.property(info.name, "EURange", nodeid, ua.Variant(ua.Range(*rng), ua.VariantType.ExtensionObject), ua.ObjectIds.Range)
        if info.unit:
            eu = eu_information(info.unit)
            b.property(info.name, "EngineeringUnits", nodeid, ua.Variant(eu, ua.VariantType.ExtensionObject), ua.ObjectIds.EUInformation)
    elif info.type is PVType.ENUM:
        states = [ua.LocalizedText(s) for s in info.states]
        b.property(info.name, "EnumStrings", nodeid, ua.Variant(states, ua.VariantType.LocalizedText, is_array=True), ua.ObjectIds.LocalizedText)
    return nodeid
