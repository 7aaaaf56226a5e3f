"""Node builders: how a site's nodes get into asyncua's address space.

Theory of operation. Folders and PV variables are made by :class:`BulkBuilder` straight
into asyncua's node table, with what asyncua's AddNodes service would make but one object
per distinct immutable attribute value: about 1.5 KB and 15 us per PV instead of 8 KB and
200 us, so 100 000 PVs take a couple of seconds. :class:`Builder` (AddNodes, node by
node) makes the few other nodes (types, methods) and serves as the reference the bulk
nodes are tested against. Both offer the same calls (:meth:`Builder.object`,
:meth:`Builder.variable`, :meth:`Builder.method`, :meth:`Builder.property`); what nodes a
site has is decided in :mod:`labctl.server.opcua.address_space`.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Hashable
from typing import Any

from asyncua import ua
from asyncua.server.address_space import AttributeValue, NodeData
from asyncua.server.internal_server import InternalServer
from labctl.server.opcua.values import READ


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
      (:class:`~labctl.server.opcua.writes.PVAttributeService`), and a change of such an
      attribute replaces the node's AttributeValue (:func:`labctl.server.opcua.address_space.mark_historizing`);
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
        self._up: dict[tuple[ua.NodeId, int], ua.ReferenceDescription] = {}
        """The inverse references to the latest parents (a PV's folder, the PV for its properties and components)."""

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
        """The inverse reference to the parent (kept for the siblings that follow, and for the next PV of a folder)."""
        key = (parent, reference)
        found = self._up.pop(key, None)  # least recently used first: re-inserted at the end
        if found is None:
            if len(self._up) >= 8:
                del self._up[next(iter(self._up))]
            found = self._describe(parent, reference, is_forward=False)
        self._up[key] = found
        return found

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

