"""One caproto channel per PV, built from its :class:`~labctl.ioc.pv.PVInfo` (no ``pvproperty``).

Theory of operation. Each PV becomes one caproto ``ChannelData`` of its native DBR type:

============  ====================================  ==================================
PV type       channel                               record type reported (RTYP)
============  ====================================  ==================================
float64       DBR_DOUBLE (:class:`DoubleChannel`)   ai / ao, calc if derived
int           DBR_LONG (:class:`LongChannel`)       longin / longout
bool          DBR_ENUM, states ``false``/``true``   bi / bo
enum          DBR_ENUM with its state strings       mbbi / mbbo
string        DBR_STRING (:class:`StringChannel`)   stringin / stringout (lsi / lso when
                                                    longer than 39: a long string)
float64[]     DBR_DOUBLE, ``max_length`` elements   waveform
============  ====================================  ==================================

DBR_CTRL metadata (units, precision, limits, enum states) and the record type come from
the PV (:mod:`labctl.server.ca.metadata`); a float PV's unset limits (NaN) are sent as 0
to a client reading it as an integer type (DBR_GR_LONG...), which has no NaN. Severity and status numbers are EPICS's own,
so a reading's are passed through, and its timestamp becomes the DBR_TIME stamp.

Updates. The service hands every database update to :meth:`ServedChannel.apply_now`,
which stores value, time stamp and alarm in the channel and sends the update to the
channel's monitors. Monitors of the common kind -- a scalar numeric or
enum PV in its own type, no channel filter -- are served directly: the update is encoded
once per data type and queued on each client's connection (:mod:`labctl.server.ca.monitors`).
The rest (arrays, strings, converted types, channel filters) and record fields that
follow the PV take caproto's path, :meth:`ServedChannel.publish_slow`, which the service
awaits from its update queue. Both follow the EPICS rule that a subscription receives
an update only if their event masks share a bit (the database's event bits are the
``DBE_*`` bits: VALUE=1, LOG=2, ALARM=4, PROPERTY=8), so an archiver subscribing with
DBE_LOG sees only changes beyond the archive deadband, and a DBE_ALARM subscriber only
alarm changes; caproto 1.3 itself would publish every update to every subscription
whatever its mask, which :meth:`MaskedChannel.publish` corrects.

Reads are always current. The database hands the service only the updates that pass a
deadband or change the alarm state, yet a get (every DBR type) and a new monitor's first
value return the latest reading the core holds, as an EPICS record's MDEL filters its
monitors and never its value: :meth:`ServedChannel.refresh`, called by
:meth:`ServedChannel.auth_read` and :meth:`ServedChannel.subscribe`, compares the
channel's reading with the core's (the same object unless a post since was filtered out
by the deadband, or was a scan of an unchanged value with a newer time stamp) and stores
the core's without posting a monitor. So ``caput -c`` inside the deadband reads back at
once, and a scanned PV's DBR_TIME stamp is the time of its latest scan.

Reads of every DBR type. A client may ask for any DBR type; :meth:`MaskedChannel._read`
answers as an IOC does (:mod:`labctl.server.ca.convert`): floats as DBR_STRING with the
PV's precision, a string PV's text as a number, DBR_GR/CTRL_STRING in DBR_STS_STRING's
layout, DBR_STSACK_STRING with the value as text, unset alarm limits NaN in the float
types. A value that cannot be converted raises :class:`NoConversion`, which the circuit
answers ECA_GETFAIL (:mod:`labctl.server.ca.context`) -- for a monitor, an update marked
:data:`NOT_CONVERTED` -- so the client's other requests go on.

Writes. A client's put arrives at :meth:`ServedChannel.auth_write` (caproto's hook, with
the client's reported names and address). The wire data is decoded to plain Python
(numbers, strings, lists; :mod:`labctl.server.ca.wire`), converted for the PV as an IOC
converts it (:func:`~labctl.server.ca.convert.put_value`: text parsed as a number, doubles
truncated to integers, numbers to state indices, fewer elements into an array) and handed
to the service's write path, which awaits the core ``Database.write``: a put-callback
completes only after the driver write (and read-back) finished, and any refusal
propagates as the core's :class:`~labctl.ioc.errors.WriteRefused`, already audited. A value
that cannot be converted is refused through the service (:meth:`Binding.refuse_value`),
which audits it as the core would; nothing is checked here that the core checks (limits,
states, roles, locks), so every attempt reaches the audit trail.

Access rights come from :meth:`ServedChannel.check_access`, which asks the service (see
:mod:`labctl.server.ca.access`); reads are never refused. Record fields (``PV.EGU``...) are
separate small read-only channels made on first use by :meth:`ServedChannel.get_field`
(see :mod:`labctl.server.ca.fields`), so a large site does not pay for fields nobody asks for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NoReturn, Protocol

import numpy as np
from caproto import (
    AccessRights,
    AlarmSeverity,
    AlarmStatus,
    ChannelAlarm,
    ChannelData,
    ChannelDouble,
    ChannelEnum,
    ChannelInteger,
    ChannelString,
    ChannelType,
    SubscriptionType,
    backend,
)
from caproto._data import SubscriptionUpdate
from caproto._dbr import (
    DBR_TYPES,
    DbrStringArray,
    TimeStamp,
    _channel_type_by_name,
    _LongStringChannelType,
    native_type,
    native_types,
)
from caproto._utils import CaprotoConversionError, ConversionDirection
from labctl.ioc.errors import WrongType
from labctl.ioc.pv import PVInfo
from labctl.ioc.types import EventMask, PVType, Reading, Severity, Status
from labctl.server.ca.access import Client
from labctl.server.ca.convert import NoConversion, double_text, put_value, text_as
from labctl.server.ca.metadata import MAX_ENUM_STATES, long_string_bytes, numeric_metadata, record_type, states_of
from labctl.server.ca.monitors import EventEncoder, epics_stamp, fast_type
from labctl.server.ca.wire import ENCODING, VALUE_TYPES, clip_strings, plain_value, wire_values

# Enum members by value: calling an IntEnum costs a microsecond, a dict lookup a tenth (once per post).
_ALARM_STATUS = {int(m): m for m in AlarmStatus}
_ALARM_SEVERITY = {int(m): m for m in AlarmSeverity}

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

#: Event bits of a database update -> caproto subscription flags (one table, by name).
DBE_OF: dict[EventMask, SubscriptionType] = {
    EventMask.VALUE: SubscriptionType.DBE_VALUE,
    EventMask.LOG: SubscriptionType.DBE_LOG,
    EventMask.ALARM: SubscriptionType.DBE_ALARM,
    EventMask.PROPERTY: SubscriptionType.DBE_PROPERTY,
}


def dbe_flags(mask: EventMask) -> SubscriptionType:
    """The ``DBE_*`` flags for a database update's event bits."""
    flags = SubscriptionType(0)
    for bit, dbe in DBE_OF.items():
        if mask & bit:
            flags |= dbe
    return flags


