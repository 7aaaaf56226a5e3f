"""The OPC UA address space of a site: its folders, one variable node per PV, the session variables.

Theory of operation.

*Names.* The site's namespace is ``urn:labctl:<site>``. Every PV is a variable whose
NodeId is ``ns=<idx>;s=<PV name>``: derived from the name alone, so it is the same after
every restart and SCADA configurations survive. Every PV variable's BrowseName and
DisplayName are its PV name, so a tag browser (UaExpert, Ignition) lists ``CRYO:MXC:TEMP``
rather than an instrument's channel. Instrument PVs live under
``Objects/<site>/<instrument>``, soft PVs under ``Objects/<site>/soft`` and derived PVs
under ``Objects/<site>/derived``. asyncua checks every new node against all its siblings,
so a folder that would hold more than :data:`MAX_CHILDREN` nodes is split into
sub-folders, first by the colon-separated segments of the PV names (``CRYO``, then
``MXC``...), else into numbered ranges. Other nodes use NodeIds PV names cannot have:
folders ``/<site>/...`` (PV names have no ``/``), properties and components
``<PV>.EURange``, ``<PV>.AlarmState`` (PV names have no ``.``).

*Types.* float64 -> Double, int -> Int64, bool -> Boolean, string -> String, enum ->
UInt32 on a MultiStateDiscreteType with EnumStrings (Part 8 gives that type an unsigned
DataType), float64[] -> Double with ValueRank 1 and ArrayDimensions [length, or 0 when
the length may vary] (:mod:`labctl.server.opcua.values`). Numeric PVs are AnalogItemType
with EngineeringUnits and EURange (the display range, else the drive limits); a numeric
PV with neither range is a BaseAnalogType, whose EURange is optional. Floating-point PVs
carry their precision (EPICS PREC) as the DataItemType property ``ValuePrecision``. Description is the
PV's description. A PV that can be in MINOR or MAJOR alarm (:func:`has_alarm_state`: it has
alarm limits, is computed from other PVs, or is an interlock's state) has the component
``AlarmState`` (its EPICS severity and status, of the enumeration DataType
``EpicsAlarmState``: :mod:`labctl.server.opcua.values`). Any other PV is only ever NO_ALARM
or INVALID, which its Value's StatusCode says (Good or Bad with the reason); leaving the
variable out keeps a large site's address space (and its start-up) half the size.

*Building.* :func:`build` lays out the folders (:func:`folder_layout`) and makes the
folders and PV variables with a builder of :mod:`labctl.server.opcua.builders` (in bulk,
straight into asyncua's node table, unless told otherwise).

*Session.* ``Objects/<site>/Session`` shows each client its own user, roles and the
reasons of its last refused write and method call (``LastWriteRefusal``,
``LastCallRefusal``); :mod:`labctl.server.opcua.sessions` answers them per session.

*Values.* A PV node's Value is the DataValue of its latest reading
(:func:`labctl.server.opcua.values.data_value`, which says what its StatusCode says), and
its ``AlarmState`` the reading's severity and status; :func:`store_readings` puts the
current ones in before the server starts, the publisher
(:mod:`labctl.server.opcua.publisher`) keeps them current.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from asyncua import ua
from asyncua.server.address_space import AttributeValue
from asyncua.server.internal_server import InternalServer
from labctl.ioc.interlocks import RESOURCE as INTERLOCK_RESOURCE
from labctl.ioc.pv import PVInfo
from labctl.ioc.types import PVType, Reading
from labctl.server.opcua.builders import Builder, BulkBuilder
from labctl.server.opcua.units import eu_information
from labctl.server.opcua.values import (
    ALARM_STATE,
    ALARM_STATE_TYPE,
    DATA_TYPES,
    HISTORY_READ,
    READ,
    access_level,
    alarm_state_names,
    alarm_state_value,
    data_value,
)

log = logging.getLogger(__name__)

#: Largest number of children asyncua should have to compare a new node with.
MAX_CHILDREN = 100

#: Folder of soft PVs (no instrument, no expression).
SOFT_FOLDER = "soft"
#: Folder of derived PVs (computed from other PVs).
DERIVED_FOLDER = "derived"
#: Object whose variables show each client its own session (user, roles, last refusal).
SESSION_OBJECT = "Session"


def namespace_uri(site: str) -> str:
    """The namespace of a site's PVs."""
    return f"urn:labctl:{site}"


def application_uri(site: str, server: str | None = None) -> str:
    """The server's ApplicationUri (also in its certificate); distinct from the namespace.

    ``urn:labctl:<site>:<server>`` for a server with a name (one of a site's servers, or
    one whose site file names it), so a discovery server tells the servers of a site
    apart; ``urn:labctl:<site>:server`` for a single server without one.
    """
    return f"urn:labctl:{site}:{server or 'server'}"


