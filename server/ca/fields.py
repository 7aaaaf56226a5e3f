"""Record fields: ``PV.DESC``, ``PV.EGU``, ``PV.HIHI``, ``PV.SEVR``... as small read-only channels.

Theory of operation. EPICS tools ask an IOC for record fields by name (``caget
CRYO:MXC:TEMP.EGU``). caproto's server resolves ``NAME.FIELD`` by calling
``get_field(FIELD)`` on the channel of ``NAME`` when no channel has the full name, then
caches the answer; :meth:`labctl.server.ca.channels.ServedChannel.get_field` builds the field's
channel from the table :data:`FIELDS` on that first request. ``.VAL`` is the PV itself.

Which fields a PV has follows the EPICS record it resembles: every PV has ``DESC``,
``NAME``, ``RTYP``, ``SEVR`` and ``STAT``; numeric PVs add units, precision, display,
drive and alarm limits, hysteresis and deadbands; bool PVs ``ZNAM``/``ONAM``; enum PVs
the state strings ``ZRST``...``FFST``; arrays ``NELM``/``NORD``. Asking for a field a PV
lacks finds no channel, as on an IOC. Limits that are not configured read as NaN
(``HIHI`` with no high-high limit), drive limits as 0 (EPICS's "none").

Fields are metadata from the site file and cannot be written over Channel Access (a
put is refused and audited). ``SEVR``, ``STAT`` and ``NORD`` follow the PV's readings and
post monitors when they change (DBE_VALUE|DBE_LOG, plus DBE_ALARM for the alarm fields).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from caproto import AccessRights, ChannelData, ChannelDouble, ChannelInteger, ChannelString, SubscriptionType
from labctl.ioc.errors import NotWritable
from labctl.ioc.pv import PVInfo
from labctl.ioc.types import PVType, Reading, Severity, Status
from labctl.server.ca.access import Client
from labctl.server.ca.channels import MaskedChannel, MenuEnum, TextValues
from labctl.server.ca.metadata import MAX_UNITS_BYTES, record_type, states_of
from labctl.server.ca.wire import ENCODING, clip_utf8

if TYPE_CHECKING:
    from labctl.server.ca.channels import ServedChannel

NUMERIC = (PVType.FLOAT64, PVType.INT, PVType.FLOAT64_ARRAY)
SEVERITY_STATES = tuple(s.name for s in Severity)
STATUS_STATES = tuple(s.name for s in Status)
#: mbbi/mbbo state string fields, state 0 first.
STATE_FIELDS = ("ZRST", "ONST", "TWST", "THST", "FRST", "FVST", "SXST", "SVST",
                "EIST", "NIST", "TEST", "ELST", "TVST", "TTST", "FTST", "FFST")  # fmt: skip


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """How one record field is served."""

    kind: Literal["double", "long", "string", "enum"]
    value: Callable[[ServedChannel, Reading], Any]
    """The field's value, from the PV's channel and its current reading."""
    applies: Callable[[PVInfo], bool]
    """Whether a PV has this field."""
    dynamic: bool = False
    """The value follows the readings (posted when it changes)."""
    states: tuple[str, ...] = ()
    """Enum fields: the state strings."""
    with_units: bool = False
    """Carries the PV's units and precision in DBR_CTRL (limits, deadbands)."""


def _always(info: PVInfo) -> bool:
    return True


def _numeric(info: PVInfo) -> bool:
    return info.type in NUMERIC


def _limit(key: str) -> Callable[[ServedChannel, Reading], float]:
    def get(ch: ServedChannel, r: Reading) -> float:
        alarm = ch.info.alarm
        value = getattr(alarm, key) if alarm is not None else None
        return math.nan if value is None else float(value)

    return get


def _range(attr: str, index: int, default: float) -> Callable[[ServedChannel, Reading], float]:
    def get(ch: ServedChannel, r: Reading) -> float:
        pair = getattr(ch.info, attr)
        return default if pair is None else float(pair[index])

    return get


def _state(index: int) -> FieldSpec:
    return FieldSpec(
        "string",
        lambda ch, r: ch.info.states[index] if index < len(ch.info.states) else "",
        lambda info: info.type is PVType.ENUM,
    )


