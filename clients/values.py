"""PV values in the client: metadata, readings, and their conversions to and from OPC UA.

Theory of operation. A labctl server addresses a PV by its NodeId ``ns=<idx>;s=<PV name>``
and describes it with standard attributes and properties (DataType, ValueRank,
ArrayDimensions, Description, AccessLevel, UserAccessLevel, Historizing, EngineeringUnits,
EURange, EnumStrings); :func:`metadata_of` turns the values of those, read in one request,
into a :class:`Metadata` (an Int node with EnumStrings is an enum, a one-dimensional
Double a ``float64[]``).

Severity and status. A value's StatusCode says only whether it can be used, as OPC UA
means it: Good for a PV in MINOR or MAJOR alarm too, Bad for an INVALID one with the
code saying why (:func:`quality` turns a Bad code back into INVALID and its status).
The alarm itself is the PV's ``AlarmState`` variable (NodeId ``<PV name>.AlarmState``,
:func:`alarm_node_name`): ``100 x severity + status`` of the same reading
(:func:`alarm_of`), stamped with that reading's time. :func:`reading_of` makes a
DataValue -- with the ``AlarmState`` DataValue in force at its time, when there is one
-- a :class:`~labctl.ioc.types.Reading` with the value in the PV type's Python form. The
session reads both in one request; a monitor subscribes to both and pairs them by their
SourceTimestamp (:mod:`labctl.clients.monitor`). (Without an ``AlarmState``, an older
server's limit bits still decode: Uncertain with a limit bit MAJOR, Good with one MINOR.)

:func:`to_variant` makes a Python value the Variant a PV expects; :func:`format_value` shows a value to people, floats with the PV's precision
(its EPICS PREC, served as the node's ``ValuePrecision`` property: :func:`format_number`).
Programs that want every digit take the value itself (``--json`` does).

This module shares no code with the server beyond the value types of
:mod:`labctl.ioc.types`.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from asyncua import ua
from asyncua.ua.uaerrors import UaError
from labctl.ioc.types import PVType, Reading, Severity, Status

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
    """Browse path below Objects, e.g. ``lab/magnet/MAG:TEMP:A`` (from :meth:`~labctl.clients.session.Session.list_pvs`)."""
    precision: int | None = None
    """Digits after the decimal point to show (the PV's PREC, OPC UA's ``ValuePrecision``); None: not declared."""
    alarm_state: bool = True
    """The PV has an ``AlarmState`` variable (it can be MINOR or MAJOR); without one its
    severity is NO_ALARM or INVALID, from the Value's StatusCode alone."""


@dataclass(frozen=True, slots=True)
class PVValue:
    """A PV's reading with its metadata (what :meth:`~labctl.clients.session.Session.get` returns)."""

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
    """One change of one PV, as :class:`~labctl.clients.monitor.Monitor` yields it."""

    name: str
    reading: Reading
    connected: bool = True
    """False: the PV's server (another server of the site) went down or cannot be reached; the
    reading is then INVALID/COMM without a value, never the last value it had
    (:class:`labctl.clients.site.SiteMonitor`)."""


def quality(code: int) -> tuple[Severity, Status]:
    """EPICS-style severity and status of a StatusCode: INVALID and its status for a Bad one.

    A Good one is NO_ALARM (the alarm is the PV's ``AlarmState``: :func:`reading_of`); the
    limit bits of an older labctl server, which put the alarm into the StatusCode, still decode.
    """
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


#: BrowseName of a PV's alarm-state variable; its NodeId is ``<PV name>.AlarmState``.
ALARM_STATE = "AlarmState"


def alarm_node_name(name: str) -> str:
    """The NodeId string of a PV's ``AlarmState`` variable."""
    return f"{name}.{ALARM_STATE}"