@dataclass(eq=False, slots=True)
class PVNode:
    """A PV's variable node: its description, NodeId and the attribute holding its value."""

    info: PVInfo
    nodeid: ua.NodeId
    value: AttributeValue
    """asyncua's holder of the Value attribute, written in place by the publisher."""
    alarm: AttributeValue | None
    """The Value of its ``AlarmState`` variable (severity and status), written by the publisher;
    None for a PV without one (:func:`has_alarm_state`)."""
    alarm_nodeid: ua.NodeId | None


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
    by_alarm_nodeid: dict[ua.NodeId, PVNode]
    """PV nodes by the NodeId of their ``AlarmState`` variable."""
    session_user: ua.NodeId
    session_roles: ua.NodeId
    session_refusal: ua.NodeId
    session_call_refusal: ua.NodeId

    def pv(self, nodeid: ua.NodeId) -> PVNode | None:
        """The PV node with this NodeId, or None for any other node."""
        return self.by_nodeid.get(nodeid)

    def alarm_of(self, nodeid: ua.NodeId) -> PVNode | None:
        """The PV node whose ``AlarmState`` variable has this NodeId, or None."""
        return self.by_alarm_nodeid.get(nodeid)


def folder_layout(site: str, infos: Iterable[PVInfo]) -> _Folder:
    """The folder tree of a site's PVs (pure; no nodes created)."""
    root = _Folder(site, f"/{site}")
    groups: dict[str, list[tuple[str, PVInfo]]] = {}
    for info in infos:
        folder = info.instrument if info.instrument is not None else (DERIVED_FOLDER if info.expr else SOFT_FOLDER)
        groups.setdefault(folder, []).append((info.name, info))  # browse name: the PV name, unique in the site
    for name, members in groups.items():
        root.children.append(_split(_Folder(name, f"{root.path}/{name}"), members, depth=0))
    return root


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


def build(iserver: InternalServer, idx: int, site: str, infos: list[PVInfo], *, builder: type[Builder] = BulkBuilder) -> SiteNodes:
    """Create the folders, PV variables and session variables of a site.

    Pure work on the not yet started server's address space (some seconds for 100 000
    PVs), so it may run in a worker thread. PV values are null until
    :func:`store_readings`. ``builder`` :class:`Builder` makes the same nodes through
    asyncua's AddNodes service, node by node.
    """
    b = builder(iserver, idx)
    _alarm_state_type(b, idx)
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
    value = ua.AttributeIds.Value
    pvs = {}
    for info, nodeid in pending:
        if has_alarm_state(info):
            alarm_id = alarm_state_id(info.name, idx)
            pvs[info.name] = PVNode(info, nodeid, aspace[nodeid].attributes[value], aspace[alarm_id].attributes[value], alarm_id)
        else:
            pvs[info.name] = PVNode(info, nodeid, aspace[nodeid].attributes[value], None, None)
    return SiteNodes(
        namespace_index=idx,
        site_folder=site_folder,
        pvs=pvs,
        by_nodeid={n.nodeid: n for n in pvs.values()},
        by_alarm_nodeid={n.alarm_nodeid: n for n in pvs.values() if n.alarm_nodeid is not None},
        session_user=session_ids[0],
        session_roles=session_ids[1],
        session_refusal=session_ids[2],
        session_call_refusal=session_ids[3],
    )


def mark_historizing(iserver: InternalServer, nodes: SiteNodes) -> None:
    """Make every PV (and its ``AlarmState``) Historizing, with the HistoryRead bit in its AccessLevel.

    Each node gets new AttributeValues (one per distinct access level, shared): the old
    ones may be shared with nodes that do not change (see :class:`~labctl.server.opcua.builders.BulkBuilder`).
    """
    aspace = iserver.aspace
    historizing = AttributeValue(ua.DataValue(ua.Variant(True, ua.VariantType.Boolean)))
    levels: dict[int, AttributeValue] = {}
    for node in nodes.pvs.values():
        for nodeid in (node.nodeid, node.alarm_nodeid):  # the AlarmState's history is the PV's
            if nodeid is None:
                continue
            attrs = aspace[nodeid].attributes
            level = attrs[ua.AttributeIds.AccessLevel].value.Value.Value | HISTORY_READ  # type: ignore[union-attr]
            if level not in levels:
                levels[level] = AttributeValue(ua.DataValue(ua.Variant(level, ua.VariantType.Byte)))
            attrs[ua.AttributeIds.AccessLevel] = levels[level]
            attrs[ua.AttributeIds.Historizing] = historizing
        # The AlarmState is read-only for everyone: its UserAccessLevel is its AccessLevel
        # (a PV's own is answered per session, :mod:`labctl.server.opcua.sessions`).
        if node.alarm_nodeid is not None:
            alarm = aspace[node.alarm_nodeid].attributes
            alarm[ua.AttributeIds.UserAccessLevel] = alarm[ua.AttributeIds.AccessLevel]