class Binding(Protocol):
    """What a channel needs from the service: the write path and the access rules."""

    def rights(self, pv: str, client: Client) -> AccessRights:
        """Access rights of ``client`` on ``pv`` now."""
        ...

    async def put(self, pv: str, value: Any, client: Client) -> None:
        """Write through the core write path; return once written and published."""
        ...

    def refuse(self, target: str, client: Client, value: Any, error: Exception) -> NoReturn:
        """Audit a write refused before it reached the core, then raise ``error``."""
        ...

    def refuse_value(self, pv: str, client: Client, value: Any, error: WrongType) -> NoReturn:
        """Refuse a put whose value cannot be converted: as the core would refuse the write, then ``error``."""
        ...

    def current(self, pv: str) -> Reading:
        """The latest reading the core holds of ``pv`` (whatever the deadbands passed)."""
        ...

    def acknowledgement(self, pv: str) -> tuple[int, int]:
        """ACKT and ACKS of ``pv``: 1 if its alarms latch until acknowledged, and the severity waiting for one."""
        ...


def _int32(value: float) -> int:
    """A limit as a DBR_LONG limit (NaN, meaning unset, becomes 0)."""
    if math.isnan(value):
        return 0
    return max(INT32_MIN, min(INT32_MAX, round(value)))