#: Every record field served, by name.
FIELDS: dict[str, FieldSpec] = {
    "DESC": FieldSpec("string", lambda ch, r: ch.info.description, _always),
    "NAME": FieldSpec("string", lambda ch, r: ch.pvname, _always),
    "RTYP": FieldSpec("string", lambda ch, r: record_type(ch.info), _always),
    "SEVR": FieldSpec("enum", lambda ch, r: int(r.severity), _always, dynamic=True, states=SEVERITY_STATES),
    "STAT": FieldSpec("enum", lambda ch, r: int(r.status), _always, dynamic=True, states=STATUS_STATES),
    "EGU": FieldSpec("string", lambda ch, r: ch.info.unit, _numeric),
    "PREC": FieldSpec(
        "long", lambda ch, r: ch.info.precision, lambda i: i.type in (PVType.FLOAT64, PVType.FLOAT64_ARRAY)
    ),
    "HOPR": FieldSpec("double", _range("display", 1, 0.0), _numeric, with_units=True),
    "LOPR": FieldSpec("double", _range("display", 0, 0.0), _numeric, with_units=True),
    "DRVH": FieldSpec("double", _range("drive", 1, 0.0), _numeric, with_units=True),
    "DRVL": FieldSpec("double", _range("drive", 0, 0.0), _numeric, with_units=True),
    "HIHI": FieldSpec("double", _limit("hihi"), _numeric, with_units=True),
    "HIGH": FieldSpec("double", _limit("high"), _numeric, with_units=True),
    "LOW": FieldSpec("double", _limit("low"), _numeric, with_units=True),
    "LOLO": FieldSpec("double", _limit("lolo"), _numeric, with_units=True),
    "HYST": FieldSpec(
        "double", lambda ch, r: ch.info.alarm.hysteresis if ch.info.alarm else 0.0, _numeric, with_units=True
    ),
    "MDEL": FieldSpec("double", lambda ch, r: ch.info.monitor_deadband, _numeric, with_units=True),
    "ADEL": FieldSpec("double", lambda ch, r: ch.info.archive_deadband, _numeric, with_units=True),
    "NELM": FieldSpec("long", lambda ch, r: ch.info.max_length, lambda i: i.type is PVType.FLOAT64_ARRAY),
    "NORD": FieldSpec("long", lambda ch, r: len(r.value), lambda i: i.type is PVType.FLOAT64_ARRAY, dynamic=True),
    "ZNAM": FieldSpec("string", lambda ch, r: states_of(ch.info)[0], lambda i: i.type is PVType.BOOL),
    "ONAM": FieldSpec("string", lambda ch, r: states_of(ch.info)[1], lambda i: i.type is PVType.BOOL),
    **{name: _state(i) for i, name in enumerate(STATE_FIELDS)},
}

#: Flags a changed dynamic field posts with.
_CHANGED = SubscriptionType.DBE_VALUE | SubscriptionType.DBE_LOG
_ALARM_FIELDS = ("SEVR", "STAT")


class FieldChannel(MaskedChannel):
    """Behaviour of every record-field channel: read-only, follows its PV if dynamic."""

    owner: ServedChannel
    field: str
    spec: FieldSpec

    def _bind(self, owner: ServedChannel, field: str, spec: FieldSpec) -> None:
        self.owner = owner
        self.field = field
        self.spec = spec

    @property
    def target(self) -> str:
        """``PV.FIELD`` as the audit trail names it."""
        return f"{self.owner.info.name}.{self.field}"

    def check_access(self, hostname: str | None, username: str | None) -> AccessRights:
        """Fields are read-only."""
        return AccessRights.READ

    async def auth_read(self, hostname, username, data_type, *, user_address=None):
        """Every client may read every field."""
        return await self.read(data_type)

    async def auth_write(self, hostname, username, data, data_type, metadata, *, flags=0, user_address=None):
        """Refuse (and audit) a put to a field: fields come from the site file."""
        client = Client.of(hostname, username, user_address)
        value = data.tolist() if hasattr(data, "tolist") else data
        self.owner.binding.refuse(self.target, client, value, NotWritable(self.target))

    async def follow(self, reading: Reading) -> None:
        """Post the field's new value if a reading of its PV changed it."""
        if not self.spec.dynamic:
            return
        value = self.spec.value(self.owner, reading)
        if value == self.value:
            return
        flags = _CHANGED | (SubscriptionType.DBE_ALARM if self.field in _ALARM_FIELDS else 0)
        await ChannelData.write(
            self, value, flags=flags, verify_value=False, update_fields=False, timestamp=reading.timestamp
        )


class DoubleField(FieldChannel, ChannelDouble):
    """A DBR_DOUBLE field."""


class LongField(FieldChannel, ChannelInteger):
    """A DBR_LONG field."""


class StringField(FieldChannel, TextValues, ChannelString):
    """A DBR_STRING field (the whole text through ``PV.FIELD$``)."""


class EnumField(FieldChannel, MenuEnum):
    """A DBR_ENUM field (``SEVR``, ``STAT``)."""


def make_field(owner: ServedChannel, field: str) -> ChannelData:
    """The channel of ``owner``'s record field ``field``; KeyError if its PV has no such field."""
    spec = FIELDS.get(field)
    if spec is None or not spec.applies(owner.info):
        raise KeyError(field)
    reading = owner.reading
    value = spec.value(owner, reading)
    common: dict[str, Any] = {
        "timestamp": reading.timestamp,
        "string_encoding": ENCODING,
        "reported_record_type": record_type(owner.info),
    }
    channel: FieldChannel
    if spec.kind == "double":
        units = (
            {"units": clip_utf8(owner.info.unit, MAX_UNITS_BYTES), "precision": owner.info.precision}
            if spec.with_units
            else {}
        )
        channel = DoubleField(value=value, **units, **common)
    elif spec.kind == "long":
        channel = LongField(value=value, **common)
    elif spec.kind == "enum":
        channel = EnumField(value=value, enum_strings=spec.states, **common)
    else:
        channel = StringField(value=value, long_string_max_length=len(value.encode(ENCODING)) + 1, **common)
    channel._bind(owner, field, spec)
    return channel
