"""The labctl client session: list, get, put and monitor PVs of a labctl server over OPC UA.

Theory of operation. :func:`connect` opens an asyncua client session to a server's
endpoint as a user (or anonymously), with the security the caller asks for (``auto``
picks the most secure Basic256Sha256 mode the server offers). The session finds the
site's namespace (``urn:labctl:<site>``) and addresses a PV by its NodeId
``ns=<idx>;s=<PV name>``, so it needs no browsing to get or put.

* :meth:`Session.list_pvs` browses ``Objects/<site>`` breadth-first, one Browse request
  per level and batched Reads for the metadata.
* :meth:`Session.get` reads value and metadata (DataType, ValueRank, EngineeringUnits,
  EURange, EnumStrings, access levels) in one Read; metadata is cached per session.
* :meth:`Session.put` writes a Variant of the PV's type. A refused write raises
  :class:`PutRefused` with the server's StatusCode and its reason, which the server keeps
  per session in ``Objects/<site>/Session/LastWriteRefusal``.
* :meth:`Session.monitor` subscribes to PVs; the returned :class:`Monitor` is an async
  iterator of :class:`Sample` (the current values first, then every change), buffered up
  to ``queue_size`` samples, beyond which the oldest are dropped.

The control layer (locks, jobs, alarms, interlocks, the audit trail) is reached through
the server's methods (``Objects/<site>/Control`` and each lockable resource's
``Objects/<site>/Resources/<resource>/Lock``), whose structured answers are JSON and come
back as the frozen dataclasses below (:class:`LockInfo`, :class:`Lease`,
:class:`AlarmInfo`, :class:`JobInfo`, :class:`JobDetail`, :class:`ProcedureInfo`,
:class:`InterlockInfo`). A refused call raises :class:`CommandRefused` (or its
subclasses :class:`AccessDenied`, :class:`LockUnavailable`) with the server's StatusCode
and its reason, which the server keeps per session in
``Objects/<site>/Session/LastCallRefusal``. :meth:`Session.lock` with ``wait=True``
queues and waits for the grant, watching the lock's ``LockingClient`` variable;
:meth:`Session.hold_lock` keeps a lease renewed (every third of its duration) for as
long as a ``with`` block runs.

A server's StatusCode is turned back into an EPICS-style severity and status
(:func:`quality`): Bad is INVALID (the code says why), UncertainEngineeringUnitsExceeded
with a limit bit is a MAJOR HIHI/LOLO alarm, Good with a limit bit a MINOR HIGH/LOW one.

This module talks to the server over the network only; it shares no code with the
server beyond the value types of :mod:`ioc.types`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import fnmatch
import functools
import json
import logging
import math
import re
import socket
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from asyncua import Client, ua
from asyncua.common.subscription import DataChangeEvent, StatusChangeEvent
from asyncua.crypto import uacrypto
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.ua.uaerrors import UaError, UaStatusCodeError

from ioc.types import PVType, Reading, Severity, Status

log = logging.getLogger(__name__)

NAMESPACE = re.compile(r"^urn:labctl:([A-Za-z_][A-Za-z0-9_\-]*)$")
CLIENT_URI = "urn:labctl:client"
#: Security choices: ``auto`` picks the most secure one the server offers.
SECURITY = ("auto", "None", "Sign", "SignAndEncrypt")
_MODES = {
    "Sign": ua.MessageSecurityMode.Sign,
    "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
    "Basic256Sha256_Sign": ua.MessageSecurityMode.Sign,
    "Basic256Sha256_SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
}
#: ReadValueIds per Read request when reading metadata of many PVs.
READ_CHUNK = 2000

_S = ua.StatusCodes
LIMIT_LOW = 0x100
LIMIT_HIGH = 0x200

#: Bad StatusCode -> the status of an INVALID reading.
INVALID_STATUS: dict[int, Status] = {
    _S.BadCommunicationError: Status.COMM,
    _S.BadTimeout: Status.TIMEOUT,
    _S.BadWaitingForInitialData: Status.UDF,
    _S.BadDeviceFailure: Status.READ,
    _S.BadNoCommunication: Status.LINK,
    _S.BadDataUnavailable: Status.CALC,
    _S.BadSensorFailure: Status.HWLIMIT,
    _S.BadOutOfService: Status.DISABLE,
}


# ---- errors ---------------------------------------------------------------------------


class ClientError(Exception):
    """Base of the errors this library raises; ``str()`` is one line a person understands."""


class ConnectError(ClientError):
    """The server cannot be reached, refused the login, or does not offer the security asked for."""


class NoSuchPV(ClientError, KeyError):
    """The server has no PV of that name."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(name)

    def __str__(self) -> str:
        return f"no PV named {self.name!r}"