#: DBR_GR_STRING and DBR_CTRL_STRING have DBR_STS_STRING's layout (EPICS ``db_access.h``);
#: caproto 1.3 sends DBR_CTRL_STRING in DBR_TIME_STRING's.
#: Bytes of one DBR_STRING value on the wire (its text and the NUL).
STRING_BYTES = 40
_METADATA_TYPE = {ChannelType.GR_STRING: ChannelType.STS_STRING, ChannelType.CTRL_STRING: ChannelType.STS_STRING}
#: What caproto raises converting a value it cannot convert.
_CONVERSION_ERRORS = (CaprotoConversionError, ValueError, OverflowError)


class MaskedChannel(ChannelData):
    """A channel that honours subscription event masks and answers every DBR type as an IOC does.

    A mixin, listed before caproto's class; the base of PV channels and record fields.
    """

    async def publish(self, flags: int) -> None:
        """Queue an update for every subscription whose event mask shares a bit with ``flags``.

        caproto's own ``publish`` ignores the subscription mask; this is the same loop with
        EPICS's rule added (and its per-type conversion cache keyed consistently). A data
        type the value cannot be read as now is queued as a failed update (ECA_GETFAIL).
        """
        self._content.clear()
        for queue, syncs in self._queues.items():
            for sync, data_types in syncs.items():
                for data_type_name, sub_specs in data_types.items():
                    eligible = tuple(ss for ss in sub_specs if ss.mask & flags and self._is_eligible(ss))
                    if not eligible:
                        continue
                    source = self if sync is None else self._snapshots[sync.s].get(sync.m)
                    if source is None:
                        continue
                    cached = source._content.get(data_type_name) if source is self else None
                    if cached is None:
                        cached = await source._read_or_fail(_channel_type_by_name[data_type_name])
                        if source is self:
                            self._content[data_type_name] = cached
                    metadata, values = cached
                    await queue.put(SubscriptionUpdate(eligible, metadata, values, flags, None))

    async def subscribe(self, queue: Any, sub_spec: Any, sub: Any) -> None:
        """caproto's, with a first value that cannot be read as the subscription's type sent as a failed update."""
        by_sync = self._queues[queue][sub_spec.channel_filter.sync]
        by_sync[sub_spec.data_type_name].add(sub_spec)
        cached = self._content.get(sub_spec.data_type_name)
        if cached is None:
            cached = await self._read_or_fail(_channel_type_by_name[sub_spec.data_type_name])
            self._content[sub_spec.data_type_name] = cached
        metadata, values = cached
        await queue.put(SubscriptionUpdate((sub_spec,), metadata, values, 0, sub))

    async def _read_or_fail(self, data_type: Any) -> tuple[Any, Any]:
        """:meth:`_read`, or ``(None, NOT_CONVERTED)`` when the value cannot be read as ``data_type``."""
        try:
            return await self._read(data_type)
        except NoConversion:
            return None, NOT_CONVERTED

    async def _read(self, data_type: Any, values: Any = None) -> tuple[Any, Any]:
        """The value as ``data_type`` (metadata, values), converted as an IOC converts it.

        ``values``: these (already of the type's native type) instead of the value's.

        caproto's, with EPICS's answers where caproto's differ: DBR_GR_STRING and
        DBR_CTRL_STRING have DBR_STS_STRING's layout, DBR_STSACK_STRING carries the value
        as text, and a value that cannot be converted raises :class:`NoConversion`
        (answered ECA_GETFAIL) instead of an error that ends the client's request.
        """
        if data_type == ChannelType.CLASS_NAME:
            return await super()._read(data_type)
        if data_type == ChannelType.STSACK_STRING:  # the first value is in the struct, the others follow it
            dbr = await self.alarm.read()
            dbr.ackt, dbr.acks = self.acknowledgement()
            try:
                _, text = await self._read(ChannelType.STRING)
            except NoConversion:
                text = ()
            dbr.value = text[0] if len(text) else b""
            return dbr, b"".join(bytes(v).ljust(STRING_BYTES, b"\0")[:STRING_BYTES] for v in text[1:])
        if isinstance(data_type, _LongStringChannelType):
            native_to: Any = _LongStringChannelType.LONG_STRING
            data_type = ChannelType(data_type)
        else:
            data_type = ChannelType(data_type)
            native_to = native_type(data_type)
        if values is None:
            values = self.wire_values(native_to)
        if data_type in native_types:
            return b"", values
        dbr = DBR_TYPES[_METADATA_TYPE.get(data_type, data_type)]()
        self._read_metadata(dbr)
        alarm = self.alarm
        dbr.status, dbr.severity = alarm.status, alarm.severity
        return dbr, values

    def acknowledgement(self) -> tuple[int, int]:
        """DBR_STSACK_STRING's ACKT and ACKS: whether transient alarms must be acknowledged, and
        the severity waiting for acknowledgement (a channel without alarms: none)."""
        return 0, 0

    def wire_values(self, native_to: Any) -> Any:
        """The value converted to the native DBR type ``native_to`` (caproto's conversion).

        Raises:
            NoConversion: the value cannot be converted to that type.
        """
        try:
            return backend.convert_values(
                values=self._data["value"],
                from_dtype=self.data_type,
                to_dtype=native_to,
                string_encoding=self.string_encoding,
                enum_strings=self._data.get("enum_strings"),
                direction=ConversionDirection.TO_WIRE,
            )
        except _CONVERSION_ERRORS as e:
            raise NoConversion(f"cannot convert {self.data_type.name} to {ChannelType(native_to).name}: {e}") from None


