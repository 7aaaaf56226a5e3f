"""What the terminal UI shows, decided without a terminal: formats, filters, checks.

Theory of operation. The screens and widgets of :mod:`labctl.clients.tui` only lay out and
colour what this module computes from the session library's value types
(:class:`~labctl.clients.values.Metadata`, :class:`~labctl.ioc.types.Reading`) and from the lock
and alarm PVs every labctl server keeps. Everything here is pure (time is passed in),
so it is tested without an app:

* text for readings, alarm words, times and limits;
* the PV browser's folder tree (from the browse paths the server publishes) and its
  filter;
* a write dialog's checks: the text parsed into the PV's type, enum states, and the
  range the server publishes; and the resource a lock refusal names;
* lock rows from ``ARB:<RES>:*`` PVs and alarm rows from per-PV severities, for servers
  (or session libraries) that do not offer the lock and alarm calls.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import math
import numbers
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from labctl.clients.cli.arguments import UsageError, parse_value
from labctl.clients.errors import Refused
from labctl.clients.values import Metadata, format_value
from labctl.ioc.types import PVType, Reading, Severity, Status

#: Alarm summary PVs every labctl server keeps (the status line shows them).
ALARM_SUMMARY = (
    "ALARM:HIGHEST",
    "ALARM:ACTIVE:MINOR",
    "ALARM:ACTIVE:MAJOR",
    "ALARM:ACTIVE:INVALID",
    "ALARM:UNACKED:MINOR",
    "ALARM:UNACKED:MAJOR",
    "ALARM:UNACKED:INVALID",
)
#: Suffixes of a lockable resource's lock PVs ``ARB:<RES>:<suffix>``.
LOCK_FIELDS = ("OWNER", "EXPIRES", "QUEUE")
_LOCK_PV = re.compile(r"^ARB:(?P<res>.+):(?P<field>OWNER|EXPIRES|QUEUE)$")
_MISSING = "…"


# ---- readings --------------------------------------------------------------------------


def value_text(meta: Metadata | None, reading: Reading | None) -> str:
    """A reading's value as people read it ("…" before the first one arrives)."""
    if reading is None:
        return _MISSING
    if meta is None:
        return str(reading.value)
    return format_value(meta, reading.value)


def alarm_text(reading: Reading | None) -> str:
    """``MAJOR HIHI``, ``INVALID COMM``; empty when there is no alarm."""
    if reading is None or reading.severity is Severity.NO_ALARM:
        return ""
    if reading.status is Status.NO_ALARM:
        return reading.severity.name
    return f"{reading.severity.name} {reading.status.name}"


def time_text(ts: float | None, *, date: bool = False) -> str:
    """Local time of a UNIX timestamp: ``14:05:03.125`` (with the date when asked)."""
    if ts is None or ts <= 0 or not math.isfinite(ts):
        return ""
    t = _dt.datetime.fromtimestamp(ts)
    if date:
        return t.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return t.strftime("%H:%M:%S.%f")[:-3]


def range_text(rng: tuple[float, float] | None, unit: str = "") -> str:
    """``[0, 300] K``; empty without a range."""
    if rng is None:
        return ""
    lo, hi = rng
    return f"[{lo:g}, {hi:g}]{' ' + unit if unit else ''}"


def numeric(meta: Metadata | None) -> bool:
    """True for PVs whose history draws as a line (numbers and booleans)."""
    return meta is not None and meta.type in (PVType.FLOAT64, PVType.INT, PVType.BOOL, PVType.ENUM)


