"""The runtime PV: metadata, value checking, alarm evaluation and deadbands.

Everything here is pure: no clock, no I/O. Time comes in as arguments.

* :class:`PVInfo` is the immutable description of a PV that every layer reads (adapters
  map it to DBR_CTRL fields or OPC UA attributes).
* :func:`coerce` turns a value written by a client into the PV's canonical Python type
  or raises :class:`~labctl.ioc.errors.WrongType` / :class:`~labctl.ioc.errors.OutOfRange`. Canonical
  types: float64 -> ``float``, int -> ``int``, bool -> ``bool``, enum -> ``int`` (state
  index), string -> ``str``, float64[] -> ``tuple[float, ...]``.
* :class:`AlarmEvaluator` follows the EPICS ai record: HIHI, LOLO, HIGH, LOW are checked
  in that order; an alarm at a level stays until the value is back inside that limit by
  the hysteresis; a new alarm may be required to persist for ``delay_s`` first.
* :class:`Deadbands` decides which :class:`~labctl.ioc.types.EventMask` bits an update carries,
  as EPICS ``monitor()`` does with MDEL/ADEL.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from labctl.ioc.config.instruments import InstrumentConfig
from labctl.ioc.config.pvs import AlarmConfig, PVConfig
from labctl.ioc.errors import OutOfRange, WrongType
from labctl.ioc.types import EventMask, PVType, Reading, Severity, Status, values_equal

#: Longest string a string PV takes when its site file sets no ``length``: what EPICS's
#: DBR_STRING holds (MAX_STRING_SIZE, 40 bytes, less the terminating NUL).
DEFAULT_STRING_LENGTH = 39
#: Longest float64[] a PV takes when its site file sets no ``length``.
MAX_ARRAY_LENGTH = 1_000_000


@dataclass(frozen=True, slots=True)
class PVInfo:
    """Immutable description of one PV, as every layer sees it."""

    name: str
    type: PVType
    resource: str
    description: str = ""
    unit: str = ""
    precision: int = 3
    display: tuple[float, float] | None = None
    drive: tuple[float, float] | None = None
    alarm: AlarmConfig | None = None
    monitor_deadband: float = 0.0
    archive_deadband: float = 0.0
    writable: bool = False
    states: tuple[str, ...] = ()
    length: int | None = None
    allow_nan: bool = False
    instrument: str | None = None
    channel: str | None = None
    scan_s: float | None = None
    expr: str | None = None
    inputs: tuple[tuple[str, str], ...] = field(default=())
    initial: Any = None

    @classmethod
    def from_config(
        cls, pv: PVConfig, inst: InstrumentConfig | None, resource: str, fields: Mapping[str, Any] | None = None
    ) -> PVInfo:
        """Build from the site file's PV entry.

        ``fields`` replaces the entry's ``name``, ``description`` and ``inputs`` for one PV
        of a numbered entry (:meth:`labctl.ioc.config.pvs.PVConfig.instances`).
        """
        if fields:
            name = fields["name"]
            description = fields.get("description", pv.description)
            inputs = fields.get("inputs", pv.inputs)
        else:
            name, description, inputs = pv.name, pv.description, pv.inputs
        return cls(
            name=name,
            type=pv.type,
            resource=resource,
            description=description,
            unit=pv.unit,
            precision=pv.precision,
            display=pv.display,
            drive=pv.drive,
            alarm=pv.alarm,
            monitor_deadband=pv.deadband.monitor,
            archive_deadband=pv.deadband.archive,
            writable=pv.writable,
            states=pv.states,
            length=pv.length,
            allow_nan=pv.allow_nan,
            instrument=inst.name if inst else None,
            channel=(pv.channel or pv.name) if inst else None,
            scan_s=(pv.scan_s or inst.scan_s) if inst else None,
            expr=pv.expr,
            inputs=tuple(inputs.items()),
            initial=pv.initial,
        )

    @property
    def numeric(self) -> bool:
        """float64, int or float64[]."""
        return self.type in (PVType.FLOAT64, PVType.INT, PVType.FLOAT64_ARRAY)

    @property
    def max_length(self) -> int:
        """Longest string / array accepted."""
        if self.length is not None:
            return self.length
        return DEFAULT_STRING_LENGTH if self.type is PVType.STRING else MAX_ARRAY_LENGTH

    @property
    def control_limits(self) -> tuple[float, float] | None:
        """Drive limits, else display range (what a client may offer as the write range)."""
        return self.drive or self.display

    def undefined(self, now: float) -> Reading:
        """The reading of a PV that never had a value: INVALID/UDF."""
        return Reading(default_value(self), now, Severity.INVALID, Status.UDF)


_DEFAULT_VALUES: dict[PVType, Any] = {
    PVType.FLOAT64: math.nan,
    PVType.INT: 0,
    PVType.BOOL: False,
    PVType.ENUM: 0,
    PVType.STRING: "",
    PVType.FLOAT64_ARRAY: (),
}


def default_value(info: PVInfo) -> Any:
    """A type-correct placeholder value (0, '', empty array)."""
    return _DEFAULT_VALUES[info.type]


def held_value(info: PVInfo, last: Any) -> Any:
    """The value a PV shows while its source has no reading (a channel switched off).

    Its last value, as a disabled EPICS record keeps VAL; a float64 PV that never had one
    (its placeholder NaN, where NaN is no value it takes) shows 0.0, as a record that
    never processed does.
    """
    if info.type is PVType.FLOAT64 and isinstance(last, float) and math.isnan(last) and not info.allow_nan:
        return 0.0
    return last


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(v: Any) -> bool:
    t = type(v)
    if t is float or t is int:  # the common case, without the abstract-class check
        return True
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _finite_float(info: PVInfo, v: Any, what: str = "value") -> float:
    if not _is_number(v):
        raise WrongType(info.name, f"expected a number for {info.type.value}, got {_describe(v)} ({type(v).__name__})", v)
    f = float(v)
    if not math.isfinite(f) and not (info.allow_nan and math.isnan(f)):
        raise WrongType(info.name, f"{what} {f!r} is not allowed (the PV takes finite numbers only)", v)
    return f


def _check_drive(info: PVInfo, f: float, original: Any) -> None:
    if info.drive is not None and not math.isnan(f):
        lo, hi = info.drive
        if f < lo or f > hi:
            raise OutOfRange(info.name, original, lo, hi)


def coerce(info: PVInfo, value: Any) -> Any:
    """Check a value written to ``info`` and return it in the PV's canonical type.

    Raises:
        WrongType: wrong type, NaN where not allowed, bad enum state, too long.
        OutOfRange: outside the drive limits.
    """
    t = info.type
    if t is PVType.FLOAT64:
        f = _finite_float(info, _scalar(info, value))
        _check_drive(info, f, value)
        return f
    if t is PVType.INT:
        v = _scalar(info, value)
        if not _is_number(v):
            raise WrongType(info.name, f"expected an integer, got {_describe(v)} ({type(v).__name__})", value)
        if isinstance(v, numbers.Integral):
            i = int(v)
        else:
            f = float(v)
            if not math.isfinite(f) or f != int(f):
                raise WrongType(info.name, f"expected an integer, got {_describe(v)}", value)
            i = int(f)
        if not -(2**63) <= i < 2**63:
            raise WrongType(info.name, f"{i} does not fit a 64-bit integer", value)
        _check_drive(info, float(i), value)
        return i
    if t is PVType.BOOL:
        v = _scalar(info, value)
        if isinstance(v, bool):
            return v
        if isinstance(v, numbers.Integral) and int(v) in (0, 1):
            return bool(int(v))
        raise WrongType(info.name, f"expected a boolean (true/false or 0/1), got {_describe(v)}", value)
    if t is PVType.ENUM:
        v = _scalar(info, value)
        if isinstance(v, str):
            if v in info.states:
                return info.states.index(v)
            raise WrongType(info.name, f"{v!r} is not one of the states {list(info.states)}", value)
        if isinstance(v, numbers.Integral) and not isinstance(v, bool):
            i = int(v)
            if 0 <= i < len(info.states):
                return i
            raise WrongType(info.name, f"state index {i} is outside 0..{len(info.states) - 1} {list(info.states)}", value)
        raise WrongType(info.name, f"expected a state name or index, got {_describe(v)}", value)
    if t is PVType.STRING:
        v = _scalar(info, value)
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError:
                raise WrongType(info.name, "the bytes are not UTF-8 text", value) from None
        if not isinstance(v, str):
            raise WrongType(info.name, f"expected a string, got {_describe(v)} ({type(v).__name__})", value)
        if len(v) > info.max_length:
            raise WrongType(info.name, f"the string is {len(v)} characters long; at most {info.max_length} allowed", value)
        return v
    if t is PVType.FLOAT64_ARRAY:
        if isinstance(value, (str, bytes)) or not _is_sequence(value):
            raise WrongType(info.name, f"expected an array of numbers, got {_describe(value)} ({type(value).__name__})", value)
        items = list(value)  # fewer than ``length``: the PV holds that many (as a waveform record's NORD)
        if len(items) > info.max_length:
            raise WrongType(info.name, f"the array has {len(items)} elements; at most {info.max_length} allowed", value)
        out = []
        for k, x in enumerate(items):
            f = _finite_float(info, x, f"element [{k}]")
            _check_drive(info, f, x)
            out.append(f)
        return tuple(out)
    raise AssertionError(f"unhandled PV type {t}")  # pragma: no cover


def _is_sequence(v: Any) -> bool:
    return isinstance(v, Sequence) or hasattr(v, "__array__") or hasattr(v, "tolist")


def _scalar(info: PVInfo, value: Any) -> Any:
    """Unwrap one-element sequences and numpy scalars (protocols send those)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise WrongType(info.name, f"expected one {info.type.value} value, got {len(value)} values", value)
        value = value[0]
    return value


