"""Alarms: what is wrong now, what people have seen, and what they silenced. Pure rules.

Each PV with alarm limits (or any PV that can go INVALID) has an :class:`Alarm`. The
database already stamps every reading with a severity (limits with hysteresis and
delay, INVALID for a lost instrument); this module turns the stream of severities into
alarm *state* as an alarm handler does (Phoebus alarm server, EPICS ALH):

* ``current``: the PV's severity now.
* ``latched``: the highest severity since the last acknowledge. For a latching alarm it
  stays after the value recovers, until someone acknowledges; for a non-latching alarm it
  follows ``current`` down.
* ``acked``: whether someone acknowledged the latched severity. A worse severity makes the
  alarm unacknowledged again.
* ``shelved_until``: while shelved the alarm counts for nothing (summary, notifications)
  but its state is still tracked; shelving ends by itself.

An alarm is *active* while its latched severity is above NO_ALARM. Every change is an
:class:`AlarmEvent` that the shell archives, publishes (OPC UA events, summary PVs) and
notifies (through a :class:`RateLimiter`, so a flapping PV cannot flood anyone).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from labctl.ioc.errors import Conflict, InvalidArgument, NotFound, Refused
from labctl.ioc.pv import PVInfo
from labctl.ioc.types import PVType, Reading, Severity, Status

EventKind = Literal["raised", "changed", "cleared", "acknowledged", "shelved", "unshelved", "returned"]


class AlarmRefused(Refused):
    """An alarm operation was refused. Subclasses say why."""

    FIELDS: tuple[str, ...] = ("source",)

    def __init__(self, reason: str, *, source: str, action: str) -> None:
        self.source = source
        super().__init__(reason, action=action, target=source)


class NoSuchAlarm(AlarmRefused, NotFound):
    """No alarm has that source."""


class AlarmStateConflict(AlarmRefused, Conflict):
    """The alarm's state does not allow it (not in alarm, already acknowledged, not shelved)."""


class BadShelving(AlarmRefused, InvalidArgument):
    """A shelving's duration or reason is not acceptable."""


@dataclass(frozen=True, slots=True)
class Alarm:
    """The alarm state of one PV."""

    source: str
    current: Severity = Severity.NO_ALARM
    status: Status = Status.NO_ALARM
    latched: Severity = Severity.NO_ALARM
    acked: bool = True
    latch: bool = False
    value: object = None
    since: float = 0.0
    """When the current severity began."""
    message: str = ""
    guidance: str = ""
    shelved_until: float | None = None
    shelved_by: str = ""
    shelve_reason: str = ""

    @property
    def active(self) -> bool:
        """In alarm now, or latched and not yet acknowledged."""
        return self.latched > Severity.NO_ALARM

    def shelved(self, now: float) -> bool:
        """Whether the alarm is shelved at ``now``."""
        return self.shelved_until is not None and now < self.shelved_until

    @property
    def unacknowledged(self) -> bool:
        """Active and nobody acknowledged it."""
        return self.active and not self.acked


@dataclass(frozen=True, slots=True)
class AlarmEvent:
    """A change of an alarm's state."""

    kind: EventKind
    alarm: Alarm
    time: float
    user: str = ""
    reason: str = ""


def describe(source: str, reading: Reading, unit: str = "", states: Sequence[str] = ()) -> str:
    """A message a person reads: ``CRYO:MXC:TEMP HIHI (MAJOR): 0.12 K``; an enum's value by its state name."""
    if reading.severity is Severity.NO_ALARM:
        return f"{source} back to normal"
    value = reading.value
    if states and isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(states):
        shown = states[value]
    else:
        shown = f"{value:.4g}" if isinstance(value, float) else repr(value)
    tail = f": {shown}{' ' + unit if unit else ''}" if reading.status not in (Status.COMM, Status.UDF, Status.TIMEOUT) else ""
    return f"{source} {reading.status.name} ({reading.severity.name}){tail}"