class PutRefused(ClientError):
    """The server refused (or failed) a write. ``status`` is its StatusCode name, ``reason`` its sentence."""

    def __init__(self, pv: str, status: str, code: int, reason: str) -> None:
        self.pv = pv
        self.status = status
        self.code = code
        self.reason = reason
        super().__init__(f"{pv}: write refused ({status}): {reason}")


class RequestTimeout(ClientError, TimeoutError):
    """The server did not answer in time."""


class CommandRefused(ClientError):
    """The server refused (or failed) a control call: ``command`` is the method, ``status`` its StatusCode name, ``reason`` its sentence."""

    def __init__(self, command: str, status: str, code: int, reason: str) -> None:
        self.command = command
        self.status = status
        self.code = code
        self.reason = reason
        super().__init__(f"{reason} ({status})")


class AccessDenied(CommandRefused):
    """The user's roles do not allow it (BadUserAccessDenied)."""


class LockUnavailable(CommandRefused):
    """The resource is locked by someone else (BadLocked); the reason names the holder and until when."""


class LockWaitTimeout(ClientError, TimeoutError):
    """A queued lock request was not granted in time (the request is withdrawn)."""


class ConnectionLost(ClientError):
    """The connection to the server broke while monitoring."""


# ---- value types ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Metadata:
    """What the server says about a PV (besides its value)."""

    name: str
    type: PVType | None
    """None for a variable whose data type labctl does not use."""
    description: str = ""
    unit: str = ""
    unit_description: str = ""
    display: tuple[float, float] | None = None
    """EURange: the display range (or drive limits) the server declares."""
    states: tuple[str, ...] = ()
    length: int | None = None
    """Fixed length of a float64[] PV (None: variable)."""
    writable: bool = False
    """The PV takes writes at all (AccessLevel)."""
    user_writable: bool = False
    """This session's user may write it (UserAccessLevel)."""
    historizing: bool = False
    path: str = ""
    """Browse path below Objects, e.g. ``lab/ls336/temperature_A`` (from :meth:`Session.list_pvs`)."""


@dataclass(frozen=True, slots=True)
class PVValue:
    """A PV's reading with its metadata (what :meth:`Session.get` returns)."""

    name: str
    reading: Reading
    meta: Metadata

    @property
    def value(self) -> Any:
        """The value (None when the reading is INVALID)."""
        return self.reading.value

    @property
    def display_value(self) -> str:
        """The value as a person reads it: enum state names, compact floats and arrays."""
        return format_value(self.meta, self.reading.value)


@dataclass(frozen=True, slots=True)
class Sample:
    """One change of one PV, as :class:`Monitor` yields it."""

    name: str
    reading: Reading


def quality(code: int) -> tuple[Severity, Status]:
    """EPICS-style severity and status of a labctl server's StatusCode."""
    base = code & 0xFFFF0000
    limit = code & (LIMIT_LOW | LIMIT_HIGH)
    if base & 0x80000000:
        return Severity.INVALID, INVALID_STATUS.get(base, Status.READ)
    if base & 0x40000000:
        if limit == LIMIT_HIGH:
            return Severity.MAJOR, Status.HIHI
        if limit == LIMIT_LOW:
            return Severity.MAJOR, Status.LOLO
        return Severity.MAJOR, Status.STATE
    if limit == LIMIT_HIGH:
        return Severity.MINOR, Status.HIGH
    if limit == LIMIT_LOW:
        return Severity.MINOR, Status.LOW
    return Severity.NO_ALARM, Status.NO_ALARM


def status_name(code: int) -> str:
    """The symbolic name of a StatusCode (limit bits aside)."""
    return ua.StatusCode(code & 0xFFFF0000).name


def reading_of(meta: Metadata, dv: ua.DataValue) -> Reading:
    """A DataValue as a :class:`~ioc.types.Reading` (value in the PV type's Python form)."""
    code = dv.StatusCode.value if dv.StatusCode is not None else 0
    severity, status = quality(code)
    ts = dv.SourceTimestamp or dv.ServerTimestamp
    if ts is None:
        timestamp = time.time()
    else:
        timestamp = (ts if ts.tzinfo is not None else ts.replace(tzinfo=_dt.UTC)).timestamp()
    value = None
    if severity is not Severity.INVALID and dv.Value is not None:
        value = _python(meta, dv.Value.Value)
    return Reading(value, timestamp, severity, status)