def canonical(info: PVInfo, value: Any) -> Any:
    """Convert a value read from an instrument to the PV's canonical type, without limit checks.

    Instruments may report values outside drive limits (those limit writes, not readings)
    and NaN (an unreadable sensor); only the type is enforced here.
    """
    t = info.type
    if t is PVType.FLOAT64:
        v = _scalar(info, value)
        if not _is_number(v):
            raise WrongType(info.name, f"instrument returned {_describe(v)} for a float64 PV", value)
        return float(v)
    if t is PVType.FLOAT64_ARRAY:
        if not _is_sequence(value) or isinstance(value, (str, bytes)):
            raise WrongType(info.name, f"instrument returned {_describe(value)} for a float64[] PV", value)
        return tuple(float(x) for x in value)
    if t is PVType.STRING:
        return str(_scalar(info, value))
    relaxed = PVInfo(info.name, t, info.resource, states=info.states)
    return coerce(relaxed, value)


# ---- alarms ---------------------------------------------------------------------------

_LEVELS = (
    ("hihi", Severity.MAJOR, Status.HIHI, +1),
    ("lolo", Severity.MAJOR, Status.LOLO, -1),
    ("high", Severity.MINOR, Status.HIGH, +1),
    ("low", Severity.MINOR, Status.LOW, -1),
)