class AlarmTable:
    """Alarm states of every alarmed PV, driven by readings, acknowledges and shelving."""

    def __init__(self, sources: Mapping[str, tuple[bool, str, str]], states: Mapping[str, Sequence[str]] | None = None) -> None:
        """``sources``: PV name -> (latch, guidance, unit); ``states``: an enum PV's state names, for messages."""
        self._alarms = {name: Alarm(name, latch=latch, guidance=guidance) for name, (latch, guidance, _) in sources.items()}
        self._units = {name: unit for name, (_, _, unit) in sources.items()}
        self._states = dict(states or {})

    def __contains__(self, source: object) -> bool:
        return source in self._alarms

    def get(self, source: str, action: str = "alarm.list") -> Alarm:
        """One alarm's state (raise NoSuchAlarm)."""
        try:
            return self._alarms[source]
        except KeyError:
            raise NoSuchAlarm(f"no alarm for {source!r}", source=source, action=action) from None

    def all(self) -> list[Alarm]:
        """Every alarm's state."""
        return list(self._alarms.values())

    def active(self, now: float, *, include_shelved: bool = False) -> list[Alarm]:
        """Active alarms, worst first, then oldest."""
        out = [a for a in self._alarms.values() if a.active and (include_shelved or not a.shelved(now))]
        return sorted(out, key=lambda a: (-a.latched, a.since))

    def restore(self, alarms: Iterable[Alarm]) -> None:
        """Take saved states (after a restart) for known sources."""
        for a in alarms:
            if a.source in self._alarms:
                old = self._alarms[a.source]
                self._alarms[a.source] = replace(a, latch=old.latch, guidance=old.guidance)

    # ---- transitions -------------------------------------------------------------------------

    def update(self, source: str, reading: Reading) -> list[AlarmEvent]:
        """A new reading of ``source``: recompute its alarm."""
        old = self._alarms.get(source)
        if old is None:
            return []
        if reading.status in (Status.UDF, Status.DISABLE):
            # Never defined yet (start-up), or switched off on purpose (a source-meter's output
            # off): not an alarm, as an EPICS alarm handler ignores a disabled record. The PV
            # itself still reads INVALID/DISABLE. A lost instrument reads COMM instead.
            reading = Reading(reading.value, reading.timestamp)
        sev, now = reading.severity, reading.timestamp
        if sev == old.current and reading.status == old.status:
            if old.value != reading.value:
                self._alarms[source] = replace(old, value=reading.value)
            return []
        msg = describe(source, reading, self._units.get(source, ""), self._states.get(source, ()))
        if sev > old.latched or (sev > Severity.NO_ALARM and old.latched == Severity.NO_ALARM):
            latched, acked = sev, False  # worse than anything seen: needs a new acknowledge
        elif old.latch and not old.acked:
            latched, acked = old.latched, False  # latched: stays until acknowledged
        else:
            latched, acked = sev, old.acked if sev > Severity.NO_ALARM else True
        new = replace(old, current=sev, status=reading.status, latched=latched, acked=acked, value=reading.value, since=now, message=msg)
        self._alarms[source] = new
        if not old.active and new.active:
            kind: EventKind = "raised"
        elif old.active and not new.active:
            kind = "cleared"
        elif new.current == Severity.NO_ALARM and old.current > Severity.NO_ALARM:
            kind = "returned"  # value recovered, alarm still latched
        else:
            kind = "changed"
        return [AlarmEvent(kind, new, now)]

    def acknowledge(self, source: str, user: str, now: float, comment: str = "") -> list[AlarmEvent]:
        """Acknowledge an active alarm; a latched one whose value recovered then clears."""
        old = self.get(source, "alarm.ack")
        if not old.active:
            raise AlarmStateConflict("not in alarm; nothing to acknowledge", source=source, action="alarm.ack")
        if old.acked:
            raise AlarmStateConflict("already acknowledged", source=source, action="alarm.ack")
        latched = old.current  # the latch lets go of what has recovered
        new = replace(old, acked=True, latched=latched)
        self._alarms[source] = new
        events = [AlarmEvent("acknowledged", new, now, user, comment)]
        if not new.active:
            events.append(AlarmEvent("cleared", new, now, user))
        return events

    def shelve(self, source: str, user: str, now: float, duration_s: float, reason: str) -> list[AlarmEvent]:
        """Silence an alarm for ``duration_s`` (a reason is required)."""
        old = self.get(source, "alarm.shelve")
        if not (duration_s > 0 and math.isfinite(duration_s)):
            raise BadShelving(f"shelving: the duration must be a positive number of seconds, got {duration_s}", source=source, action="alarm.shelve")
        if not reason.strip():
            raise BadShelving("shelving: give a reason", source=source, action="alarm.shelve")
        new = replace(old, shelved_until=now + duration_s, shelved_by=user, shelve_reason=reason)
        self._alarms[source] = new
        return [AlarmEvent("shelved", new, now, user, reason)]

    def unshelve(self, source: str, user: str, now: float) -> list[AlarmEvent]:
        """End shelving early."""
        old = self.get(source, "alarm.unshelve")
        if old.shelved_until is None:
            raise AlarmStateConflict("not shelved", source=source, action="alarm.unshelve")
        new = replace(old, shelved_until=None, shelved_by="", shelve_reason="")
        self._alarms[source] = new
        return [AlarmEvent("unshelved", new, now, user)]

    def expire_shelving(self, now: float) -> list[AlarmEvent]:
        """End every shelving whose time is up."""
        events = []
        for a in list(self._alarms.values()):
            if a.shelved_until is not None and now >= a.shelved_until:
                new = replace(a, shelved_until=None, shelved_by="", shelve_reason="")
                self._alarms[a.source] = new
                events.append(AlarmEvent("unshelved", new, now, "", "shelving expired"))
        return events

    # ---- summary -------------------------------------------------------------------------------

    def summary(self, now: float) -> dict[str, int]:
        """Counts of active and unacknowledged alarms per severity, and the highest severity (unshelved only)."""
        out = {f"{k}_{s.name}": 0 for k in ("active", "unacked") for s in (Severity.MINOR, Severity.MAJOR, Severity.INVALID)}
        highest = Severity.NO_ALARM
        for a in self.active(now):
            out[f"active_{a.latched.name}"] += 1
            if not a.acked:
                out[f"unacked_{a.latched.name}"] += 1
            highest = max(highest, a.latched)
        out["highest"] = int(highest)
        return out