class _NotConverted:
    """The values of an update that could not be converted to its subscription's type (sent as ECA_GETFAIL)."""

    def __len__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "NOT_CONVERTED"


#: See :class:`_NotConverted`.
NOT_CONVERTED = _NotConverted()


class ServedChannel(MaskedChannel):
    """Behaviour shared by every channel that serves a labctl PV (a mixin, listed first)."""

    info: PVInfo
    binding: Binding
    pvname: str

    def _bind(self, info: PVInfo, binding: Binding, pvname: str) -> None:
        self.info = info
        self.binding = binding
        self.pvname = pvname
        self._fields: dict[str, ChannelData] = {}
        self._reading: Reading | None = None
        self._served: tuple[Any, int, int, tuple[int, int]] = (None, 0, 0, (0, 0))
        self._direct: dict[Any, EventEncoder] = {}
        """Subscription specs served by the direct path, with their encoders."""
        self._slow: set[Any] = set()
        """Subscription specs on caproto's path."""
        self._registry: Any = {}
        """caproto's subscriptions by spec (the server context's), once one subscribed."""

    # ---- reading side -------------------------------------------------------------------

    @property
    def reading(self) -> Reading:
        """The reading this channel serves now."""
        assert self._reading is not None
        return self._reading

    @classmethod
    def served(cls, info: PVInfo, reading: Reading) -> tuple[Any, Severity, Status]:
        """The channel value and alarm for a reading (subclasses convert the value)."""
        return reading.value, reading.severity, reading.status

    def apply_now(self, reading: Reading, mask: EventMask) -> bool:
        """Serve ``reading`` and send it to the direct subscriptions sharing ``mask``'s bits.

        Never waits (the database calls the service inline). Returns whether caproto's
        path has work too -- subscriptions it serves, or record fields following the PV --
        for which the service then awaits :meth:`publish_slow`.
        """
        self._reading = reading
        value, severity, status = self.served(self.info, reading)
        stamp = epics_stamp(reading.timestamp)
        status, severity = int(status), int(severity)
        self._served = (value, status, severity, stamp)
        data = self._data
        data["value"] = self.preprocess_value(value)
        data["timestamp"] = TimeStamp(*stamp)
        alarm = self._alarm._data
        alarm["status"] = _ALARM_STATUS[status]
        alarm["severity"] = _ALARM_SEVERITY[severity]
        self._content.clear()
        if self._direct:
            flags = int(mask)  # EventMask bits are the DBE_* bits
            registry = self._registry
            for spec, encoder in self._direct.items():
                if spec.mask & flags:
                    payload = encoder.payload(value, status, severity, stamp)
                    for sub in registry.get(spec, ()):
                        sub.circuit.post_event(sub, spec, encoder.header(sub.subscriptionid) + payload)
        return bool(self._slow) or bool(self._fields)

    def refresh(self) -> None:
        """Hold the core's latest reading, without posting a monitor (see "Reads are always current")."""
        current = self.binding.current(self.info.name)
        if current is not self._reading:
            self.apply_now(current, EventMask.NONE)

    async def publish_slow(self, mask: EventMask) -> None:
        """caproto's path for the latest reading: its subscriptions, and record fields."""
        if self._slow:
            await self.publish(dbe_flags(mask))
        reading = self.reading
        for field in self._fields.values():
            follow = getattr(field, "follow", None)
            if follow is not None:
                await follow(reading)

    async def apply(self, reading: Reading, mask: EventMask) -> None:
        """Serve ``reading`` and publish it on both paths (:meth:`apply_now`, then :meth:`publish_slow`)."""
        if self.apply_now(reading, mask):
            await self.publish_slow(mask)

    # ---- subscriptions ------------------------------------------------------------------

    async def subscribe(self, queue: Any, sub_spec: Any, sub: Any) -> None:
        """A new monitor: direct (see :mod:`labctl.server.ca.monitors`) when it can be, else caproto's.

        Either way its first update is the core's latest reading.
        """
        self.refresh()
        encoder = self._direct.get(sub_spec)
        if encoder is None and self._can_go_direct(sub_spec, sub):
            data_type = ChannelType(sub.data_type)
            metadata, _ = await self._read(data_type)
            encoder = EventEncoder(data_type, bytes(metadata))
            self._direct[sub_spec] = encoder
            self._registry = sub.circuit.context.subscriptions
        if encoder is None:
            self._slow.add(sub_spec)
            await super().subscribe(queue, sub_spec, sub)
            return
        # The current value, to this subscription only (as caproto does on subscribing).
        value, status, severity, stamp = self._served
        sub.circuit.post_event(
            sub, sub_spec, encoder.header(sub.subscriptionid) + encoder.payload(value, status, severity, stamp)
        )

    async def unsubscribe(self, queue: Any, sub_spec: Any) -> None:
        """The last monitor of ``sub_spec`` is gone."""
        if self._direct.pop(sub_spec, None) is not None:
            return
        if sub_spec in self._slow:
            self._slow.discard(sub_spec)
            await super().unsubscribe(queue, sub_spec)

    def _can_go_direct(self, sub_spec: Any, sub: Any) -> bool:
        if any(f is not None for f in sub_spec.channel_filter) or not hasattr(sub.circuit, "post_event"):
            return False
        return fast_type(self.data_type, self.max_length, ChannelType(sub.data_type), sub.data_count)

    def acknowledgement(self) -> tuple[int, int]:
        """ACKT and ACKS from the alarm table (labctl's ``latch`` is EPICS's ACKT)."""
        return self.binding.acknowledgement(self.info.name)

    async def auth_read(self, hostname, username, data_type, *, user_address=None):
        """Every client may read every PV: the core's latest reading (:meth:`refresh`)."""
        self.refresh()
        return await self.read(data_type)

    def check_access(self, hostname: str | None, username: str | None) -> AccessRights:
        """READ|WRITE if the access rules and the core allow this client to write now, else READ."""
        return self.binding.rights(self.info.name, Client(username, hostname))

    def circuit_access(self, hostname: str | None, username: str | None, user_address: Any) -> AccessRights:
        """:meth:`check_access` for one circuit (a lock is held by a circuit, not a name): what the circuit sees."""
        return self.binding.rights(self.info.name, Client.of(hostname, username, user_address))

    # ---- writing side -------------------------------------------------------------------

    async def auth_write(self, hostname, username, data, data_type, metadata, *, flags=0, user_address=None):
        """A client's put: convert it as an IOC does (:mod:`labctl.server.ca.convert`) and await the core write path.

        Raises the core's refusal, or WrongType (audited) for a value that cannot be converted.
        """
        client = Client.of(hostname, username, user_address)
        data_type = ChannelType(data_type)
        if data_type in (ChannelType.PUT_ACKS, ChannelType.PUT_ACKT):
            self.binding.refuse(
                self.info.name,
                client,
                plain_value(data),
                WrongType(self.info.name, "alarm acknowledgement over Channel Access is not supported"),
            )
        if native_type(data_type) not in VALUE_TYPES:
            self.binding.refuse(
                self.info.name, client, None, WrongType(self.info.name, f"cannot write a {data_type.name} value")
            )
        values = self.decode(data, data_type)
        try:
            value = put_value(self.info, self.states, values)
        except WrongType as e:
            self.binding.refuse_value(self.info.name, client, values[0] if len(values) == 1 else values, e)
        await self.binding.put(self.info.name, value, client)

    async def verify_value(self, data: Any) -> Any:
        """Never reached: client writes take :meth:`auth_write`, updates :meth:`apply`."""
        raise WrongType(self.info.name, "writes go through the database write path")

    @property
    def states(self) -> tuple[str, ...]:
        """The state strings of an enum or bool PV as served (none for other PVs)."""
        return ()

    def decode(self, data: Any, data_type: ChannelType) -> list[Any]:
        """Wire data as a list of plain numbers or strings (DBR_CHAR written to a string PV: its text)."""
        native = native_type(data_type)
        as_text = native == ChannelType.STRING or (native == ChannelType.CHAR and self.info.type is PVType.STRING)
        return wire_values(data, native, as_text)

    # ---- record fields ------------------------------------------------------------------

    def get_field(self, field: str) -> ChannelData:
        """The channel of record field ``field`` (``VAL`` is this channel); KeyError if none."""
        if field == "VAL":
            return self
        try:
            return self._fields[field]
        except KeyError:
            pass
        from labctl.server.ca.fields import make_field  # here: fields builds on this module

        channel = make_field(self, field)  # raises KeyError for a field this PV lacks
        self._fields[field] = channel
        return channel