def limit_alarm(value: float, cfg: AlarmConfig, previous: Status) -> tuple[Severity, Status]:
    """The limit alarm of a value, given the status it had (for hysteresis)."""
    if math.isnan(value):
        return Severity.INVALID, Status.CALC
    hyst = cfg.hysteresis
    for key, sev, status, sign in _LEVELS:
        limit = getattr(cfg, key)
        if limit is None:
            continue
        # Past the limit, or still within the hysteresis band of an alarm we were already in.
        margin = hyst if previous is status else 0.0
        if (sign > 0 and value >= limit - margin) or (sign < 0 and value <= limit + margin):
            return sev, status
    return Severity.NO_ALARM, Status.NO_ALARM


@dataclass(slots=True)
class AlarmEvaluator:
    """Limit alarms of one PV over time: hysteresis and an optional raise delay.

    Without limits (``cfg`` None) it keeps no state, so PVs without limits may share one.
    """

    cfg: AlarmConfig | None
    _status: Status = Status.NO_ALARM
    _pending: tuple[Severity, Status] | None = None
    _pending_since: float = 0.0

    def evaluate(self, value: Any, now: float) -> tuple[Severity, Status]:
        """Severity and status for a new value of the PV at time ``now``."""
        cfg = self.cfg
        if cfg is None or not _is_number(value):
            return Severity.NO_ALARM, Status.NO_ALARM
        current = (_severity_of(self._status), self._status)
        sev, status = limit_alarm(float(value), cfg, self._status)
        if cfg.delay_s > 0 and sev > current[0] and status is not Status.CALC:
            # A raised (worse) alarm must persist for delay_s before it takes effect.
            if self._pending != (sev, status):
                self._pending, self._pending_since = (sev, status), now
            if now - self._pending_since < cfg.delay_s:
                return current
        self._pending = None
        self._status = status
        return sev, status


def _severity_of(status: Status) -> Severity:
    for _, sev, st, _ in _LEVELS:
        if st is status:
            return sev
    return Severity.NO_ALARM


# ---- deadbands --------------------------------------------------------------------------


_VALUE, _LOG, _ALARM = int(EventMask.VALUE), int(EventMask.LOG), int(EventMask.ALARM)


@dataclass(slots=True)
class Deadbands:
    """Which event bits a new reading carries, from the last posted monitor/archive values."""

    monitor: float
    archive: float
    _last_monitor: Any = None
    _last_archive: Any = None
    _last_alarm: tuple[Severity, Status] | None = None

    def mask(self, reading: Reading) -> EventMask:
        """Event bits for ``reading``; remembers what it reports as posted."""
        # Plain ints while deciding: IntFlag operators cost more than the decision itself.
        mask = 0
        alarm = (reading.severity, reading.status)
        if alarm != self._last_alarm:
            # A change of alarm state is always worth showing and archiving (EPICS posts
            # DBE_VALUE with a status change; an archiver must record the INVALID).
            self._last_alarm = alarm
            self._last_monitor = self._last_archive = reading.value
            return _ALL_CHANGED
        if _passes(reading.value, self._last_monitor, self.monitor):
            mask = _VALUE
            self._last_monitor = reading.value
        if _passes(reading.value, self._last_archive, self.archive):
            mask |= _LOG
            self._last_archive = reading.value
        return _MASKS[mask]


_ALL_CHANGED = EventMask.ALARM | EventMask.VALUE | EventMask.LOG
_MASKS = {m: EventMask(m) for m in (0, _VALUE, _LOG, _VALUE | _LOG)}


def _passes(value: Any, last: Any, deadband: float) -> bool:
    if last is None:
        return True
    if _is_number(value) and _is_number(last):
        a, b = float(value), float(last)
        if math.isnan(a) or math.isnan(b):
            return not (math.isnan(a) and math.isnan(b))
        delta = abs(a - b)
        return delta > deadband if deadband > 0 else delta != 0
    if isinstance(value, tuple) and isinstance(last, tuple) and deadband > 0 and len(value) == len(last):
        return any(_passes(a, b, deadband) for a, b in zip(value, last, strict=False))
    return not values_equal(value, last)