class RateLimiter:
    """At most ``burst`` notifications per source within ``window_s``, and ``global_burst`` overall.

    What it holds back is counted, so the next notification that goes out can say how many
    were suppressed: nothing is lost silently.
    """

    def __init__(self, burst: int = 5, window_s: float = 60.0, global_burst: int = 50) -> None:
        self.burst, self.window_s, self.global_burst = burst, window_s, global_burst
        self._sent: dict[str, deque[float]] = {}
        self._all: deque[float] = deque()
        self.suppressed: dict[str, int] = {}

    def allow(self, source: str, now: float) -> tuple[bool, int]:
        """Whether to send one for ``source`` now, and how many were suppressed since the last one sent."""
        q = self._sent.setdefault(source, deque())
        for d in (q, self._all):
            while d and d[0] <= now - self.window_s:
                d.popleft()
        if len(q) >= self.burst or len(self._all) >= self.global_burst:
            self.suppressed[source] = self.suppressed.get(source, 0) + 1
            return False, 0
        q.append(now)
        self._all.append(now)
        return True, self.suppressed.pop(source, 0)


#: Summary PV name -> the :meth:`AlarmTable.summary` key it shows.
SUMMARY_PVS: dict[str, str] = {
    **{f"ALARM:ACTIVE:{s.name}": f"active_{s.name}" for s in (Severity.MINOR, Severity.MAJOR, Severity.INVALID)},
    **{f"ALARM:UNACKED:{s.name}": f"unacked_{s.name}" for s in (Severity.MINOR, Severity.MAJOR, Severity.INVALID)},
    "ALARM:HIGHEST": "highest",
}


def summary_pv_infos() -> list[PVInfo]:
    """Descriptions of the alarm summary PVs (read-only soft PVs the alarm service keeps)."""
    out = []
    for name, key in SUMMARY_PVS.items():
        if key == "highest":
            out.append(
                PVInfo(name, PVType.ENUM, "alarms", "highest active alarm severity", states=tuple(s.name for s in Severity), initial=0)
            )
        else:
            kind, sev = key.split("_")
            out.append(PVInfo(name, PVType.INT, "alarms", f"{kind} {sev} alarms", unit="alarms", precision=0, initial=0))
    return out