def _python(meta: Metadata, v: Any) -> Any:
    t = meta.type
    if v is None:
        return None
    if t is PVType.FLOAT64:
        return float(v)
    if t in (PVType.INT, PVType.ENUM):
        return int(v)
    if t is PVType.BOOL:
        return bool(v)
    if t is PVType.FLOAT64_ARRAY:
        return tuple(float(x) for x in v)
    return v


def format_value(meta: Metadata, value: Any) -> str:
    """A value as text for people."""
    if value is None:
        return "(invalid)"
    if meta.type is PVType.ENUM and isinstance(value, int) and 0 <= value < len(meta.states):
        return meta.states[value]
    if meta.type is PVType.BOOL:
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple):
        shown = ", ".join(f"{x:.6g}" if isinstance(x, float) else str(x) for x in value[:8])
        return f"[{shown}{', ...' if len(value) > 8 else ''}] ({len(value)})"
    return str(value)


def to_variant(meta: Metadata, value: Any) -> ua.Variant:
    """A Python value as the Variant a PV expects; anything else is sent as-is for the server to judge."""
    t = meta.type
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # numpy scalars and arrays
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is PVType.FLOAT64 and is_number:
        return ua.Variant(float(value), ua.VariantType.Double)
    if t is PVType.INT and isinstance(value, int) and not isinstance(value, bool):
        return ua.Variant(value, ua.VariantType.Int64)
    if t is PVType.BOOL and isinstance(value, bool):
        return ua.Variant(value, ua.VariantType.Boolean)
    if t is PVType.ENUM:
        if isinstance(value, str) and value in meta.states:
            return ua.Variant(meta.states.index(value), ua.VariantType.UInt32)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return ua.Variant(value, ua.VariantType.UInt32)
    if t is PVType.STRING and isinstance(value, str):
        return ua.Variant(value, ua.VariantType.String)
    if t is PVType.FLOAT64_ARRAY and isinstance(value, (list, tuple)):
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
            return ua.Variant([float(x) for x in value], ua.VariantType.Double, is_array=True)
    if isinstance(value, tuple):
        value = list(value)
    try:
        return ua.Variant(value)
    except (UaError, ValueError, TypeError):
        return ua.Variant(str(value), ua.VariantType.String)


# ---- control-layer records ------------------------------------------------------------


@dataclass(frozen=True)
class LockInfo:
    """A resource's lock: who holds it, until when, who waits (``queue``: (user, priority) in serving order)."""

    resource: str
    lockable: bool
    owner: str
    client: str
    expires_at: float | None
    queue: list[tuple[str, int]]


@dataclass(frozen=True)
class Lease:
    """A lock this client holds: renew or release it with ``token``."""

    resource: str
    token: str
    expires_at: float


@dataclass(frozen=True)
class AlarmInfo:
    """An alarm's state: ``severity`` is the latched one, ``current`` the PV's severity now."""

    source: str
    severity: str
    current: str
    status: str
    acked: bool
    active: bool
    message: str
    guidance: str
    since: float
    shelved_until: float | None


@dataclass(frozen=True)
class JobInfo:
    """A job's summary."""

    id: int
    procedure: str
    owner: str
    state: str
    paused: bool
    priority: int
    params: dict
    resources: list[str]
    submitted_at: float
    started_at: float | None
    ended_at: float | None
    error: str