#: Wire types without NaN: a limit that is unset (NaN) is sent to them as 0, as an IOC does.
_INTEGER_TYPES = frozenset({ChannelType.CHAR, ChannelType.INT, ChannelType.LONG, ChannelType.ENUM})
_LIMIT_KEYS = (
    "upper_disp_limit", "lower_disp_limit", "upper_alarm_limit", "upper_warning_limit",
    "lower_warning_limit", "lower_alarm_limit", "upper_ctrl_limit", "lower_ctrl_limit",
)  # fmt: skip


class FloatLimits(ChannelData):
    """Limits of a float channel read as an integer DBR type: unset (NaN) ones become 0 (a mixin)."""

    def _read_metadata(self, dbr_metadata: Any) -> None:
        data = self._data
        unset = [k for k in _LIMIT_KEYS if isinstance(data.get(k), float) and math.isnan(data[k])]
        if not unset or native_type(ChannelType(dbr_metadata.DBR_ID)) not in _INTEGER_TYPES:
            super()._read_metadata(dbr_metadata)
            return
        # caproto casts every limit with numpy, which has no integer for NaN
        for k in unset:
            data[k] = 0.0
        try:
            super()._read_metadata(dbr_metadata)
        finally:
            for k in unset:
                data[k] = math.nan


class PrecisionText(MaskedChannel):
    """A float channel read as DBR_STRING: each value with the PV's precision, as an IOC formats it (a mixin)."""

    def wire_values(self, native_to: Any) -> Any:
        if native_to != ChannelType.STRING:
            return super().wire_values(native_to)
        values = np.atleast_1d(np.asarray(self._data["value"], dtype=np.float64))
        precision = int(self._data.get("precision", 0))
        return DbrStringArray(double_text(float(v), precision).encode(ENCODING) for v in values)