def store_readings(nodes: SiteNodes, read: Callable[[str], Reading]) -> None:
    """Put every PV's current reading into its node and its ``AlarmState``."""
    for name, node in nodes.pvs.items():
        reading = read(name)
        node.value.value = data_value(node.info, reading)
        if node.alarm is not None:
            node.alarm.value = alarm_state_value(reading)


def has_alarm_state(info: PVInfo) -> bool:
    """Whether a PV can be in MINOR or MAJOR alarm, and so has an ``AlarmState`` variable.

    Alarm limits make a PV MINOR or MAJOR, a computed PV takes its inputs' severity, an
    interlock's state PV is MINOR or MAJOR when it trips; anything else is NO_ALARM or
    INVALID only, which the Value's StatusCode carries.
    """
    return info.alarm is not None or info.expr is not None or info.resource == INTERLOCK_RESOURCE


def alarm_state_id(name: str, idx: int) -> ua.NodeId:
    """The NodeId of a PV's ``AlarmState`` variable."""
    return ua.NodeId(f"{name}.{ALARM_STATE}", idx)


def _alarm_state_type(b: Builder, idx: int) -> ua.NodeId:
    """The enumeration DataType ``EpicsAlarmState`` (value ``100 x severity + status``), with its EnumValues."""
    nodeid = ua.NodeId(ALARM_STATE_TYPE, idx)
    attrs = ua.DataTypeAttributes()
    attrs.DisplayName = ua.LocalizedText("EpicsAlarmState")
    attrs.Description = ua.LocalizedText("EPICS alarm severity and status of a PV: 100 x severity + status")
    attrs.IsAbstract = False
    item = ua.AddNodesItem()
    item.RequestedNewNodeId = nodeid
    item.BrowseName = ua.QualifiedName("EpicsAlarmState", idx)
    item.NodeClass = ua.NodeClass.DataType
    item.ParentNodeId = ua.NodeId(ua.ObjectIds.Enumeration)
    item.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HasSubtype)
    item.NodeAttributes = attrs
    b.add(item)
    names = alarm_state_names()
    values = [ua.EnumValueType(Value=v, DisplayName=ua.LocalizedText(n), Description=ua.LocalizedText(n)) for v, n in names]
    b.variable(
        ua.NodeId(f"{ALARM_STATE_TYPE}/EnumValues", idx),
        ua.QualifiedName("EnumValues", 0),
        nodeid,
        reference=ua.ObjectIds.HasProperty,
        typedef=ua.ObjectIds.PropertyType,
        value=ua.Variant(values, ua.VariantType.ExtensionObject, is_array=True),
        datatype=ua.NodeId(ua.ObjectIds.EnumValueType),
        value_rank=ua.ValueRank.OneDimension,
        dimensions=[len(values)],
    )
    b.flush()
    definition = ua.EnumDefinition(Fields=[ua.EnumField(Value=v, DisplayName=ua.LocalizedText(n), Name=n) for v, n in names])
    b.iserver.aspace[nodeid].attributes[ua.AttributeIds.DataTypeDefinition] = AttributeValue(
        ua.DataValue(ua.Variant(definition, ua.VariantType.ExtensionObject))
    )
    return nodeid


def _pv_variable(b: Builder, info: PVInfo, browse: str, parent: ua.NodeId) -> ua.NodeId:
    """A PV's variable with its properties and its ``AlarmState``; ``browse`` is its BrowseName (the PV name)."""
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
        if info.type in (PVType.FLOAT64, PVType.FLOAT64_ARRAY):  # Part 8 DataItemType: digits after the point (EPICS PREC)
            b.property(info.name, "ValuePrecision", nodeid, ua.Variant(float(info.precision), ua.VariantType.Double), ua.ObjectIds.Double)
    elif info.type is PVType.ENUM:
        states = [ua.LocalizedText(s) for s in info.states]
        b.property(info.name, "EnumStrings", nodeid, ua.Variant(states, ua.VariantType.LocalizedText, is_array=True), ua.ObjectIds.LocalizedText)
    if not has_alarm_state(info):
        return nodeid
    b.variable(
        alarm_state_id(info.name, b.idx),
        ua.QualifiedName(ALARM_STATE, b.idx),
        nodeid,
        reference=ua.ObjectIds.HasComponent,
        typedef=ua.ObjectIds.BaseDataVariableType,
        value=ua.Variant(0, ua.VariantType.Int32),  # store_readings() puts the current one in
        datatype=ua.NodeId(ALARM_STATE_TYPE, b.idx),
        description="EPICS alarm severity and status (SEVR, STAT): 100 x severity + status",
        access=READ,
    )
    return nodeid