@dataclass(frozen=True)
class JobDetail(JobInfo):
    """A job with its log ``(time, line)`` and results ``(time, pv, value, severity, status, label)``."""

    log: list[tuple[float, str]] = field(default_factory=list)
    results: list[tuple[float, str, Any, str, str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class ProcedureInfo:
    """A procedure jobs run: its resources and parameters (``param -> {type, default, description, min, max}``)."""

    name: str
    description: str
    resources: list[str]
    params: dict[str, dict]


@dataclass(frozen=True)
class InterlockInfo:
    """An interlock's state (OK, WARN, PENDING, TRIPPED, CLEARING, RESET_NEEDED) and why."""

    name: str
    state: str
    reason: str
    description: str


def _job_info(d: dict[str, Any]) -> JobInfo:
    return JobInfo(
        id=int(d["id"]), procedure=d["procedure"], owner=d["owner"], state=d["state"], paused=bool(d["paused"]),
        priority=int(d["priority"]), params=dict(d["params"]), resources=list(d["resources"]),
        submitted_at=d["submitted_at"], started_at=d["started_at"], ended_at=d["ended_at"], error=d["error"],
    )  # fmt: skip


def _job_detail(d: dict[str, Any]) -> JobDetail:
    info = _job_info(d)
    log_lines = [(float(t), str(line)) for t, line in d.get("log", [])]
    results = [(r["time"], r["pv"], _value(r["value"]), r["severity"], r["status"], r["label"]) for r in d.get("results", [])]
    return JobDetail(**{k: getattr(info, k) for k in JobInfo.__dataclass_fields__}, log=log_lines, results=results)


def _value(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


# ---- metadata ------------------------------------------------------------------------

_ATTRS = (
    ua.AttributeIds.DataType,
    ua.AttributeIds.ValueRank,
    ua.AttributeIds.ArrayDimensions,
    ua.AttributeIds.Description,
    ua.AttributeIds.AccessLevel,
    ua.AttributeIds.UserAccessLevel,
    ua.AttributeIds.Historizing,
)
_PROPS = ("EngineeringUnits", "EURange", "EnumStrings")
_DATA_TYPES = {
    ua.ObjectIds.Double: PVType.FLOAT64,
    ua.ObjectIds.Float: PVType.FLOAT64,
    ua.ObjectIds.Int64: PVType.INT,
    ua.ObjectIds.Int32: PVType.INT,
    ua.ObjectIds.Int16: PVType.INT,
    ua.ObjectIds.UInt16: PVType.INT,
    ua.ObjectIds.UInt64: PVType.INT,
    ua.ObjectIds.Boolean: PVType.BOOL,
    ua.ObjectIds.UInt32: PVType.INT,
    ua.ObjectIds.String: PVType.STRING,
}


def _metadata(name: str, values: Sequence[ua.DataValue], path: str = "") -> Metadata:
    """Metadata from the values of :data:`_ATTRS` followed by :data:`_PROPS`."""

    def good(dv: ua.DataValue) -> Any:
        ok = dv.StatusCode is None or dv.StatusCode.is_good()
        return dv.Value.Value if ok and dv.Value is not None else None

    dtype, rank, dims, desc, access, user_access, hist, eu, eurange, states = (good(v) for v in values)
    t = _DATA_TYPES.get(dtype.Identifier) if isinstance(dtype, ua.NodeId) and dtype.NamespaceIndex == 0 else None
    if states and t in (PVType.INT, None):
        t = PVType.ENUM
    if t is PVType.FLOAT64 and rank == ua.ValueRank.OneDimension:
        t = PVType.FLOAT64_ARRAY
    write = ua.AccessLevel.CurrentWrite.mask
    return Metadata(
        name=name,
        type=t,
        description=desc.Text or "" if isinstance(desc, ua.LocalizedText) else "",
        unit=(eu.DisplayName.Text or "") if isinstance(eu, ua.EUInformation) else "",
        unit_description=(eu.Description.Text or "") if isinstance(eu, ua.EUInformation) else "",
        display=(eurange.Low, eurange.High) if isinstance(eurange, ua.Range) else None,
        states=tuple(s.Text or "" for s in states) if states else (),
        length=(dims[0] or None) if t is PVType.FLOAT64_ARRAY and dims else None,
        writable=bool((access or 0) & write),
        user_writable=bool((user_access or 0) & write),
        historizing=bool(hist),
        path=path,
    )


# ---- the session ----------------------------------------------------------------------


@functools.cache
def application_certificate() -> tuple[bytes, bytes]:
    """A self-signed application certificate and its key (DER) for this process, made once.

    Basic256Sha256 needs a client application certificate. labctl servers accept any (users
    authenticate separately); for a server that checks, pass a trusted one to :func:`connect`.
    """
    from asyncua.crypto.cert_gen import generate_private_key, generate_self_signed_app_certificate
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = generate_private_key()
    names = [x509.UniformResourceIdentifier(CLIENT_URI), x509.DNSName(socket.gethostname())]
    cert = generate_self_signed_app_certificate(
        key, "labctl client", {"organizationName": "labctl"}, names, extended=[ExtendedKeyUsageOID.CLIENT_AUTH], days=365
    )
    return cert.public_bytes(Encoding.DER), key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())


async def connect(
    url: str,
    user: str | None = None,
    password: str | None = None,
    security: str = "auto",
    *,
    timeout_s: float = 10.0,
    certificate: str | None = None,
    private_key: str | None = None,
) -> Session:
    """Open a session to a labctl server.

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

    Raises:
        ConnectError: unreachable, login refused, or the security is not offered.
    """
    if security not in SECURITY and security not in _MODES:
        raise ConnectError(f"unknown security {security!r}; choose one of {', '.join(SECURITY)}")
    client = Client(url, timeout=timeout_s)
    client.name = client.description = "labctl client"
    client.application_uri = CLIENT_URI
    client.session_timeout = 600_000  # what labctl servers grant at most; avoids a revision warning
    if user:
        client.set_user(user)
        client.set_password(password or "")
    try:
        async with asyncio.timeout(timeout_s * 2):
            mode = await _choose_security(client, security)
            if mode is not None:
                if certificate is not None and private_key is not None:
                    cert: Any = uacrypto.CertProperties(certificate)
                    key: Any = uacrypto.CertProperties(private_key)
                else:
                    cert_der, key_der = await asyncio.to_thread(application_certificate)
                    cert, key = uacrypto.CertProperties(cert_der, "der"), uacrypto.CertProperties(key_der, "der")
                await client.set_security(SecurityPolicyBasic256Sha256, cert, key, mode=mode)
            await client.connect()
    except TimeoutError:
        await _quiet_disconnect(client)
        raise ConnectError(f"{url}: no answer within {timeout_s * 2:g} s") from None
    except ConnectError:
        await _quiet_disconnect(client)
        raise
    except UaStatusCodeError as e:
        await _quiet_disconnect(client)
        raise ConnectError(_login_error(url, user, e)) from None
    except ConnectionRefusedError:
        await _quiet_disconnect(client)
        raise ConnectError(f"cannot connect to {url}: connection refused (is a labctl server running there?)") from None
    except (OSError, UaError) as e:
        await _quiet_disconnect(client)
        raise ConnectError(f"cannot connect to {url}: {e}") from None
    session = Session(client, url, timeout_s)
    try:
        await session._init()
    except BaseException:
        await session.close()
        raise
    return session


async def _choose_security(client: Client, security: str) -> ua.MessageSecurityMode | None:
    if security == "None":
        return None
    endpoints = await client.connect_and_get_server_endpoints()
    offered = {e.SecurityMode for e in endpoints if e.SecurityPolicyUri == SecurityPolicyBasic256Sha256.URI}
    has_none = any(e.SecurityMode == ua.MessageSecurityMode.None_ for e in endpoints)
    if security == "auto":
        for mode in (ua.MessageSecurityMode.SignAndEncrypt, ua.MessageSecurityMode.Sign):
            if mode in offered:
                return mode
        if has_none:
            return None
        raise ConnectError(f"{client.server_url.geturl()} offers neither None nor Basic256Sha256 security")
    mode = _MODES[security]
    if mode not in offered:
        raise ConnectError(f"{client.server_url.geturl()} does not offer Basic256Sha256 {mode.name}")
    return mode


def _login_error(url: str, user: str | None, e: UaStatusCodeError) -> str:
    code = e.code
    who = f"user {user!r}" if user else "anonymous login"
    if code in (_S.BadUserAccessDenied, _S.BadIdentityTokenInvalid, _S.BadIdentityTokenRejected):
        if user:
            return f"{url}: login refused for {who} ({status_name(code)}): wrong user name or password, or the account is locked for a while"
        return f"{url}: {who} refused ({status_name(code)}): the server requires a user name"
    return f"{url}: {status_name(code)}: {ua.StatusCode(code).doc}"


async def _quiet_disconnect(client: Client) -> None:
    try:
        await client.disconnect()
    except Exception as e:  # the connection is already broken; nothing more to release
        log.debug("disconnect after a failed connect: %s", e)


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
        self._meta: dict[str, Metadata] = {}
        self._monitors: set[Monitor] = set()
        self._closed = False

    async def _init(self) -> None:
        namespaces = await self._call(self.client.get_namespace_array())
        for idx, uri in enumerate(namespaces):
            m = NAMESPACE.match(uri)
            if m:
                self.site, self.namespace_index = m.group(1), idx
                break
        else:
            raise ConnectError(f"{self.url} is not a labctl server (no urn:labctl:<site> namespace)")
        await self.whoami()

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
        await _quiet_disconnect(self.client)

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- queries --------------------------------------------------------------------

    async def whoami(self) -> tuple[str, tuple[str, ...]]:
        """This session's user and roles, as the server sees them."""
        base = f"/{self.site}/Session"
        values = await self._read([(self._node_id(f"{base}/User"), ua.AttributeIds.Value), (self._node_id(f"{base}/Roles"), ua.AttributeIds.Value)])
        self.user = values[0].Value.Value if values[0].Value is not None else ""
        self.roles = tuple(values[1].Value.Value or ()) if values[1].Value is not None else ()
        return self.user, self.roles

    async def info(self, name: str) -> Metadata:
        """A PV's metadata (cached for the session). Raises NoSuchPV."""
        meta = self._meta.get(name)
        if meta is None:
            meta = (await self._infos([name]))[0]
        return meta

    async def _infos(self, names: Sequence[str], paths: Sequence[str] | None = None) -> list[Metadata]:
        reqs = []
        for name in names:
            nid = self._node_id(name)
            reqs += [(nid, a) for a in _ATTRS]
            reqs += [(self._node_id(f"{name}.{p}"), ua.AttributeIds.Value) for p in _PROPS]
        values = await self._read(reqs)
        per = len(_ATTRS) + len(_PROPS)
        out = []
        for i, name in enumerate(names):
            chunk = values[i * per : (i + 1) * per]
            dtype_status = chunk[0].StatusCode
            if dtype_status is not None and dtype_status.value == _S.BadNodeIdUnknown:
                raise NoSuchPV(name)
            meta = _metadata(name, chunk, paths[i] if paths else "")
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

    async def list_pvs(self, pattern: str | None = None) -> list[Metadata]:
        """Every PV (or those whose name matches the glob ``pattern``), in browse order, with metadata."""
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
        """Several PVs' readings, read in one request (metadata from the cache or one more)."""
        missing = [n for n in dict.fromkeys(names) if n not in self._meta]
        if missing:
            await self._infos(missing)
        values = await self._read([(self._node_id(n), ua.AttributeIds.Value) for n in names])
        return [PVValue(n, reading_of(self._meta[n], dv), self._meta[n]) for n, dv in zip(names, values, strict=True)]

    # ---- commands -------------------------------------------------------------------

    async def put(self, name: str, value: Any) -> None:
        """Write a PV. Raises NoSuchPV, or PutRefused with the server's status and reason."""
        meta = await self.info(name)
        wv = ua.WriteValue()
        wv.NodeId = self._node_id(name)
        wv.AttributeId = ua.AttributeIds.Value
        wv.Value = ua.DataValue(to_variant(meta, value))
        params = ua.WriteParameters()
        params.NodesToWrite.append(wv)
        status = (await self._call(self.client.uaclient.write(params)))[0]
        if status.is_good():
            return
        code = status.value
        reason = await self._refusal(name)
        raise PutRefused(name, status_name(code), code, reason or ua.StatusCode(code).doc)

    async def _refusal(self, name: str) -> str:
        """The server's sentence for this session's last refused write, if it is about ``name``."""
        (dv,) = await self._read([(self._node_id(f"/{self.site}/Session/LastWriteRefusal"), ua.AttributeIds.Value)])
        text = dv.Value.Value if dv.Value is not None and isinstance(dv.Value.Value, str) else ""
        prefix = f"{name}: "
        if not text.startswith(prefix):
            return ""
        text = text[len(prefix) :]
        for opening in ("write refused: ", "write failed: "):
            if text.startswith(opening):
                return text[len(opening) :]
        return text

    # ---- control: calls -------------------------------------------------------------

    async def _command(self, path: str, method: str, *args: ua.Variant) -> list[Any]:
        """Call ``Objects/<site>/<path>/<method>``; the output values, or CommandRefused with the server's reason."""
        base = f"/{self.site}/{path}"
        req = ua.CallMethodRequest()
        req.ObjectId = self._node_id(base)
        req.MethodId = self._node_id(f"{base}/{method}")
        req.InputArguments = list(args)
        (res,) = await self._call(self.client.uaclient.call([req]))
        if res.StatusCode.is_good():
            return [v.Value for v in res.OutputArguments]
        code = res.StatusCode.value
        reason = await self._call_refusal(method)
        if code == _S.BadMethodInvalid or code == _S.BadNodeIdInvalid or code == _S.BadNodeIdUnknown:
            reason = reason or f"the server has no method {path}/{method} (not a labctl server with the control layer?)"
        cls = {_S.BadUserAccessDenied: AccessDenied, _S.BadLocked: LockUnavailable}.get(code, CommandRefused)
        raise cls(method, status_name(code), code, reason or ua.StatusCode(code).doc or status_name(code))

    async def _call_refusal(self, method: str) -> str:
        """The server's sentence for this session's last refused call, if it is about ``method``."""
        (dv,) = await self._read([(self._node_id(f"/{self.site}/Session/LastCallRefusal"), ua.AttributeIds.Value)])
        text = dv.Value.Value if dv.Value is not None and isinstance(dv.Value.Value, str) else ""
        prefix = f"{method}: "
        return text[len(prefix) :] if text.startswith(prefix) else ""

    async def _json(self, method: str, *args: ua.Variant) -> Any:
        (text,) = await self._command("Control", method, *args)
        return json.loads(text)

    # ---- control: locks --------------------------------------------------------------

    async def locks(self) -> list[LockInfo]:
        """Every resource's lock state (lockable or not)."""
        return [
            LockInfo(d["resource"], bool(d["lockable"]), d["owner"], d["client"], d["expires_at"], [(q["user"], int(q["priority"])) for q in d["queue"]])
            for d in await self._json("ListLocks")
        ]

    async def lock(
        self, resource: str, *, duration_s: float = 600, priority: int = 0, wait: bool = False, timeout_s: float | None = None
    ) -> Lease:
        """Take a resource's lock for ``duration_s``.

        Held by someone else: raise LockUnavailable (naming holder and expiry), or with
        ``wait`` queue by priority then arrival and return once granted; after
        ``timeout_s`` (None: no limit) the request is withdrawn and LockWaitTimeout raised.
        A request this session already holds renews it.
        """
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
        (expires_at,) = await self._command(f"Resources/{resource}/Lock", "RenewLease", _string(token), _double(duration_s or 0.0))
        return Lease(resource, token, expires_at)

    async def unlock(self, resource: str, token: str | None = None) -> None:
        """Release a lease or withdraw a queued request (by token, else this user's own on the resource)."""
        await self._command(f"Resources/{resource}/Lock", "ReleaseLease", _string(token or ""))

    @contextlib.asynccontextmanager
    async def hold_lock(
        self, resource: str, duration_s: float = 60.0, *, priority: int = 0, wait: bool = False, timeout_s: float | None = None
    ) -> AsyncIterator[HeldLock]:
        """Hold a resource's lock for the ``async with`` block, renewing it every third of ``duration_s``.

        The lease is released when the block ends. If a renewal fails (the lock was
        broken, or lapsed while the server was unreachable), renewing stops and the
        :class:`HeldLock` says why in ``lost``.
        """
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
        while True:
            await asyncio.sleep(duration_s / 3)
            try:
                held.lease = await self.renew(held.lease.resource, held.lease.token, duration_s)
            except ClientError as e:
                held.lost = str(e)
                log.warning("lock of %s lost: %s", held.lease.resource, e)
                return

    # ---- control: alarms and interlocks ----------------------------------------------

    async def alarms(self, *, active_only: bool = True) -> list[AlarmInfo]:
        """Alarm states (``active_only``: those that need attention, shelved ones included), worst first."""
        return [
            AlarmInfo(d["source"], d["severity"], d["current"], d["status"], bool(d["acked"]), bool(d["active"]), d["message"],
                      d["guidance"], d["since"], d["shelved_until"])  # fmt: skip
            for d in await self._json("ListAlarms", ua.Variant(bool(active_only), ua.VariantType.Boolean))
        ]

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
        return [InterlockInfo(d["name"], d["state"], d["reason"], d["description"]) for d in await self._json("ListInterlocks")]

    async def reset_interlock(self, name: str) -> None:
        """Reset an interlock that waits for it (needs one of its reset roles)."""
        await self._command("Control", "ResetInterlock", _string(name))

    # ---- control: jobs and audit ------------------------------------------------------

    async def procedures(self) -> list[ProcedureInfo]:
        """The procedures jobs run."""
        return [ProcedureInfo(d["name"], d["description"], list(d["resources"]), dict(d["params"])) for d in await self._json("ListProcedures")]

    async def submit(self, procedure: str, params: dict, *, priority: int = 0) -> int:
        """Queue a job; its id. Parameters are converted by the server to their declared types."""
        (job_id,) = await self._command(
            "Control", "SubmitTask", _string(procedure), _string(json.dumps(params)), ua.Variant(int(priority), ua.VariantType.Int32)
        )
        return int(job_id)

    async def jobs(self, *, mine: bool = False) -> list[JobInfo]:
        """Jobs, newest first (``mine``: only this user's)."""
        return [_job_info(d) for d in await self._json("ListJobs", ua.Variant(bool(mine), ua.VariantType.Boolean))]

    async def job(self, job_id: int) -> JobDetail:
        """A job with its log and results (its owner or an admin)."""
        return _job_detail(await self._json("GetJob", ua.Variant(int(job_id), ua.VariantType.Int64)))

    async def cancel(self, job_id: int) -> None:
        """Cancel a queued or running job (its owner or an admin)."""
        await self._command("Control", "CancelTask", ua.Variant(int(job_id), ua.VariantType.Int64))

    async def audit(self, since: float, *, user: str | None = None, pv: str | None = None) -> list[dict]:
        """Audit records since ``since`` (UNIX s), oldest first: ``time, action, user, protocol, host, target, old, new, accepted, reason``."""
        return await self._json("ListAudit", _double(since), _string(user or ""), _string(pv or ""))

    async def history(self, name: str, since: float | _dt.datetime, until: float | _dt.datetime | None = None, every: float | None = None) -> Any:
        """A PV's archived history over ``[since, until)`` (UNIX s or aware datetimes; ``until`` default now):
        raw values, or mean/min/max/count per ``every`` seconds, as a :class:`clients.history.History`
        (NumPy arrays, ``.to_dataframe()``). Raises NoSuchPV, HistoryUnavailable, ValueError."""
        from clients.history import read_history  # the history module builds on this one

        return await read_history(self, name, since, until, every)

    def monitor(self, names: Iterable[str], *, queue_size: int = 10_000, publishing_interval_ms: float = 100.0) -> Monitor:
        """Watch PVs: an async iterator (and async context manager) of :class:`Sample`.

        The current value of each PV comes first, then every change the server publishes.
        Up to ``queue_size`` samples wait for the consumer; beyond that the oldest are
        dropped. The server batches changes every ``publishing_interval_ms``.
        """
        return Monitor(self, list(names), queue_size, publishing_interval_ms)


@dataclass
class HeldLock:
    """A lock kept renewed by :meth:`Session.hold_lock`: the current lease, and why it was lost (None while held)."""

    lease: Lease
    lost: str | None = None


def _string(v: str) -> ua.Variant:
    return ua.Variant(v, ua.VariantType.String)


def _double(v: float) -> ua.Variant:
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"expected a finite number, got {v}")
    return ua.Variant(v, ua.VariantType.Double)


class Monitor:
    """Samples of some PVs as they change (made by :meth:`Session.monitor`)."""

    def __init__(self, session: Session, names: list[str], queue_size: int, interval_ms: float) -> None:
        self.session = session
        self.names = names
        self.queue_size = queue_size
        self.interval_ms = interval_ms
        self._sub: Any = None
        self._by_handle: dict[Any, str] = {}
        self._closed = False

    async def start(self) -> Monitor:
        """Subscribe (done by the first ``async for`` or ``async with`` if not called)."""
        if self._sub is not None:
            return self
        s = self.session
        await s._infos([n for n in dict.fromkeys(self.names) if n not in s._meta])
        sub = await s._call(s.client.create_subscription(self.interval_ms, None, queue_maxsize=self.queue_size))
        self._sub = sub
        s._monitors.add(self)
        nodes = [s.client.get_node(s._node_id(n)) for n in self.names]
        queue = max(1, min(self.queue_size, 1000))  # server-side queue per PV between publishes
        await s._call(sub.subscribe_data_change(nodes, queuesize=queue, sampling_interval=0.0))
        self._by_handle = {node.nodeid: name for node, name in zip(nodes, self.names, strict=True)}
        return self

    async def close(self) -> None:
        """Unsubscribe."""
        if self._closed:
            return
        self._closed = True
        self.session._monitors.discard(self)
        if self._sub is not None:
            try:
                await self._sub.delete()
            except Exception as e:  # the session may be gone already; the server drops it then
                log.debug("deleting a subscription: %s", e)

    async def __aenter__(self) -> Monitor:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[Sample]:
        return self

    async def __anext__(self) -> Sample:
        if self._closed:
            raise StopAsyncIteration
        await self.start()
        while True:
            try:
                event = await self._sub.__anext__()
            except StopAsyncIteration:
                if self._closed or self.session._closed:
                    raise
                raise ConnectionLost(f"{self.session.url}: the subscription was closed") from None
            if isinstance(event, DataChangeEvent):
                name = self._by_handle.get(event.node.nodeid)
                if name is None:
                    continue
                meta = self.session._meta[name]
                return Sample(name, reading_of(meta, event.data.monitored_item.Value))
            if isinstance(event, StatusChangeEvent) and event.notification.Status.is_bad():
                raise ConnectionLost(f"{self.session.url}: subscription ended ({event.notification.Status.name})")

    async def next(self, timeout_s: float) -> Sample:
        """The next sample, waiting at most ``timeout_s``. Raises RequestTimeout."""
        try:
            return await asyncio.wait_for(self.__anext__(), timeout_s)
        except TimeoutError:
            raise RequestTimeout(f"no change of {', '.join(self.names)} within {timeout_s:g} s") from None
