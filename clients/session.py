"""The labctl client session: list, get, put and monitor PVs of a labctl server over OPC UA, and call its control layer.

Theory of operation. :func:`connect` opens an asyncua client session to a server's
endpoint as a user (or anonymously), with the security the caller asks for (see
:mod:`labctl.clients.connection`). The session finds the site's namespace
(``urn:labctl:<site>``) and addresses a PV by its NodeId ``ns=<idx>;s=<PV name>``, so it
needs no browsing to get or put.

* :meth:`Session.list_pvs` browses ``Objects/<site>`` breadth-first, one Browse request
  per level and batched Reads for the metadata.
* :meth:`Session.get` reads value and metadata (DataType, ValueRank, EngineeringUnits,
  EURange, EnumStrings, access levels) in one Read; metadata is cached per session
  (decoded by :mod:`labctl.clients.values`). The value's severity and status come from the
  PV's ``AlarmState`` variable, read in the same request (a Bad StatusCode is INVALID).
* :meth:`Session.put` writes a Variant of the PV's type. A refused write raises the
  :class:`~labctl.clients.errors.PutRefused` of the refusal's kind (``PutForbidden``,
  ``PutConflict``, ``PutInvalid``...), with its fields: the server sends the refusal as
  data in the Write response's DiagnosticInfo, which the session asks for (no second
  round trip, nothing another request could overwrite meanwhile).
* :meth:`Session.monitor` subscribes to PVs; the returned
  :class:`~labctl.clients.monitor.Monitor` is an async iterator of
  :class:`~labctl.clients.values.Sample` (the current values first, then every change),
  buffered up to ``queue_size`` samples, beyond which the oldest are dropped.

The control layer (locks, jobs, alarms, interlocks, the audit trail) is reached through
the server's methods (``Objects/<site>/Control`` and each lockable resource's
``Objects/<site>/Resources/<resource>/Lock``), whose structured answers are JSON and come
back as the frozen dataclasses of :mod:`labctl.clients.records`. A refused call raises the
:class:`~labctl.clients.errors.CommandRefused` of the refusal's kind (``AccessDenied``,
``CommandNotFound``, ``CommandConflict``, ``LockUnavailable``...) with its fields, sent as
data in the Call response's DiagnosticInfo. :meth:`Session.lock` with
``wait=True`` queues and waits for the grant, watching the lock's ``LockingClient``
variable; :meth:`Session.hold_lock` keeps a lease renewed (every third of its duration)
for as long as a ``with`` block runs.

A lease belongs to the session that took it: another session of the same user writes
under it only when handed its token -- ``put(name, value, lease=token)`` (or the
:class:`~labctl.clients.records.Lease` itself, e.g. ``held.lease`` of :meth:`Session.hold_lock`)
first binds the token to this session with the server's ``Control/UseLease`` (once per
token and session), then writes. :meth:`Session.use_lease` does the binding alone.

A site of several servers (:mod:`labctl.clients.site`): connected to any server of a
site (one that publishes ``Objects/<site>/Site``), the session reaches every PV of the site.
A name the connected server does not serve goes, through the server's ``FindOwners``, to
a session of its own to the server that owns it (opened when first needed with the same
login and security, kept, at most ``max_sessions``): ``get_many``, ``put``, ``monitor``,
``info`` and the locks route by owner, history and audit are read through the connected
server (the archive is shared). A PV whose server is down raises
:class:`~labctl.clients.errors.ServerDown` (a monitor shows it disconnected instead).
:meth:`Session.servers` lists the site; ``list_pvs(site=True)`` lists every server's PVs.

This module talks to the server over the network only; it shares no code with the
server beyond the value types of :mod:`labctl.ioc.types`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import fnmatch
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from typing import Any

from asyncua import Client, ua
from asyncua.common.subscription import DataChangeEvent, StatusChangeEvent
from asyncua.ua.ua_binary import struct_from_binary
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from labctl.clients.connection import disconnect_quietly, open_client
from labctl.clients.errors import (
    AccessDenied,
    ClientError,
    CommandRefused,
    ConnectError,
    ConnectionLost,
    LockUnavailable,
    LockWaitTimeout,
    NoSuchPV,
    PutRefused,
    RequestTimeout,
    WriteUnconfirmed,
    refusal_from_dict,
)
from labctl.clients.monitor import Monitor
from labctl.clients.records import (
    AlarmInfo,
    HeldLock,
    InterlockInfo,
    JobDetail,
    JobInfo,
    Lease,
    LockInfo,
    ProcedureInfo,
    decode_alarm,
    decode_interlock,
    decode_job,
    decode_job_detail,
    decode_lock,
    decode_procedure,
)
from labctl.clients.site import MAX_SESSIONS, SITE_OBJECT, Owner, ServerInfo, SiteMonitor, SiteRouter
from labctl.clients.values import (
    METADATA_ATTRIBUTES,
    METADATA_PROPERTIES,
    Metadata,
    PVValue,
    alarm_node_name,
    metadata_of,
    reading_of,
    status_name,
    to_variant,
)

log = logging.getLogger(__name__)

NAMESPACE = re.compile(r"^urn:labctl:([A-Za-z_][A-Za-z0-9_\-]*)$")
#: ReadValueIds per Read request when reading metadata of many PVs.
READ_CHUNK = 2000

_S = ua.StatusCodes

#: RequestHeader.ReturnDiagnostics bit for operation-level AdditionalInfo (OPC UA Part 4, DiagnosticsMask).
OPERATION_ADDITIONAL_INFO = 0x80


async def connect(
    url: str,
    user: str | None = None,
    password: str | None = None,
    security: str = "auto",
    *,
    timeout_s: float = 10.0,
    certificate: str | None = None,
    private_key: str | None = None,
    site: bool = True,
    max_sessions: int = MAX_SESSIONS,
) -> Session:
    """Open a session to a labctl server (and, through it, to the other servers of its site).

    Args:
        url: the endpoint, ``opc.tcp://host:4840``.
        user: user name; None logs in anonymously (read-only).
        password: the user's password.
        security: ``auto`` (the most secure the server offers), ``None``, ``Sign`` or
            ``SignAndEncrypt`` (Basic256Sha256).
        timeout_s: how long each request (and the connection) may take.
        certificate: this client's application certificate (PEM/DER file); a
            self-signed one is made for the process when omitted.
        private_key: the certificate's private key file.
        site: reach the PVs of the other servers of the connected server's site too
            (False: this server's PVs only).
        max_sessions: sessions to other servers of the site opened at most (see
            :mod:`labctl.clients.site`).

    Raises:
        ConnectError: unreachable, login refused, or the security is not offered.
    """
    if max_sessions < 1:
        raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
    client = await open_client(
        url, user, password, security, timeout_s=timeout_s, certificate=certificate, private_key=private_key
    )
    session = Session(client, url, timeout_s)
    try:
        await session._init()
    except BaseException:
        await session.close()
        raise
    if site and session.server_name:

        def open_owner(endpoint: str) -> Awaitable[Session]:
            return connect(endpoint, user, password, security, timeout_s=timeout_s, certificate=certificate,
                           private_key=private_key, site=False)  # fmt: skip

        session._site = SiteRouter(session, open_owner, max_sessions=max_sessions)
    return session


class Session:
    """A connection to a labctl server (made by :func:`connect`)."""

    def __init__(self, client: Client, url: str, timeout_s: float) -> None:
        self.client = client
        self.url = url
        self.timeout_s = timeout_s
        self.site = ""
        """The server's site name."""
        self.namespace_index = 0
        self.user = ""
        """Who the server says this session is."""
        self.roles: tuple[str, ...] = ()
        self.server_name = ""
        """The connected server's name in its site's directory ("" for a server that is not part of a site)."""
        self._site: SiteRouter | None = None
        """Routes requests to the other servers of the site (None: this server's PVs only)."""
        self._meta: dict[str, Metadata] = {}
        self._monitors: set[Monitor | SiteMonitor] = set()
        self._closed = False
        self._leases_used: set[str] = set()
        """Tokens of leases this session was handed (bound with UseLease)."""

    async def _init(self) -> None:
        namespaces = await self._call(self.client.get_namespace_array())
        for idx, uri in enumerate(namespaces):
            m = NAMESPACE.match(uri)
            if m:
                self.site, self.namespace_index = m.group(1), idx
                break
        else:
            raise ConnectError(f"{self.url} is not a labctl server (no urn:labctl:<site> namespace)")
        base = f"/{self.site}/Session"
        values = await self._read([
            (self._node_id(f"{base}/User"), ua.AttributeIds.Value),
            (self._node_id(f"{base}/Roles"), ua.AttributeIds.Value),
            (self._node_id(f"/{self.site}/{SITE_OBJECT}/ThisServer"), ua.AttributeIds.Value),
        ])  # fmt: skip
        self.user, self.roles = _who(values[0], values[1])
        this = values[2]
        if this.StatusCode is None or this.StatusCode.is_good():
            self.server_name = str(this.Value.Value or "") if this.Value is not None else ""

    @property
    def closed(self) -> bool:
        """Whether the session was closed."""
        return self._closed

    @property
    def site_router(self) -> SiteRouter | None:
        """What reaches the other servers of the site (None: a server that is not part of a site, or ``site=False``)."""
        return self._site

    def _node_id(self, name: str) -> ua.NodeId:
        return ua.NodeId(name, self.namespace_index)

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except TimeoutError:
            raise RequestTimeout(f"{self.url}: no answer within {self.timeout_s:g} s") from None
        except (ConnectionError, UaError) as e:
            if isinstance(e, UaStatusCodeError):
                raise
            raise ConnectionLost(f"{self.url}: connection lost: {e}") from None

    async def close(self) -> None:
        """End every monitor and the session."""
        if self._closed:
            return
        self._closed = True
        for mon in list(self._monitors):
            await mon.close()
        if self._site is not None:
            await self._site.close()
        await disconnect_quietly(self.client)

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- queries --------------------------------------------------------------------

    async def whoami(self) -> tuple[str, tuple[str, ...]]:
        """This session's user and roles, as the server sees them."""
        base = f"/{self.site}/Session"
        values = await self._read([(self._node_id(f"{base}/User"), ua.AttributeIds.Value), (self._node_id(f"{base}/Roles"), ua.AttributeIds.Value)])
        self.user, self.roles = _who(values[0], values[1])
        return self.user, self.roles

    async def info(self, name: str) -> Metadata:
        """A PV's metadata (cached for the session). Raises NoSuchPV, or ServerDown for a PV of a server that is down."""
        meta = self._meta.get(name)
        if meta is not None:
            return meta
        if self._site is not None:
            _, remote = await self._site.route([name])
            for server, names in remote.items():
                return await self._site.call(server, names, lambda s: s.info(name))
            return self._meta[name]
        return (await self._infos([name]))[0]

    async def _infos(self, names: Sequence[str], paths: Sequence[str] | None = None) -> list[Metadata]:
        metas = await self._read_infos(names, paths)
        for name, meta in zip(names, metas, strict=True):
            if meta is None:
                raise NoSuchPV(name)
        return metas  # type: ignore[return-value]

    async def _probe(self, names: Sequence[str]) -> set[str]:
        """Read the metadata of the names this server serves; return the others."""
        metas = await self._read_infos(names)
        return {n for n, m in zip(names, metas, strict=True) if m is None}

    async def _read_infos(self, names: Sequence[str], paths: Sequence[str] | None = None) -> list[Metadata | None]:
        """Metadata of ``names`` (cached), None for a name this server has no node for."""
        reqs = []
        for name in names:
            nid = self._node_id(name)
            reqs += [(nid, a) for a in METADATA_ATTRIBUTES]
            reqs += [(self._node_id(f"{name}.{p}"), ua.AttributeIds.Value) for p in METADATA_PROPERTIES]
        values = await self._read(reqs)
        per = len(METADATA_ATTRIBUTES) + len(METADATA_PROPERTIES)
        out: list[Metadata | None] = []
        for i, name in enumerate(names):
            chunk = values[i * per : (i + 1) * per]
            dtype_status = chunk[0].StatusCode
            if dtype_status is not None and dtype_status.value in (_S.BadNodeIdUnknown, _S.BadNodeIdInvalid):
                out.append(None)
                continue
            meta = metadata_of(name, chunk, paths[i] if paths else "")
            self._meta[name] = meta
            out.append(meta)
        return out

    async def _read(self, reqs: Sequence[tuple[ua.NodeId, int]]) -> list[ua.DataValue]:
        out: list[ua.DataValue] = []
        for start in range(0, len(reqs), READ_CHUNK):
            params = ua.ReadParameters()
            for nid, attr in reqs[start : start + READ_CHUNK]:
                rv = ua.ReadValueId()
                rv.NodeId = nid
                rv.AttributeId = attr
                params.NodesToRead.append(rv)
            out += await self._call(self.client.uaclient.read(params))
        return out

    async def list_pvs(self, pattern: str | None = None, *, site: bool = False) -> list[Metadata]:
        """Every PV (or those whose name matches the glob ``pattern``), in browse order, with metadata.

        ``site``: then the PVs of every other server of the site that is up, server by server
        (a server that cannot be reached is left out, with a warning in the log); each name once.
        """
        local = await self._list_local(pattern)
        if site and self._site is not None:
            return await self._site.list_pvs(pattern, local)
        return local

    async def servers(self) -> list[ServerInfo]:
        """The servers of the connected server's site, by name, as its ``Site`` folder shows them.

        A server that is not part of a site has no such folder: the list is empty.
        """
        if not self.server_name:
            return []
        router = self._site or SiteRouter(self, _no_opener)
        return await router.servers()

    async def find_owners(self, names: Iterable[str]) -> dict[str, Owner | None]:
        """The server of the site that owns each PV, with its endpoint and state (None: no server owns it)."""
        if not self.server_name:
            raise CommandRefused("FindOwners", "BadNotSupported", _S.BadNotSupported, f"{self.url} is not a server of a site")
        router = self._site or SiteRouter(self, _no_opener)
        return await router.find_owners(names)

    async def _list_local(self, pattern: str | None) -> list[Metadata]:
        found: list[tuple[str, str]] = []  # (name, path)
        level = [(self._node_id(f"/{self.site}"), self.site)]
        while level:
            params = ua.BrowseParameters()
            for nid, _ in level:
                desc = ua.BrowseDescription()
                desc.NodeId = nid
                desc.BrowseDirection = ua.BrowseDirection.Forward
                desc.ReferenceTypeId = ua.NodeId(ua.ObjectIds.Organizes)
                desc.IncludeSubtypes = False
                desc.NodeClassMask = ua.NodeClass.Object | ua.NodeClass.Variable
                desc.ResultMask = ua.BrowseResultMask.All
                params.NodesToBrowse.append(desc)
            results = await self._call(self.client.uaclient.browse(params))
            following = []
            for (_, path), result in zip(level, results, strict=True):
                for ref in result.References:
                    nid = ref.NodeId
                    child = f"{path}/{ref.BrowseName.Name}"
                    if ref.NodeClass == ua.NodeClass.Object:
                        following.append((ua.NodeId(nid.Identifier, nid.NamespaceIndex), child))
                    elif nid.NamespaceIndex == self.namespace_index and isinstance(nid.Identifier, str):
                        found.append((nid.Identifier, child))
            level = following
        if pattern is not None:
            found = [(n, p) for n, p in found if fnmatch.fnmatchcase(n, pattern)]
        if not found:
            return []
        return await self._infos([n for n, _ in found], [p for _, p in found])

    async def get(self, name: str) -> PVValue:
        """A PV's current reading with its metadata. Raises NoSuchPV."""
        return (await self.get_many([name]))[0]

    async def get_many(self, names: Sequence[str]) -> list[PVValue]:
        """Several PVs' readings, read in one request per server (metadata from the cache or one more).

        Raises NoSuchPV, or ServerDown for a PV of a server that is down.
        """
        if self._site is not None:
            local, remote = await self._site.route(names)
            if remote:
                site = self._site
                parts = [self._get_local(local)] if local else []
                parts += [site.call(server, group, lambda s, g=group: s.get_many(g)) for server, group in remote.items()]
                read = {v.name: v for part in await asyncio.gather(*parts) for v in part}
                return [read[n] for n in names]
        return await self._get_local(names)

    async def _get_local(self, names: Sequence[str]) -> list[PVValue]:
        missing = [n for n in dict.fromkeys(names) if n not in self._meta]
        if missing:
            await self._infos(missing)
        reqs = []
        for n in names:  # the value and its AlarmState (where the PV has one), of the same reading
            reqs.append((self._node_id(n), ua.AttributeIds.Value))
            if self._meta[n].alarm_state:
                reqs.append((self._node_id(alarm_node_name(n)), ua.AttributeIds.Value))
        values = iter(await self._read(reqs))
        out = []
        for n in names:
            meta = self._meta[n]
            value = next(values)
            out.append(PVValue(n, reading_of(meta, value, next(values) if meta.alarm_state else None), meta))
        return out

    # ---- commands -------------------------------------------------------------------

    async def put(self, name: str, value: Any, *, lease: str | Lease | None = None) -> None:
        """Write a PV. Raises NoSuchPV, a PutRefused of the refusal's kind with its fields, or WriteUnconfirmed.

        ``lease``: write under a lease another session of this user holds (its token, or the
        :class:`Lease`), bound to this session first (:meth:`use_lease`; a wrong or lapsed
        token raises its CommandRefused). WriteUnconfirmed: the instrument was sent the value but reading it back failed
        (the value is very likely set; the PV reads INVALID until it is read again).
        """
        if self._site is not None:
            _, remote = await self._site.route([name])
            for server, names in remote.items():
                return await self._site.call(server, names, lambda s: s.put(name, value, lease=lease))
        if lease is not None:
            token = lease.token if isinstance(lease, Lease) else lease
            if token not in self._leases_used:
                await self.use_lease(token)
        meta = await self.info(name)
        wv = ua.WriteValue()
        wv.NodeId = self._node_id(name)
        wv.AttributeId = ua.AttributeIds.Value
        wv.Value = ua.DataValue(to_variant(meta, value))
        request = ua.WriteRequest()
        request.Parameters.NodesToWrite.append(wv)
        response = await self._diagnosed(request, ua.WriteResponse)
        status = response.Results[0]
        if status.is_good():
            return
        code = status.value
        refusal = _refusal_data(response.DiagnosticInfos)
        if status.is_uncertain():  # sent to the instrument, read-back failed: not refused, not confirmed
            if refusal is not None:
                raise WriteUnconfirmed.from_dict(refusal, status=status_name(code), code=code)
            raise WriteUnconfirmed(name, value=value, status=status_name(code), code=code)
        if refusal is not None:
            raise refusal_from_dict(refusal, status=status_name(code), code=code)
        raise PutRefused(name, status_name(code), code, ua.StatusCode(code).doc or status_name(code))

    async def _diagnosed(self, request: Any, response_type: type) -> Any:
        """Send a Write or Call asking for the operations' diagnostics: the server sends each refusal as data."""
        request.RequestHeader.ReturnDiagnostics = OPERATION_ADDITIONAL_INFO
        data = await self._call(self.client.uaclient.protocol.send_request(request))
        response = struct_from_binary(response_type, data)
        response.ResponseHeader.ServiceResult.check()
        return response

    # ---- control: calls -------------------------------------------------------------

    async def _command(self, path: str, method: str, *args: ua.Variant) -> list[Any]:
        """Call ``Objects/<site>/<path>/<method>``; the output values, or a CommandRefused of the refusal's kind."""
        outputs, _ = await self._command_diagnosed(path, method, *args)
        return outputs

    async def _command_diagnosed(self, path: str, method: str, *args: ua.Variant) -> tuple[list[Any], dict[str, Any] | None]:
        """:meth:`_command`, with the refusal data a Good answer carries (Part 100's status outputs)."""
        base = f"/{self.site}/{path}"
        req = ua.CallMethodRequest()
        req.ObjectId = self._node_id(base)
        req.MethodId = self._node_id(f"{base}/{method}")
        req.InputArguments = list(args)
        request = ua.CallRequest()
        request.Parameters.MethodsToCall = [req]
        response = await self._diagnosed(request, ua.CallResponse)
        (res,) = response.Results
        refusal = _refusal_data(response.DiagnosticInfos)
        if res.StatusCode.is_good():
            return [v.Value for v in res.OutputArguments], refusal
        code = res.StatusCode.value
        if refusal is not None:
            raise refusal_from_dict(refusal, status=status_name(code), code=code, command=method)
        reason = ua.StatusCode(code).doc or status_name(code)
        if code in (_S.BadMethodInvalid, _S.BadNodeIdInvalid, _S.BadNodeIdUnknown):
            reason = f"the server has no method {path}/{method} (not a labctl server with the control layer?)"
        cls = {_S.BadUserAccessDenied: AccessDenied, _S.BadLocked: LockUnavailable}.get(code, CommandRefused)
        raise cls(method, status_name(code), code, reason)

    async def _json(self, method: str, *args: ua.Variant) -> Any:
        (text,) = await self._command("Control", method, *args)
        return json.loads(text)

    # ---- control: locks --------------------------------------------------------------

    async def locks(self) -> list[LockInfo]:
        """Every resource's lock state (lockable or not)."""
        return [decode_lock(d) for d in await self._json("ListLocks")]

    async def lock(
        self, resource: str, *, duration_s: float = 600, priority: int = 0, wait: bool = False, timeout_s: float | None = None
    ) -> Lease:
        """Take a resource's lock for ``duration_s``.

        Held by someone else: raise LockUnavailable (naming holder and expiry), or with
        ``wait`` queue by priority then arrival and return once granted; after
        ``timeout_s`` (None: no limit) the request is withdrawn and LockWaitTimeout raised.
        A request this session already holds renews it.
        """
        server = await self._lock_server(resource)
        if server is not None:
            return await self._at_lock(server, resource, lambda s: s.lock(resource, duration_s=duration_s, priority=priority,
                                                                          wait=wait, timeout_s=timeout_s))  # fmt: skip
        path = f"Resources/{resource}/Lock"
        args = (_double(duration_s), ua.Variant(int(priority), ua.VariantType.Int32), ua.Variant(bool(wait), ua.VariantType.Boolean))
        try:
            status, token, expires_at = await self._command(path, "RequestLock", *args)
        except CommandRefused as e:
            if e.code in (_S.BadNodeIdInvalid, _S.BadNodeIdUnknown, _S.BadMethodInvalid):
                raise CommandRefused(e.command, e.status, e.code, f"no lockable resource {resource!r} on this server") from None
            raise
        if status == 0:
            return Lease(resource, token, expires_at)
        try:
            async with asyncio.timeout(timeout_s):
                return await self._wait_for_grant(resource, path, args)
        except TimeoutError:
            await self._withdraw(resource, token)
            raise LockWaitTimeout(f"{resource}: lock not granted within {timeout_s:g} s; request withdrawn") from None
        except BaseException:
            await self._withdraw(resource, token)
            raise

    async def _wait_for_grant(self, resource: str, path: str, args: tuple[ua.Variant, ...]) -> Lease:
        # The queued request keeps its place; asking again (same session) answers "granted" once it is ours.
        sub = await self._call(self.client.create_subscription(100.0, None, queue_maxsize=100))
        try:
            node = self.client.get_node(self._node_id(f"/{self.site}/{path}/LockingClient"))
            await self._call(sub.subscribe_data_change(node, queuesize=10, sampling_interval=0.0))
            while True:
                event = await sub.__anext__()
                if isinstance(event, StatusChangeEvent) and event.notification.Status.is_bad():
                    raise ConnectionLost(f"{self.url}: subscription ended while waiting for {resource}")
                if not isinstance(event, DataChangeEvent):
                    continue
                status, token, expires_at = await self._command(path, "RequestLock", *args)
                if status == 0:
                    return Lease(resource, token, expires_at)
        finally:
            with contextlib.suppress(Exception):  # the session may be gone; the server drops it then
                await asyncio.shield(sub.delete())

    async def _withdraw(self, resource: str, token: str) -> None:
        try:
            await asyncio.shield(self.unlock(resource, token))
        except (ClientError, asyncio.CancelledError) as e:
            log.debug("withdrawing the request for %s: %s", resource, e)

    async def renew(self, resource: str, token: str, duration_s: float | None = None) -> Lease:
        """Renew a lease from now (for ``duration_s``, or its own duration). Raises CommandRefused if it was lost."""
        server = await self._lock_server(resource)
        if server is not None:
            return await self._at_lock(server, resource, lambda s: s.renew(resource, token, duration_s))
        (expires_at,) = await self._command(f"Resources/{resource}/Lock", "RenewLease", _string(token), _double(duration_s or 0.0))
        return Lease(resource, token, expires_at)

    async def use_lease(self, token: str) -> Lease:
        """Write under the lease with ``token`` from this session: one another session of this user took and handed over.

        The binding lasts as long as the lease (renewals keep it). Raises the
        CommandRefused of the refusal: a wrong or lapsed token (CommandConflict), a lease of
        another user (AccessDenied).
        """
        resource, expires_at = await self._command("Control", "UseLease", _string(token))
        self._leases_used.add(token)
        return Lease(resource, token, expires_at)

    async def break_lock(self, resource: str) -> None:
        """Break whoever holds a resource's lock (admins; the holder is told, the break audited).

        Raises AccessDenied without the right, CommandConflict if nobody holds the lock.
        """
        server = await self._lock_server(resource)
        if server is not None:
            return await self._at_lock(server, resource, lambda s: s.break_lock(resource))
        (status,), refusal = await self._command_diagnosed(f"Resources/{resource}/Lock", "BreakLock")
        if status != 0:
            raise refusal_from_dict(refusal or {"kind": "conflict", "action": "lock.break", "target": resource,
                                                "message": f"{resource}: the resource is not locked"}, command="BreakLock")  # fmt: skip

    async def unlock(self, resource: str, token: str | None = None) -> None:
        """Release a lease or withdraw a queued request (by token, else this user's own on the resource)."""
        server = await self._lock_server(resource)
        if server is not None:
            return await self._at_lock(server, resource, lambda s: s.unlock(resource, token))
        await self._command(f"Resources/{resource}/Lock", "ReleaseLease", _string(token or ""))

    @contextlib.asynccontextmanager
    async def hold_lock(
        self, resource: str, duration_s: float = 60.0, *, priority: int = 0, wait: bool = False, timeout_s: float | None = None
    ) -> AsyncIterator[HeldLock]:
        """Hold a resource's lock for the ``async with`` block, renewing it every third of ``duration_s``.

        The lease is released when the block ends. The lock's ``LockingClient`` is watched,
        so a break is noticed at once (the lease is checked by renewing it when the holder
        changes), not at the next renewal. If a renewal fails (the lock was broken, or
        lapsed while the server was unreachable), renewing stops and the
        :class:`HeldLock` says why in ``lost``.
        """
        server = await self._lock_server(resource)
        if server is not None:
            assert self._site is not None
            async with self._site.holding(server, [_lock_pv(resource)]) as owner, owner.hold_lock(
                resource, duration_s, priority=priority, wait=wait, timeout_s=timeout_s
            ) as held:
                yield held
            return
        lease = await self.lock(resource, duration_s=duration_s, priority=priority, wait=wait, timeout_s=timeout_s)
        held = HeldLock(lease)
        task = asyncio.create_task(self._keep(held, duration_s), name=f"labctl lock {resource}")
        try:
            yield held
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if held.lost is None:
                with contextlib.suppress(ClientError):
                    await asyncio.shield(self.unlock(resource, held.lease.token))

    async def _keep(self, held: HeldLock, duration_s: float) -> None:
        changed = asyncio.Event()
        sub = None
        try:
            try:  # tell a change of holder at once (a break); without it, the renewal finds out
                sub = await self._call(self.client.create_subscription(100.0, _Changed(changed), queue_maxsize=10))
                node = self.client.get_node(self._node_id(f"/{self.site}/Resources/{held.lease.resource}/Lock/LockingClient"))
                await self._call(sub.subscribe_data_change(node, queuesize=1, sampling_interval=0.0))
            except (ClientError, UaError) as e:
                log.debug("not watching the holder of %s: %s", held.lease.resource, e)
            while True:  # renew every third of the lease, and at once when the holder changes (a renewal is harmless)
                try:
                    async with asyncio.timeout(duration_s / 3):
                        await changed.wait()
                except TimeoutError:
                    pass
                changed.clear()
                try:
                    held.lease = await self.renew(held.lease.resource, held.lease.token, duration_s)
                except ClientError as e:
                    held.lost = str(e)
                    log.warning("lock of %s lost: %s", held.lease.resource, e)
                    return
        finally:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(sub.delete())

    async def _lock_server(self, resource: str) -> str | None:
        """The other server of the site whose resource ``resource`` is (it serves its lock PV), or None: this one."""
        if self._site is None or _lock_pv(resource) in self._meta:
            return None
        try:
            _, remote = await self._site.route([_lock_pv(resource)])
        except NoSuchPV:  # no server has it: this one says so in its own words
            return None
        return next(iter(remote), None)

    async def _at_lock(self, server: str, resource: str, fn: Any) -> Any:
        assert self._site is not None
        return await self._site.call(server, [_lock_pv(resource)], fn)

    # ---- control: alarms and interlocks ----------------------------------------------

    async def alarms(self, *, active_only: bool = True) -> list[AlarmInfo]:
        """Alarm states (``active_only``: those that need attention, shelved ones included), worst first."""
        return [decode_alarm(d) for d in await self._json("ListAlarms", ua.Variant(bool(active_only), ua.VariantType.Boolean))]

    async def acknowledge(self, source: str, comment: str = "") -> None:
        """Acknowledge an alarm (needs a role that may)."""
        await self._command("Control", "AcknowledgeAlarm", _string(source), _string(comment))

    async def shelve(self, source: str, duration_s: float, reason: str) -> None:
        """Silence an alarm for ``duration_s`` with a reason (experts)."""
        await self._command("Control", "ShelveAlarm", _string(source), _double(duration_s), _string(reason))

    async def unshelve(self, source: str) -> None:
        """End an alarm's shelving early (experts)."""
        await self._command("Control", "UnshelveAlarm", _string(source))

    async def interlocks(self) -> list[InterlockInfo]:
        """Every interlock's state."""
        return [decode_interlock(d) for d in await self._json("ListInterlocks")]

    async def reset_interlock(self, name: str) -> None:
        """Reset an interlock that waits for it (needs one of its reset roles)."""
        await self._command("Control", "ResetInterlock", _string(name))

    # ---- control: jobs and audit ------------------------------------------------------

    async def procedures(self) -> list[ProcedureInfo]:
        """The procedures jobs run."""
        return [decode_procedure(d) for d in await self._json("ListProcedures")]

    async def submit(self, procedure: str, params: dict, *, priority: int = 0) -> int:
        """Queue a job; its id. Parameters are converted by the server to their declared types."""
        (job_id,) = await self._command(
            "Control", "SubmitTask", _string(procedure), _string(json.dumps(params)), ua.Variant(int(priority), ua.VariantType.Int32)
        )
        return int(job_id)

    async def jobs(self, *, mine: bool = False) -> list[JobInfo]:
        """Jobs, newest first (``mine``: only this user's)."""
        return [decode_job(d) for d in await self._json("ListJobs", ua.Variant(bool(mine), ua.VariantType.Boolean))]

    async def job(self, job_id: int) -> JobDetail:
        """A job with its log and results (its owner or an admin)."""
        return decode_job_detail(await self._json("GetJob", ua.Variant(int(job_id), ua.VariantType.Int64)))

    async def cancel(self, job_id: int) -> None:
        """Cancel a queued or running job (its owner or an admin)."""
        await self._command("Control", "CancelTask", ua.Variant(int(job_id), ua.VariantType.Int64))

    async def audit(self, since: float, *, user: str | None = None, pv: str | None = None) -> list[dict]:
        """Audit records since ``since`` (UNIX s), oldest first: ``time, action, user, protocol, host, target, old, new, accepted, reason``."""
        return await self._json("ListAudit", _double(since), _string(user or ""), _string(pv or ""))

    async def history(
        self, name: str, since: float | _dt.datetime, until: float | _dt.datetime | None = None, every: float | None = None,
        *, bounds: bool = True,
    ) -> Any:  # fmt: skip
        """A PV's archived history over ``[since, until)`` (UNIX s or aware datetimes; ``until`` default now):
        raw values (first the value in force at ``since`` unless ``bounds=False``), or per ``every``
        seconds the time-weighted mean, min, max and count with the last value carried forward, as a
        :class:`labctl.clients.history.History` (NumPy arrays, ``.to_dataframe()``). Raises NoSuchPV,
        HistoryUnavailable, ValueError."""
        from labctl.clients.history import read_history  # the history module builds on this one

        return await read_history(self, name, since, until, every, bounds=bounds)

    def monitor(self, names: Iterable[str], *, queue_size: int = 10_000, publishing_interval_ms: float = 100.0) -> Monitor | SiteMonitor:
        """Watch PVs: an async iterator (and async context manager) of :class:`~labctl.clients.values.Sample`.

        The current value of each PV comes first, then every change the server publishes.
        Up to ``queue_size`` samples wait for the consumer; beyond that the oldest are
        dropped. The server batches changes every ``publishing_interval_ms``. On a site,
        PVs of other servers are watched on their servers (:class:`~labctl.clients.site.SiteMonitor`:
        a PV whose server is down is shown disconnected).
        """
        if self._site is not None:
            return SiteMonitor(self, list(names), queue_size, publishing_interval_ms)
        return Monitor(self, list(names), queue_size, publishing_interval_ms)


def _lock_pv(resource: str) -> str:
    """The PV that says who holds ``resource``'s lock (served by the server whose resource it is; named as the server names it)."""
    return f"ARB:{resource.upper()}:OWNER"


def _who(user: ua.DataValue, roles: ua.DataValue) -> tuple[str, tuple[str, ...]]:
    return (user.Value.Value if user.Value is not None else "") or "", tuple(roles.Value.Value or ()) if roles.Value is not None else ()


async def _no_opener(endpoint: str) -> Session:
    raise ConnectError(f"{endpoint}: this session does not open sessions to other servers (connected with site=False)")


def _string(v: str) -> ua.Variant:
    return ua.Variant(v, ua.VariantType.String)


def _double(v: float) -> ua.Variant:
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"expected a finite number, got {v}")
    return ua.Variant(v, ua.VariantType.Double)



class _Changed:
    """An asyncua subscription handler that sets an event on every data change."""

    def __init__(self, event: asyncio.Event) -> None:
        self.event = event

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        self.event.set()


def _refusal_data(infos: list[ua.DiagnosticInfo] | None) -> dict[str, Any] | None:
    """The refusal the server sent as data with the (one) operation of a response, if any."""
    for info in infos or []:
        if info is not None and info.AdditionalInfo:
            try:
                data = json.loads(info.AdditionalInfo)
            except ValueError:
                return None
            return data if isinstance(data, dict) else None
    return None
