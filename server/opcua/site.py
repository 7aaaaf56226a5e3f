"""The site over OPC UA: ``Objects/<site>/Site`` lists the site's servers and finds who owns a PV.

Theory of operation. A server that is one of a site's servers (its historian is the
site's PostgreSQL database, :mod:`labctl.server.siteinfo`) publishes the site directory
that its directory service (``server.service("sitedir")``) keeps, so that a client
connected to any server can use every PV of the site (:mod:`labctl.clients.site`):

* ``Objects/<site>/Site`` (an object, HasComponent from the site folder, so a browse of
  the PV folders does not enter it) holds ``ThisServer`` (this server's name in the
  directory), the method ``FindOwners`` and the folder ``Servers``;
* ``Site/Servers/<server name>``: one object per server of the site, with the variables
  ``EndpointUrl`` (its OPC UA endpoint, "" when it serves none), ``Host``, ``CaAddress``,
  ``CaPort`` and ``CaTcpPort`` (Channel Access; "" and 0 when it serves none), ``State``
  (``up`` or ``down``), ``Health`` and ``Detail`` (what is degraded), ``Version``,
  ``PvCount``, ``Started`` and ``LastHeartbeat`` (UTC). A server that joins the site gets its
  object when this server's directory next sees it; a server forgotten with ``labctl
  servers --forget`` loses it. NodeIds are ``/<site>/Site/Servers/<name>/<Variable>``.
* ``FindOwners(Names String[]) -> (Servers String[], Endpoints String[], States String[])``:
  for each PV name, the server that owns it, that server's endpoint and its state, or
  three empty strings for a name no server of the site owns. It is answered from memory,
  never by a query: this server's own PVs from its address space, the others from the
  directory service's *owner map* (PV -> server), which that service reads whole, once
  for the whole server (the Channel Access name service answers from the same map),
  whenever ownership may have changed (a server registered, or changed its PV count;
  :func:`~labctl.server.siteinfo.ownership`), and which stays as last read while the
  database is away. A call names at most :data:`MAX_FIND_NAMES` PVs (more:
  BadTooManyOperations); the names must be a String array (else BadInvalidArgument,
  with BadTypeMismatch for the argument).

The values follow the directory: its listener wakes :class:`SiteFolder`'s task when a
server comes, goes or changes, and the task also runs every heartbeat of this server so
``LastHeartbeat`` and ``State`` stay current. Subscribed clients see the changes as data
changes. Everything runs on the event loop; the directory's queries run on its own thread.

*History of the whole site.* The archive is shared by the site's servers, so this
server also answers HistoryRead for PVs it does not serve (``ns=<site>;s=<PV>`` and its
``<PV>.AlarmState``, though no such node exists here): :class:`ArchivedPVs` finds such a
PV in the archive's catalogue, with the metadata its owner archived (its type above all,
which the values are sent in), keeping at most :data:`ARCHIVED_INFOS` of them. A name the
archive does not know is BadNodeIdUnknown, as before.

Every server of a site is an OPC UA application of its own (ApplicationUri
``urn:labctl:<site>:<server name>``, :func:`~labctl.server.opcua.address_space.application_uri`),
so discovery servers list each one (:mod:`labctl.server.opcua.discovery`); the ``Site``
object is how a client finds the site's servers and PVs without one.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from asyncua import ua
from labctl.ioc.config.pvs import PV_NAME
from labctl.ioc.errors import UnknownPV
from labctl.ioc.pv import PVInfo
from labctl.ioc.types import PVType
from labctl.server.opcua.address_space import SiteNodes
from labctl.server.opcua.builders import Builder
from labctl.server.opcua.values import ALARM_STATE
from labctl.server.siteinfo import ServerEntry, SiteDirectory

from labctl.supervision import Supervisor

log = logging.getLogger(__name__)

#: The object under ``Objects/<site>`` that holds the site's servers and ``FindOwners``.
SITE_OBJECT = "Site"
#: PV names one ``FindOwners`` call may ask about.
MAX_FIND_NAMES = 1000
#: Longest PV name ``FindOwners`` looks up (longer ones are answered with empty strings).
MAX_NAME_CHARS = 255
#: Metadata of archived PVs of other servers kept for HistoryRead (the least recently used go first).
ARCHIVED_INFOS = 10_000

_S = ua.StatusCodes
_V = ua.VariantType
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)

#: The variables of a server's object: name, DataType, the entry's value as a Variant, description.
SERVER_VARIABLES: tuple[tuple[str, int, Callable[[ServerEntry], ua.Variant], str], ...] = (
    ("EndpointUrl", ua.ObjectIds.String, lambda e: ua.Variant(e.opcua_endpoint, _V.String), "its OPC UA endpoint (empty: none)"),
    ("Host", ua.ObjectIds.String, lambda e: ua.Variant(e.host, _V.String), "the host it runs on"),
    ("CaAddress", ua.ObjectIds.String, lambda e: ua.Variant(e.ca_address, _V.String), "its Channel Access interfaces, comma-separated (empty: none)"),
    ("CaPort", ua.ObjectIds.Int32, lambda e: ua.Variant(int(e.ca_port or 0), _V.Int32), "its Channel Access server port (0: none)"),
    ("CaTcpPort", ua.ObjectIds.Int32, lambda e: ua.Variant(int(e.ca_tcp_port or 0), _V.Int32), "the TCP port of its Channel Access circuits (0: none)"),
    ("State", ua.ObjectIds.String, lambda e: ua.Variant(e.state, _V.String), "up or down"),
    ("Health", ua.ObjectIds.String, lambda e: ua.Variant(e.health, _V.String), "starting, ok, degraded, conflict or stopped"),
    ("Detail", ua.ObjectIds.String, lambda e: ua.Variant(e.detail, _V.String), "what is degraded or in conflict (empty: nothing)"),
    ("Version", ua.ObjectIds.String, lambda e: ua.Variant(e.version, _V.String), "its labctl version"),
    ("PvCount", ua.ObjectIds.Int32, lambda e: ua.Variant(int(e.pv_count), _V.Int32), "the PVs it owns"),
    ("Started", ua.ObjectIds.DateTime, lambda e: ua.Variant(_utc(e.started), _V.DateTime), "when it registered (UTC)"),
    ("LastHeartbeat", ua.ObjectIds.DateTime, lambda e: ua.Variant(_utc(e.heartbeat), _V.DateTime), "its last heartbeat (UTC)"),
)  # fmt: skip


def site_object_id(site: str, idx: int) -> ua.NodeId:
    """The NodeId of ``Objects/<site>/Site``."""
    return ua.NodeId(f"/{site}/{SITE_OBJECT}", idx)


class SiteFolder:
    """``Objects/<site>/Site`` of one OPC UA service, kept up to date from the site directory."""

    def __init__(self, iserver: Any, nodes: SiteNodes, site: str, directory: SiteDirectory) -> None:
        self.iserver = iserver
        self.nodes = nodes
        self.idx = nodes.namespace_index
        self.directory = directory
        self.base = f"/{site}/{SITE_OBJECT}"
        self.servers: dict[str, ServerEntry] = {}
        """The servers shown, by name."""
        self._shown: dict[str, dict[str, ua.Variant]] = {}
        self._wake = asyncio.Event()
        self._supervisor: Supervisor | None = None

    # ---- nodes ------------------------------------------------------------------------------------

    def build(self) -> None:
        """Create the Site object, ``ThisServer``, ``FindOwners`` and ``Servers`` (before the server starts)."""
        b = Builder(self.iserver, self.idx)
        site = b.object(self.base, SITE_OBJECT, self.nodes.site_folder, ua.ObjectIds.BaseObjectType)
        b.variable(
            ua.NodeId(f"{self.base}/ThisServer", self.idx), ua.QualifiedName("ThisServer", self.idx), site,
            reference=ua.ObjectIds.HasComponent, typedef=ua.ObjectIds.BaseDataVariableType,
            value=ua.Variant(self.directory.server_name, _V.String), datatype=ua.NodeId(ua.ObjectIds.String),
            description="this server's name in the site directory",
        )  # fmt: skip
        method = ua.NodeId(f"{self.base}/FindOwners", self.idx)
        b.method(
            method, ua.QualifiedName("FindOwners", self.idx), site,
            inputs=[_array_argument("Names", f"PV names (at most {MAX_FIND_NAMES})")],
            outputs=[
                _array_argument("Servers", "the server that owns each PV (empty: none)"),
                _array_argument("Endpoints", "that server's OPC UA endpoint (empty: none or unknown)"),
                _array_argument("States", "that server's state: up or down (empty: no owner)"),
            ],
            description="the server of the site that owns each PV, with its endpoint and state",
        )  # fmt: skip
        b.object(f"{self.base}/Servers", "Servers", site)
        b.flush()
        self.iserver.aspace.add_method_callback(method, self.find_owners)

    def _server_id(self, name: str, variable: str | None = None) -> ua.NodeId:
        path = f"{self.base}/Servers/{name}"
        return ua.NodeId(path if variable is None else f"{path}/{variable}", self.idx)

    def _add_server(self, entry: ServerEntry) -> None:
        b = Builder(self.iserver, self.idx)
        obj = b.object(self._server_id(entry.name).Identifier, entry.name, ua.NodeId(f"{self.base}/Servers", self.idx),
                       ua.ObjectIds.BaseObjectType)  # fmt: skip
        shown = {}
        for name, dtype, value_of, doc in SERVER_VARIABLES:
            value = value_of(entry)
            b.variable(self._server_id(entry.name, name), ua.QualifiedName(name, self.idx), obj,
                       reference=ua.ObjectIds.HasComponent, typedef=ua.ObjectIds.BaseDataVariableType, value=value,
                       datatype=ua.NodeId(dtype), description=doc)  # fmt: skip
            shown[name] = value
        b.flush()
        self._shown[entry.name] = shown

    def _remove_server(self, name: str) -> None:
        ids = [self._server_id(name, v) for v, *_ in SERVER_VARIABLES] + [self._server_id(name)]
        params = ua.DeleteNodesParameters()
        for nid in ids:
            item = ua.DeleteNodesItem()
            item.NodeId = nid
            item.DeleteTargetReferences = False  # only the folder refers to it: removed below, not by a walk of every node
            params.NodesToDelete.append(item)
        self.iserver.node_mgt_service.delete_nodes(params)
        folder = self.iserver.aspace[ua.NodeId(f"{self.base}/Servers", self.idx)]
        folder.references[:] = [r for r in folder.references if r.NodeId != ids[-1]]
        self._shown.pop(name, None)

    async def show(self, servers: Iterable[ServerEntry]) -> None:
        """Make the ``Servers`` folder show ``servers``: objects added and removed, changed values written."""
        now = {e.name: e for e in servers}
        for gone in [n for n in self._shown if n not in now]:
            self._remove_server(gone)
        for name, entry in now.items():
            if name not in self._shown:
                self._add_server(entry)
                continue
            shown = self._shown[name]
            for variable, _, value_of, _ in SERVER_VARIABLES:
                value = value_of(entry)
                if value != shown[variable]:
                    shown[variable] = value
                    await self.iserver.write_attribute_value(self._server_id(name, variable), ua.DataValue(value))
        self.servers = now

    # ---- FindOwners -------------------------------------------------------------------------------

    def owner_of(self, name: str) -> tuple[str, str, str]:
        """(server, endpoint, state) of the PV ``name``; empty strings for a name no server of the site owns."""
        me = self.directory.server_name
        if name in self.nodes.pvs:
            owner = me
        else:
            if len(name) > MAX_NAME_CHARS:
                return "", "", ""
            owner = self.directory.owners.get(name, "")
            if not owner:
                return "", "", ""
        entry = self.servers.get(owner)
        if entry is None:
            entry = next((e for e in self.directory.servers if e.name == owner), None)
        if entry is None:  # this server before its first registration, or an owner forgotten meanwhile
            return owner, "", "up" if owner == me else "down"
        return owner, entry.opcua_endpoint, "up" if owner == me else entry.state

    async def find_owners(self, parent: ua.NodeId, *args: Any) -> ua.CallMethodResult:
        """The ``FindOwners`` method (asyncua's method service calls it on the event loop)."""
        result = ua.CallMethodResult()
        if len(args) != 1:
            result.StatusCode = ua.StatusCode(_S.BadArgumentsMissing if not args else _S.BadTooManyArguments)
            return result
        arg = args[0]
        names = arg.Value if isinstance(arg, ua.Variant) else arg
        if names is None:
            names = []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            result.StatusCode = ua.StatusCode(_S.BadInvalidArgument)
            result.InputArgumentResults = [ua.StatusCode(_S.BadTypeMismatch)]
            return result
        if len(names) > MAX_FIND_NAMES:
            result.StatusCode = ua.StatusCode(_S.BadTooManyOperations)
            result.InputArgumentResults = [ua.StatusCode(_S.BadOutOfRange)]
            return result
        answers = [self.owner_of(n) for n in names]
        result.InputArgumentResults = [ua.StatusCode()]
        result.OutputArguments = [ua.Variant([a[i] for a in answers], _V.String, is_array=True) for i in range(3)]
        return result

    # ---- following the directory ------------------------------------------------------------------

    async def start(self) -> None:
        """Show the directory as it is, then follow it in a supervised task."""
        self.directory.add_listener(self._changed)
        await self.show(self.directory.servers)
        self._supervisor = Supervisor("OPC UA site folder", self._run, logger=log)
        self._supervisor.start()

    async def stop(self) -> None:
        """Stop following the directory."""
        try:
            self.directory.remove_listener(self._changed)
        except ValueError:  # never added
            pass
        if self._supervisor is not None:
            await self._supervisor.stop()
            self._supervisor = None

    def _changed(self, servers: tuple[ServerEntry, ...]) -> None:
        """The directory's listener (on the loop, never waits)."""
        self._wake.set()

    async def _run(self) -> None:
        period = self.directory.config.heartbeat_s
        while True:
            await self.show(self.directory.servers)
            try:
                async with asyncio.timeout(period):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()


# ---- history of the whole site ----------------------------------------------------------------------


class ArchivedPVs:
    """PVs of other servers of the site, as the shared archive describes them (for HistoryRead)."""

    def __init__(self, historian: Any, idx: int, *, size: int = ARCHIVED_INFOS) -> None:
        self.historian = historian
        self.idx = idx
        self.size = size
        self._infos: OrderedDict[str, PVInfo] = OrderedDict()

    async def resolve(self, nodeid: ua.NodeId) -> tuple[PVInfo, bool] | None:
        """(The PV, whether the node is its ``AlarmState``) for a node of the site's namespace the archive knows, else None.

        Raises the historian's errors (HistorianUnavailable when its database is away).
        """
        ident = nodeid.Identifier
        if nodeid.NamespaceIndex != self.idx or not isinstance(ident, str) or len(ident) > MAX_NAME_CHARS + len(ALARM_STATE) + 1:
            return None
        alarm = ident.endswith(f".{ALARM_STATE}")
        name = ident.removesuffix(f".{ALARM_STATE}") if alarm else ident
        if not PV_NAME.match(name):
            return None
        info = self._infos.get(name)
        if info is None:
            try:
                versions = await self.historian.read_metadata_history(name)
            except UnknownPV:
                return None
            if not versions:
                return None
            info = archived_info(name, versions[-1][1])
            self._infos[name] = info
            while len(self._infos) > self.size:
                self._infos.popitem(last=False)
        else:
            self._infos.move_to_end(name)
        return info, alarm


def archived_info(name: str, meta: dict[str, Any]) -> PVInfo:
    """A PV's description from the metadata the archive keeps of it (what HistoryRead needs: type, unit, states...)."""
    try:
        pv_type = PVType(meta.get("type"))
    except ValueError:
        pv_type = PVType.FLOAT64  # catalogued without a type: numbers are the common case (as the historian reads them)

    def pair(v: Any) -> tuple[float, float] | None:
        return (float(v[0]), float(v[1])) if isinstance(v, (list, tuple)) and len(v) == 2 else None

    precision = meta.get("precision")
    return PVInfo(
        name=name,
        type=pv_type,
        resource=str(meta.get("resource") or ""),
        description=str(meta.get("description") or ""),
        unit=str(meta.get("unit") or ""),
        precision=int(precision) if isinstance(precision, int) else 3,
        display=pair(meta.get("display")),
        drive=pair(meta.get("drive")),
        writable=bool(meta.get("writable")),
        states=tuple(str(s) for s in meta.get("states") or ()),
        length=meta.get("length") if isinstance(meta.get("length"), int) else None,
        allow_nan=bool(meta.get("allow_nan")),
        instrument=meta.get("instrument"),
        channel=meta.get("channel"),
    )


def _array_argument(name: str, description: str) -> ua.Argument:
    arg = ua.Argument()
    arg.Name = name
    arg.DataType = ua.NodeId(ua.ObjectIds.String)
    arg.ValueRank = ua.ValueRank.OneDimension
    arg.ArrayDimensions = [0]
    arg.Description = ua.LocalizedText(description)
    return arg


def _utc(t: float) -> _dt.datetime:
    return _EPOCH + _dt.timedelta(seconds=t)