def as_float(value: Any) -> float | None:
    """A scalar value as a float for a sparkline (None for anything else)."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, numbers.Real) and math.isfinite(value):  # numpy numbers from history too
        return float(value)
    return None


def carried_forward(values: Iterable[Any]) -> list[float]:
    """History buckets as a line: an empty bucket (NaN) keeps the value before it.

    The historian stores changes, so a PV that did not change in a bucket still had its
    previous value; leading empty buckets are dropped.
    """
    out: list[float] = []
    for v in values:
        x = as_float(v)
        if x is not None:
            out.append(x)
        elif out:
            out.append(out[-1])
    return out


# ---- the browser's tree and filter ------------------------------------------------------


def folder_of(meta: Metadata) -> str:
    """The folder a PV is browsed under: its browse path without the last part."""
    path = meta.path or meta.name
    return path.rpartition("/")[0]


def folders(metas: Iterable[Metadata]) -> list[str]:
    """Every folder path (and each of its parents) in the order the server lists them, parents first."""
    seen: dict[str, None] = {}
    for meta in metas:
        chain = []
        folder = folder_of(meta)
        while folder and folder not in seen:
            chain.append(folder)
            folder = folder.rpartition("/")[0]
        for f in reversed(chain):
            seen[f] = None
    return list(seen)


def matches(meta: Metadata, query: str) -> bool:
    """Does a PV match the filter text?

    Words must all occur (case-insensitively) in the name, description or unit; a word
    with ``*`` or ``?`` is a glob on the name.
    """
    hay = f"{meta.name} {meta.description} {meta.unit}".lower()
    for word in query.lower().split():
        if any(c in word for c in "*?["):
            if not fnmatch.fnmatchcase(meta.name.lower(), word):
                return False
        elif word not in hay:
            return False
    return True


def select(metas: Iterable[Metadata], folder: str = "", query: str = "") -> list[str]:
    """Names of the PVs under ``folder`` (all when empty) that match ``query``, in browse order."""
    prefix = folder + "/" if folder else ""
    return [
        m.name
        for m in metas
        if (not prefix or (m.path or m.name).startswith(prefix)) and (not query.strip() or matches(m, query))
    ]


# ---- writing ---------------------------------------------------------------------------


class InputError(ValueError):
    """The text typed into a write dialog is not a value the PV takes; ``str()`` says why."""


def parse_input(meta: Metadata, text: str) -> Any:
    """The typed text as a value of the PV's type, or InputError naming what was expected."""
    if meta.type is None:
        raise InputError(f"{meta.name} has a type this client does not write")
    if meta.type is not PVType.STRING and not text.strip():
        raise InputError("type a value")
    try:
        value = parse_value(meta, text.strip() if meta.type is not PVType.STRING else text)
    except UsageError as e:
        raise InputError(str(e)) from None
    if meta.type is PVType.ENUM:
        if isinstance(value, int) and not 0 <= value < len(meta.states):
            raise InputError(f"{meta.name} has states 0..{len(meta.states) - 1}: {', '.join(meta.states)}")
        if isinstance(value, str):
            value = meta.states.index(value)
    if meta.type is PVType.FLOAT64_ARRAY and meta.length is not None and len(value) > meta.length:
        raise InputError(f"{meta.name} takes at most {meta.length} numbers, got {len(value)}")
    return value


def limits(meta: Metadata) -> tuple[float, float] | None:
    """The drive limits a write is checked against before sending.

    A session that reports drive limits (``Metadata.drive``) is used as is; otherwise
    the range the server publishes (OPC UA EURange: the display range, or the drive
    limits when there is none) is only advisory, see :func:`range_warning`.
    """
    drive = getattr(meta, "drive", None)
    return tuple(drive) if drive else None  # type: ignore[return-value]


def check_limits(meta: Metadata, value: Any) -> None:
    """Raise InputError when a number is outside the PV's drive limits (if known)."""
    rng = limits(meta)
    if rng is None or meta.type not in (PVType.FLOAT64, PVType.INT):
        return
    lo, hi = rng
    if not lo <= value <= hi:
        raise InputError(f"{value:g} is outside the drive limits {range_text(rng, meta.unit)}")


def range_warning(meta: Metadata, value: Any) -> str:
    """A warning when a number lies outside the range the server publishes; empty otherwise."""
    if limits(meta) is not None or meta.display is None or meta.type not in (PVType.FLOAT64, PVType.INT):
        return ""
    lo, hi = meta.display
    if lo <= value <= hi:
        return ""
    return f"{value:g} is outside the published range {range_text(meta.display, meta.unit)}"


def refused_resource(refusal: Refused) -> str | None:
    """The lockable resource a write was refused for (its lock held by someone else, or not taken): from its fields."""
    if refusal.error == "LockedBy" or refusal.status == "BadLocked":
        resource = refusal.fields.get("resource")
        return str(resource) if resource else None
    return None


# ---- locks and alarms from plain PVs ----------------------------------------------------


@dataclass(frozen=True)
class LockRow:
    """One lockable resource as the locks panel shows it."""

    resource: str
    owner: str = ""
    expires_at: float | None = None
    queue: tuple[tuple[str, int], ...] = ()
    queue_length: int = 0
    client: str = ""