def alarm_of(value: Any) -> tuple[Severity, Status] | None:
    """The severity and status of an ``AlarmState`` value (``100 x severity + status``), or None if it is not one."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 100 * len(Severity):
        return None
    severity, status = divmod(value, 100)
    if status >= len(Status):
        return None
    return Severity(severity), Status(status)


def _alarm_dv(alarm: ua.DataValue | None) -> tuple[Severity, Status] | None:
    if alarm is None or alarm.Value is None or (alarm.StatusCode is not None and not alarm.StatusCode.is_good()):
        return None
    return alarm_of(alarm.Value.Value)


def status_name(code: int) -> str:
    """The symbolic name of a StatusCode (limit bits aside)."""
    return ua.StatusCode(code & 0xFFFF0000).name


def reading_of(meta: Metadata, dv: ua.DataValue, alarm: ua.DataValue | None = None) -> Reading:
    """A DataValue as a :class:`~labctl.ioc.types.Reading` (value in the PV type's Python form).

    ``alarm``: the PV's ``AlarmState`` in force at the value's time, for its severity and
    status below INVALID (a Bad StatusCode is INVALID whatever it says).
    """
    code = dv.StatusCode.value if dv.StatusCode is not None else 0
    severity, status = quality(code)
    state = _alarm_dv(alarm)
    if severity is not Severity.INVALID and state is not None:
        # An INVALID state beside a usable value belongs to another reading: not this value's alarm.
        severity, status = state if state[0] is not Severity.INVALID else (Severity.NO_ALARM, Status.NO_ALARM)
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


def format_number(value: float, precision: int | None) -> str:
    """A float as people read it: ``precision`` digits after the decimal point (EPICS PREC).

    ``0.0146309`` with precision 4 is ``0.0146``. A value too small for that many digits
    to show anything (``2.3e-08`` mbar with precision 2 would read ``0.00``) or too large
    for fixed notation (1e15 and up) is shown in exponent form with ``precision`` digits
    after the point instead (``2.30e-08``), as a gauge display does. Without a precision
    (None): six significant digits. NaN and infinities as Python spells them.
    """
    if precision is None or not math.isfinite(value):
        return f"{value:.6g}"
    p = max(0, min(int(precision), 17))
    magnitude = abs(value)
    if magnitude >= 1e15 or (magnitude != 0.0 and magnitude < 0.5 * 10.0**-p):
        return f"{value:.{p}e}"
    return f"{value:.{p}f}"


def format_value(meta: Metadata, value: Any) -> str:
    """A value as text for people: enum state names, floats to the PV's precision (:func:`format_number`), arrays in brackets."""
    if value is None:
        return "(invalid)"
    if meta.type is PVType.ENUM and isinstance(value, int) and 0 <= value < len(meta.states):
        return meta.states[value]
    if meta.type is PVType.BOOL:
        return "true" if value else "false"
    if isinstance(value, float):
        return format_number(value, meta.precision)
    if isinstance(value, tuple):
        shown = ", ".join(format_number(x, meta.precision) if isinstance(x, float) else str(x) for x in value[:8])
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


# ---- metadata ------------------------------------------------------------------------

#: The attributes of a PV's node that :func:`metadata_of` decodes, in order.
METADATA_ATTRIBUTES = (
    ua.AttributeIds.DataType,
    ua.AttributeIds.ValueRank,
    ua.AttributeIds.ArrayDimensions,
    ua.AttributeIds.Description,
    ua.AttributeIds.AccessLevel,
    ua.AttributeIds.UserAccessLevel,
    ua.AttributeIds.Historizing,
)
#: The properties (``<PV name>.<property>`` nodes) read after :data:`METADATA_ATTRIBUTES`
#: (``ValuePrecision``: Part 8's DataItemType property, digits after the decimal point of a Double).
METADATA_PROPERTIES = ("EngineeringUnits", "EURange", "EnumStrings", "ValuePrecision", "AlarmState")
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


def metadata_of(name: str, values: Sequence[ua.DataValue], path: str = "") -> Metadata:
    """Metadata from the values of :data:`METADATA_ATTRIBUTES` followed by :data:`METADATA_PROPERTIES`."""

    def good(dv: ua.DataValue) -> Any:
        ok = dv.StatusCode is None or dv.StatusCode.is_good()
        return dv.Value.Value if ok and dv.Value is not None else None

    dtype, rank, dims, desc, access, user_access, hist, eu, eurange, states, prec, alarm = (good(v) for v in values)
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
        precision=int(prec) if isinstance(prec, (int, float)) and not isinstance(prec, bool) and math.isfinite(prec) and 0 <= prec <= 17 else None,
        alarm_state=alarm is not None,
    )