class UnsetAlarmLimits(MaskedChannel):
    """Alarm limits a PV does not set read as NaN in the float DBR types, as an IOC's (a mixin).

    For channels whose limits caproto keeps as integers (int, enum and bool PVs).
    """

    #: The DBR_GR/CTRL alarm limit fields a PV does not set.
    unset_alarm_limits: tuple[str, ...] = ()

    def _read_metadata(self, dbr_metadata: Any) -> None:
        super()._read_metadata(dbr_metadata)
        if native_type(ChannelType(dbr_metadata.DBR_ID)) in (ChannelType.FLOAT, ChannelType.DOUBLE):
            for key in self.unset_alarm_limits:
                if hasattr(dbr_metadata, key):
                    setattr(dbr_metadata, key, math.nan)


_ALARM_LIMIT_OF = {"upper_alarm_limit": "hihi", "upper_warning_limit": "high", "lower_warning_limit": "low",
                   "lower_alarm_limit": "lolo"}  # fmt: skip


class DoubleChannel(ServedChannel, PrecisionText, FloatLimits, ChannelDouble):
    """A float64 PV (DBR_DOUBLE)."""


class ArrayChannel(ServedChannel, PrecisionText, FloatLimits, ChannelDouble):
    """A float64[] PV: DBR_DOUBLE of at most ``max_length`` elements (NELM), holding as many as were written (NORD)."""

    @classmethod
    def served(cls, info: PVInfo, reading: Reading) -> tuple[Any, Severity, Status]:
        """The array as a float64 numpy array (caproto sends it without copying element-wise).

        An instrument that returns more elements than the PV holds gets its array cut to
        ``max_length`` and flagged INVALID/READ rather than dropped.
        """
        value = np.asarray(reading.value, dtype=np.float64)
        severity, status = reading.severity, reading.status
        if len(value) > info.max_length:
            value, severity, status = value[: info.max_length], Severity.INVALID, Status.READ
        if info.max_length == 1 and not len(value):
            value = np.full(1, np.nan)  # caproto keeps a one-element channel as a scalar
        return value, severity, status