def lock_pvs(names: Iterable[str]) -> list[str]:
    """The lock PVs (``ARB:<RES>:OWNER|EXPIRES|QUEUE``) among ``names``."""
    return [n for n in names if _LOCK_PV.match(n)]


def lock_rows(metas: Mapping[str, Metadata], readings: Mapping[str, Reading]) -> list[LockRow]:
    """Lock rows from the lock PVs: the resource name comes from the OWNER PV's description."""
    found: dict[str, dict[str, Any]] = {}
    for name in metas:
        m = _LOCK_PV.match(name)
        if m:
            found.setdefault(m.group("res"), {})[m.group("field")] = name
    rows = []
    for res, fields in found.items():
        owner_meta = metas.get(fields.get("OWNER", ""))
        resource = res.lower()
        if owner_meta is not None and owner_meta.description.endswith(" lock holder"):
            resource = owner_meta.description.removesuffix(" lock holder")

        def value(field: str, fields: dict[str, Any] = fields) -> Any:
            r = readings.get(fields.get(field, ""))
            return r.value if r is not None and r.valid else None

        expires = value("EXPIRES")
        rows.append(
            LockRow(
                resource=resource,
                owner=value("OWNER") or "",
                expires_at=expires if expires else None,
                queue_length=value("QUEUE") or 0,
            )
        )
    return sorted(rows, key=lambda r: r.resource)


def lock_row_of(info: Any) -> LockRow:
    """A lock row from a session's ``LockInfo``."""
    return LockRow(
        resource=info.resource,
        owner=info.owner,
        expires_at=info.expires_at,
        queue=tuple(tuple(q) for q in info.queue),  # type: ignore[misc]
        queue_length=len(info.queue),
        client=getattr(info, "client", ""),
    )


@dataclass(frozen=True)
class AlarmRow:
    """One alarm as the alarms panel shows it."""

    source: str
    severity: str
    current: str
    status: str
    acked: bool | None
    """None when the server's acknowledge state is unknown (from PV severities alone)."""
    active: bool = True
    since: float | None = None
    message: str = ""
    guidance: str = ""
    shelved_until: float | None = None


def alarm_row_of(info: Any) -> AlarmRow:
    """An alarm row from a session's ``AlarmInfo``."""
    return AlarmRow(
        source=info.source,
        severity=info.severity,
        current=info.current,
        status=info.status,
        acked=info.acked,
        active=info.active,
        since=info.since,
        message=info.message,
        guidance=info.guidance,
        shelved_until=info.shelved_until,
    )


def alarm_rows(readings: Mapping[str, Reading], *, skip: Iterable[str] = ALARM_SUMMARY) -> list[AlarmRow]:
    """Alarm rows from per-PV severities (worst first), for sessions without the alarm calls."""
    skipped = set(skip)
    rows = [
        AlarmRow(name, r.severity.name, r.severity.name, r.status.name, None, True, r.timestamp)
        for name, r in readings.items()
        if r.severity is not Severity.NO_ALARM and name not in skipped
    ]
    rank = {s.name: int(s) for s in Severity}
    return sorted(rows, key=lambda a: (-rank.get(a.severity, 0), a.source))


@dataclass(frozen=True)
class AlarmSummary:
    """The alarm summary PVs, as the status line shows them."""

    highest: Severity = Severity.NO_ALARM
    active: tuple[int, int, int] = (0, 0, 0)
    """MINOR, MAJOR, INVALID."""
    unacked: tuple[int, int, int] = (0, 0, 0)

    @classmethod
    def of(cls, readings: Mapping[str, Reading]) -> AlarmSummary:
        """The summary from whatever summary PVs have arrived."""

        def count(name: str) -> int:
            r = readings.get(name)
            return int(r.value) if r is not None and r.valid and isinstance(r.value, int) else 0

        r = readings.get("ALARM:HIGHEST")
        highest = Severity(r.value) if r is not None and r.valid and r.value in Severity._value2member_map_ else Severity.NO_ALARM
        sev = ("MINOR", "MAJOR", "INVALID")
        return cls(
            highest,
            tuple(count(f"ALARM:ACTIVE:{s}") for s in sev),  # type: ignore[arg-type]
            tuple(count(f"ALARM:UNACKED:{s}") for s in sev),  # type: ignore[arg-type]
        )

    @property
    def total_active(self) -> int:
        """Active alarms of any severity."""
        return sum(self.active)

    @property
    def total_unacked(self) -> int:
        """Unacknowledged alarms of any severity."""
        return sum(self.unacked)