class LongChannel(ServedChannel, UnsetAlarmLimits, ChannelInteger):
    """An int PV (DBR_LONG, 32 bits: Channel Access has no 64-bit integer)."""

    @classmethod
    def served(cls, info: PVInfo, reading: Reading) -> tuple[Any, Severity, Status]:
        """Values beyond 32 bits are served saturated and INVALID/HWLIMIT, never wrapped."""
        value = reading.value
        if INT32_MIN <= value <= INT32_MAX:
            return value, reading.severity, reading.status
        return max(INT32_MIN, min(INT32_MAX, value)), Severity.INVALID, Status.HWLIMIT

    def _bind(self, info: PVInfo, binding: Binding, pvname: str) -> None:
        super()._bind(info, binding, pvname)
        alarm = info.alarm
        self.unset_alarm_limits = tuple(
            key for key, level in _ALARM_LIMIT_OF.items() if alarm is None or getattr(alarm, level) is None
        )


class MenuEnum(ChannelEnum):
    """DBR_ENUM holding a state index, with any number of states.

    DBR_STRING and DBR_ENUM values are right for every state; only DBR_GR/CTRL_ENUM, which
    have room for 16 strings, list the first 16 (as an IOC does for a long menu).
    """

    @staticmethod
    def _validate_enum_strings(enum_strings: Sequence[str]) -> tuple[str, ...]:
        return tuple(enum_strings)

    def _read_metadata(self, dbr_metadata: Any) -> None:
        if isinstance(dbr_metadata, (DBR_TYPES[ChannelType.GR_ENUM], DBR_TYPES[ChannelType.CTRL_ENUM])):
            dbr_metadata.enum_strings = [s.encode(ENCODING) for s in self.enum_strings[:MAX_ENUM_STATES]]
        ChannelData._read_metadata(self, dbr_metadata)


class EnumChannel(ServedChannel, UnsetAlarmLimits, MenuEnum):
    """An enum or bool PV (DBR_ENUM; the value is the state index). It has no alarm limits (NaN, as an mbbo's)."""

    unset_alarm_limits = tuple(_ALARM_LIMIT_OF)

    @classmethod
    def served(cls, info: PVInfo, reading: Reading) -> tuple[Any, Severity, Status]:
        """The state index."""
        return int(reading.value), reading.severity, reading.status

    @property
    def states(self) -> tuple[str, ...]:
        """The state strings as served."""
        return tuple(self.enum_strings)


class TextValues(UnsetAlarmLimits):
    """A DBR_STRING channel as an IOC's string field: read as a number type, the number its text spells (a mixin).

    Empty text reads 0; text that spells no number fails the read (ECA_GETFAIL, see
    :func:`~labctl.server.ca.convert.text_as`). As a number it has no limits (0) and no alarm
    limits (NaN), as a stringin's. DBR_STRING reads are cut to 39 bytes (the whole text is
    ``NAME.VAL$``).
    """

    unset_alarm_limits = tuple(_ALARM_LIMIT_OF)

    def wire_values(self, native_to: Any) -> Any:
        if isinstance(native_to, _LongStringChannelType):  # the text's bytes and its NUL, as an lsi's .VAL$
            return np.append(super().wire_values(native_to), np.uint8(0))
        if native_to == ChannelType.STRING:
            return super().wire_values(native_to)
        number = text_as(ChannelType(native_to), str(self._data["value"]))
        return np.array([number], dtype=backend.type_map[ChannelType(native_to)])

    async def _read(self, data_type: Any, values: Any = None) -> Any:
        return clip_strings(data_type, *await super()._read(data_type, values))

    async def read_chars(self, data_type: Any) -> tuple[Any, Any]:
        """The text's bytes as ``data_type``: how an IOC answers a read of a long string's ``NAME.VAL$``
        (a DBR_CHAR array) as another type -- each byte as a number (or as its decimal text)."""
        codes = self.wire_values(_LongStringChannelType.LONG_STRING).view(np.int8)  # DBF_CHAR is signed
        native = native_type(ChannelType(data_type))
        if native == ChannelType.STRING:
            values: Any = DbrStringArray(str(int(c)).encode() for c in codes)
        else:
            values = codes.astype(backend.type_map[native])
        return await self._read(data_type, values)


class StringChannel(ServedChannel, TextValues, ChannelString):
    """A string PV (DBR_STRING; the whole string as a long string through ``NAME.VAL$``)."""


def build_channel(info: PVInfo, reading: Reading, binding: Binding, pvname: str) -> ServedChannel:
    """The channel serving PV ``info`` under the name ``pvname``, holding ``reading``."""
    t = info.type
    cls: type[ServedChannel]
    kwargs: dict[str, Any]
    if t is PVType.FLOAT64:
        cls, kwargs = DoubleChannel, {"precision": info.precision, **numeric_metadata(info)}
    elif t is PVType.FLOAT64_ARRAY:
        cls, kwargs = (
            ArrayChannel,
            {"max_length": info.max_length, "precision": info.precision, **numeric_metadata(info)},
        )
    elif t is PVType.INT:
        cls, kwargs = LongChannel, numeric_metadata(info, _int32)
    elif t in (PVType.ENUM, PVType.BOOL):
        cls, kwargs = EnumChannel, {"enum_strings": states_of(info)}
    elif t is PVType.STRING:
        cls, kwargs = StringChannel, {"long_string_max_length": long_string_bytes(info)}
    else:  # pragma: no cover - PVType is closed
        raise AssertionError(f"unhandled PV type {t}")
    value, severity, status = cls.served(info, reading)
    channel = cls(
        value=value,
        timestamp=reading.timestamp,
        alarm=ChannelAlarm(status=AlarmStatus(int(status)), severity=AlarmSeverity(int(severity))),
        string_encoding=ENCODING,
        reported_record_type=record_type(info),
        max_subscription_backlog=subscription_backlog(info),
        **kwargs,
    )
    channel._bind(info, binding, pvname)
    channel.apply_now(reading, EventMask(0))
    return channel


#: Updates queued per subscription for a client that reads too slowly; older ones are
#: dropped first (the latest value always gets through). caproto's default is 1 000.
SUBSCRIPTION_BACKLOG = 32
#: ...but a subscription to a large array holds at most about this many bytes.
ARRAY_BACKLOG_BYTES = 4 * 2**20


def subscription_backlog(info: PVInfo) -> int:
    """How many updates one subscription to this PV may have queued."""
    if info.type is PVType.FLOAT64_ARRAY:
        return max(2, min(SUBSCRIPTION_BACKLOG, ARRAY_BACKLOG_BYTES // (8 * max(1, info.max_length))))
    return SUBSCRIPTION_BACKLOG
