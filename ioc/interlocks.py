"""Interlocks: rules over PVs that protect the apparatus on their own.

Theory of operation. Each rule (:class:`labctl.ioc.config.interlocks.InterlockConfig`) is a state machine
(:class:`InterlockRule`, pure: readings and ``now`` in, transitions out)::

    OK/WARN --trip holds--> PENDING --for for_s--> TRIPPED --release holds--> CLEARING
       ^          <--trip gone--'                    ^  <--release gone--'      |
       |                                            '----- trip again -------.  | clear_for_s
       '----------- reset by an authorised person (manual) --- RESET_NEEDED <-'-'
       '------------------------------------------------------ (auto) <--------'

Warn / trip / resume levels with grace periods make a value hovering at a limit trip
once and release once, not flap. While TRIPPED, CLEARING or RESET_NEEDED (*engaged*) the
rule's actions hold:

* the job queue is held (``hold_queue``);
* writes to the PVs of the named resources are refused (``refuse_writes``), for everyone
  but the server's own actors;
* the safe values (``set``) are written on entering TRIPPED and *held*: a write of any
  other value to a safe PV is refused from everyone -- operators, admins, jobs, every
  protocol, the server's other actors -- with :class:`~labctl.ioc.errors.Interlocked`
  naming the interlock (a write of the safe value itself passes: it changes nothing, and
  a job's cleanup that turns a heater off must not fail for it); and if the instrument
  reports another value (someone at its front panel, a controller that drifted, a write
  that raced the trip) the interlock writes the safe value again, at most once per
  :data:`REASSERT_MIN_S` per PV, with a WARNING in the log and an ``interlock.reassert``
  audit record. A safe value declared ``hold: false`` is only driven once.

The interlocks act as internal identities (:func:`labctl.ioc.types.internal_identity`,
``labctl@interlock:<name>``), which no site file or client can name: they pass the policy
and the lock checks, so a heater is turned off however its resource is locked.

:class:`InterlockManager` is the async shell: it feeds readings of the watched PVs to
the rules, wakes at grace-period deadlines, applies actions, watches the safe PVs,
publishes each rule's state PV (``ILK:<NAME>:STATE``), and audits every trip, release,
reset and re-assertion. It is also the write path's interlock check.
:func:`definition_problems` finds definitions that would not hold (a safe value a PV
does not take, a read-only safe PV: errors; a safe PV writable while tripped: a warning
``labctl check`` prints).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from labctl.ioc.access import AuditRecord
from labctl.ioc.config.interlocks import InterlockConfig
from labctl.ioc.database import Database
from labctl.ioc.errors import Conflict, DriverError, Interlocked, LabctlError, NotFound, Refused, WriteRefused
from labctl.ioc.expr import EvaluationError, Expression
from labctl.ioc.policy import Action, Policy, Target
from labctl.ioc.pv import PVInfo, coerce
from labctl.ioc.types import (
    EventMask,
    Identity,
    PVType,
    Reading,
    Severity,
    Status,
    Update,
    internal_identity,
    values_equal,
)

from labctl.yamlmodel import dotted

log = logging.getLogger(__name__)

STATES = ("OK", "WARN", "PENDING", "TRIPPED", "CLEARING", "RESET_NEEDED")
State = Literal["OK", "WARN", "PENDING", "TRIPPED", "CLEARING", "RESET_NEEDED"]
ENGAGED: frozenset[str] = frozenset({"TRIPPED", "CLEARING", "RESET_NEEDED"})
#: A held safe PV is re-asserted at most this often (an instrument that keeps reporting
#: another value must not turn the interlock into a write storm).
REASSERT_MIN_S = 1.0


def actor(name: str) -> Identity:
    """The internal identity an interlock acts under."""
    return internal_identity(f"interlock:{name}")


def is_safe(value: Any, safe: Any) -> bool:
    """Whether a PV's value is its safe value (floats within a part in a million: read-backs round)."""
    if isinstance(value, float) and isinstance(safe, float):
        return math.isclose(value, safe, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(value, (int, float)) and isinstance(safe, (int, float)) and not isinstance(value, bool) and not isinstance(safe, bool):
        return float(value) == float(safe)
    return values_equal(value, safe)


class InterlockRefused(Refused):
    """An interlock operation was refused. Subclasses say why."""

    FIELDS: tuple[str, ...] = ("interlock",)

    def __init__(self, reason: str, *, interlock: str) -> None:
        self.interlock = interlock
        super().__init__(reason, action=Action.INTERLOCK_RESET, target=interlock)


class NoSuchInterlock(InterlockRefused, NotFound):
    """No interlock has that name."""


class NotResettable(InterlockRefused, Conflict):
    """The interlock is not waiting for a reset (not tripped, or its condition has not cleared)."""

    FIELDS = ("interlock", "state")

    def __init__(self, reason: str, *, interlock: str, state: str) -> None:
        self.state = state
        super().__init__(reason, interlock=interlock)


@dataclass(frozen=True, slots=True)
class Transition:
    """A rule changed state."""

    name: str
    old: State
    new: State
    time: float
    reason: str


#: The resource of the interlocks' state PVs.
RESOURCE = "interlocks"


def state_pv(name: str) -> str:
    """The PV that shows an interlock's state."""
    return f"ILK:{name.upper()}:STATE"


def state_pv_info(cfg: InterlockConfig) -> PVInfo:
    """Description of an interlock's state PV (an enum, read-only, alarmed when engaged)."""
    return PVInfo(
        name=state_pv(cfg.name),
        type=PVType.ENUM,
        resource=RESOURCE,
        description=(cfg.description or f"interlock {cfg.name}")[:40],
        states=STATES,
        initial=0,
    )


class InterlockRule:
    """One interlock's state machine."""

    def __init__(self, cfg: InterlockConfig) -> None:
        self.cfg = cfg
        self.state: State = "OK"
        self.since = 0.0
        self.reason = ""
        if cfg.condition is not None:
            names = list(cfg.inputs)
            self._trip = Expression(cfg.condition, names)
            self._warn = Expression(cfg.warn_condition, names) if cfg.warn_condition else None
            self._clear = Expression(cfg.clear, names) if cfg.clear else None

    @property
    def engaged(self) -> bool:
        """Whether the rule's actions are in force."""
        return self.state in ENGAGED

    def _conditions(self, readings: Mapping[str, Reading]) -> tuple[bool, bool, bool, str]:
        """(trip, warn, release, why) for the current readings."""
        cfg = self.cfg
        invalid = [pv for pv, r in readings.items() if not r.valid]
        if invalid:
            if cfg.invalid_trips:
                return True, True, False, f"{', '.join(invalid)} INVALID"
            return False, False, self.engaged is False, ""
        if cfg.pv is not None:
            v = readings[cfg.pv].value
            sign = 1 if cfg.direction == "above" else -1
            beyond = lambda limit: limit is not None and sign * (v - limit) > 0  # noqa: E731
            resume = cfg.resume if cfg.resume is not None else cfg.trip
            release = not beyond(resume) and (cfg.resume is None or sign * (v - resume) < 0)
            word = ">" if sign > 0 else "<"
            tripping = beyond(cfg.trip)
            why = f"{cfg.pv} = {v:.4g}" + (f" {word} {cfg.trip:g}" if tripping else "")
            return tripping, beyond(cfg.warn), release, why
        env = {var: readings[pv].value for var, pv in cfg.inputs.items()}
        try:
            trip = bool(self._trip.evaluate(env))
            warn = trip or bool(self._warn.evaluate(env)) if self._warn else trip
            release = bool(self._clear.evaluate(env)) if self._clear else not trip
        except EvaluationError as e:
            return True, True, False, f"condition cannot be evaluated: {e}"
        return trip, warn, release, cfg.condition or ""

    def evaluate(self, readings: Mapping[str, Reading], now: float) -> list[Transition]:
        """Advance the state machine for the current readings at ``now``."""
        if any(r.status is Status.UDF for r in readings.values()):
            return []  # not read yet (start-up): nothing to judge; a lost instrument reads COMM
        trip, warn, release, why = self._conditions(readings)
        out: list[Transition] = []
        for _ in range(4):  # at most a few instantaneous steps (zero grace periods)
            new = self._next(trip, warn, release, now)
            if new is None:
                break
            out.append(Transition(self.cfg.name, self.state, new, now, why))
            self.state, self.since = new, now
            self.reason = why if new in ("PENDING", "TRIPPED", "WARN") else self.reason
        return out

    def _next(self, trip: bool, warn: bool, release: bool, now: float) -> State | None:
        cfg, s = self.cfg, self.state
        idle: State = "WARN" if warn else "OK"
        if s in ("OK", "WARN"):
            if trip:
                return "PENDING"
            return idle if idle != s else None
        if s == "PENDING":
            if not trip:
                return idle
            return "TRIPPED" if now - self.since >= cfg.for_s else None
        if s == "TRIPPED":
            return "CLEARING" if release else None
        if s == "CLEARING":
            if not release:
                return "TRIPPED"
            if now - self.since >= cfg.clear_for_s:
                return "RESET_NEEDED" if cfg.reset == "manual" else idle
            return None
        if s == "RESET_NEEDED":
            return "TRIPPED" if trip else None
        raise AssertionError(s)

    def deadline(self) -> float | None:
        """When the state may change with no new reading (end of a grace period)."""
        if self.state == "PENDING":
            return self.since + self.cfg.for_s
        if self.state == "CLEARING":
            return self.since + self.cfg.clear_for_s
        return None

    def reset(self, now: float) -> Transition:
        """Release a rule waiting for a manual reset."""
        if self.state != "RESET_NEEDED":
            if self.engaged:
                raise NotResettable(f"interlock {self.cfg.name!r} cannot be reset yet: its condition has not cleared ({self.state})", interlock=self.cfg.name, state=self.state)
            raise NotResettable(f"interlock {self.cfg.name!r} is not tripped", interlock=self.cfg.name, state=self.state)
        t = Transition(self.cfg.name, self.state, "OK", now, "reset")
        self.state, self.since = "OK", now
        return t


class QueueHold:
    """What an interlock needs of the job queue (the JobManager provides it)."""

    def hold(self, source: str, reason: str) -> None:  # pragma: no cover - protocol
        """Hold."""

    def release_hold(self, source: str) -> None:  # pragma: no cover - protocol
        """Release."""


class InterlockManager:
    """Runs the site's interlocks on a database.

    Raises :class:`~labctl.ioc.errors.LabctlError` if a definition cannot hold (see
    :func:`definition_problems`): a server never starts with an interlock that would fail
    to drive its safe values.
    """

    def __init__(
        self,
        db: Database,
        rules: Iterable[InterlockConfig],
        *,
        policy: Policy,
        queue: QueueHold | None = None,
    ) -> None:
        self.db = db
        self.policy = policy
        self.queue = queue
        rules = tuple(rules)
        errors = [f"{dotted(path)}: {msg}" for path, msg, level in definition_problems(rules, db.info) if level == "error"]
        if errors:
            raise LabctlError("interlocks that cannot hold:\n" + "\n".join(errors))
        self.rules = {cfg.name: InterlockRule(cfg) for cfg in rules}
        self._by_pv: dict[str, list[InterlockRule]] = {}
        for rule in self.rules.values():
            for pv in rule.cfg.watched:
                self._by_pv.setdefault(pv, []).append(rule)
        #: rule -> PV -> the canonical safe value it drives on trip; ``_held`` those it also holds
        self._safe: dict[str, dict[str, Any]] = {
            cfg.name: {sv.pv: coerce(db.info(sv.pv), sv.value) for sv in cfg.actions.set} for cfg in rules
        }
        self._held: dict[str, dict[str, Any]] = {
            cfg.name: {sv.pv: self._safe[cfg.name][sv.pv] for sv in cfg.actions.set if sv.hold} for cfg in rules
        }
        self._holders: dict[str, list[InterlockRule]] = {}
        for name, held in self._held.items():
            for pv in held:
                self._holders.setdefault(pv, []).append(self.rules[name])
        self._listeners: list[Callable[[Transition], None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._reasserting: set[tuple[str, str]] = set()
        self._last_reassert: dict[tuple[str, str], float] = {}
        self._recheck: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._sub = None

    def on_transition(self, fn: Callable[[Transition], None]) -> None:
        """``fn(transition)`` on every state change."""
        self._listeners.append(fn)

    # ---- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Watch the PVs (inputs and held safe PVs) and evaluate every rule once with the current readings."""
        names = sorted(set(self._by_pv) | set(self._holders))
        self._sub = self.db.subscribe(self._on_update, names=names, mask=EventMask.VALUE | EventMask.ALARM | EventMask.LOG)
        for rule in self.rules.values():
            self._evaluate(rule)

    async def stop(self) -> None:
        """Stop watching; let safe-value writes in flight finish."""
        if self._sub is not None:
            self.db.unsubscribe(self._sub)
            self._sub = None
        if self._timer is not None:
            self._timer.cancel()
        for handle in self._recheck.values():
            handle.cancel()
        self._recheck.clear()
        await asyncio.gather(*self._writes, return_exceptions=True)

    # ---- evaluation ------------------------------------------------------------------------------

    def _on_update(self, update: Update) -> None:
        for rule in self._by_pv.get(update.name, ()):
            self._evaluate(rule)
        for rule in self._holders.get(update.name, ()):
            if rule.engaged:
                self._hold(rule, update.name, update.reading)

    def _evaluate(self, rule: InterlockRule) -> None:
        readings = {pv: self.db.read(pv) for pv in rule.cfg.watched}
        for t in rule.evaluate(readings, self.db.clock()):
            self._apply(rule, t)
        self._arm_timer()

    def _arm_timer(self) -> None:
        deadlines = [d for r in self.rules.values() if (d := r.deadline()) is not None]
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadlines:
            loop = asyncio.get_running_loop()
            delay = max(0.0, min(deadlines) - self.db.clock())
            self._timer = loop.call_later(delay + 1e-3, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        for rule in self.rules.values():
            if rule.deadline() is not None:
                self._evaluate(rule)
        self._arm_timer()

    def _apply(self, rule: InterlockRule, t: Transition) -> None:
        cfg = rule.cfg
        was, now_engaged = t.old in ENGAGED, t.new in ENGAGED
        level = logging.WARNING if t.new in ("TRIPPED", "PENDING", "WARN") else logging.INFO
        log.log(level, "interlock %s: %s -> %s (%s)", cfg.name, t.old, t.new, t.reason)
        self.db.post(state_pv(cfg.name), STATES.index(t.new), t.time, *self._severity(t.new))
        me = actor(cfg.name)
        if t.new == "TRIPPED" and t.old != "CLEARING":  # a new trip (not a failed release)
            self.db.audit(AuditRecord.of(t.time, "interlock.trip", me, cfg.name, new="TRIPPED", reason=t.reason))
            for pv, value in self._safe[cfg.name].items():
                self._start_write(cfg.name, pv, value)
        elif now_engaged:  # still engaged (tripped again while clearing): the held values must still be safe
            for pv in self._held[cfg.name]:
                self._hold(rule, pv, self.db.read(pv))
        if now_engaged and not was and cfg.actions.hold_queue and self.queue is not None:
            self.queue.hold(f"interlock:{cfg.name}", t.reason)
        if was and not now_engaged:
            self.db.audit(AuditRecord.of(t.time, "interlock.release", me, cfg.name, new=t.new, reason=t.reason))
            if cfg.actions.hold_queue and self.queue is not None:
                self.queue.release_hold(f"interlock:{cfg.name}")
            for pv in self._held[cfg.name]:
                handle = self._recheck.pop((cfg.name, pv), None)
                if handle is not None:
                    handle.cancel()
        for fn in self._listeners:
            try:
                fn(t)
            except Exception:  # a listener's bug must not stop the protection
                log.exception("interlock listener failed")

    @staticmethod
    def _severity(state: str) -> tuple[Severity, Status]:
        if state in ENGAGED:
            return Severity.MAJOR, Status.STATE
        if state in ("WARN", "PENDING"):
            return Severity.MINOR, Status.STATE
        return Severity.NO_ALARM, Status.NO_ALARM

    # ---- holding the safe values -------------------------------------------------------------------

    def _hold(self, rule: InterlockRule, pv: str, reading: Reading) -> None:
        """An engaged rule saw its held PV read ``reading``: write the safe value again if it is not."""
        name = rule.cfg.name
        safe = self._held[name][pv]
        key = (name, pv)
        if not reading.valid or reading.status is Status.UDF or is_safe(reading.value, safe) or key in self._reasserting:
            return  # an INVALID reading says nothing of the value; a write already on its way will be checked again
        wait = self._last_reassert.get(key, -math.inf) + REASSERT_MIN_S - self.db.clock()
        if wait > 0:  # re-asserted a moment ago: look again when the interval is over
            if key not in self._recheck:
                self._recheck[key] = asyncio.get_running_loop().call_later(wait, self._recheck_now, rule, pv)
            return
        now = self.db.clock()
        self._last_reassert[key] = now
        log.warning("interlock %s: %s reads %r, not its safe value %r: writing the safe value again", name, pv, reading.value, safe)
        self.db.audit(AuditRecord.of(now, "interlock.reassert", actor(name), pv, old=reading.value, new=safe, reason=f"interlock {name!r} is {rule.state}"))
        self._start_write(name, pv, safe, reassert=True)

    def _recheck_now(self, rule: InterlockRule, pv: str) -> None:
        self._recheck.pop((rule.cfg.name, pv), None)
        if rule.engaged:
            self._hold(rule, pv, self.db.read(pv))

    def _start_write(self, name: str, pv: str, value: Any, *, reassert: bool = False) -> None:
        task = asyncio.get_running_loop().create_task(self._drive(name, pv, value, reassert), name=f"interlock {name}: {pv}")
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _drive(self, name: str, pv: str, value: Any, reassert: bool = False) -> None:
        key = (name, pv)
        self._reasserting.add(key)
        try:
            await self.db.write(pv, value, actor(name))
            log.warning("interlock %s: drove %s to %r", name, pv, value)
        except (WriteRefused, DriverError) as e:
            log.error("interlock %s: could not drive %s to %r: %s", name, pv, value, e)
        except Exception:  # the boundary of this task: a bug is reported once, with its traceback
            log.exception("interlock %s: driving %s to %r failed", name, pv, value)
        finally:
            self._reasserting.discard(key)
        rule = self.rules[name]
        if rule.engaged and pv in self._held[name]:  # what the instrument reports now must be safe too
            self._hold(rule, pv, self.db.read(pv))

    # ---- commands --------------------------------------------------------------------------------

    def reset(self, name: str, who: Identity) -> Transition:
        """Reset a rule waiting for it; one of the rule's reset roles (or admin) may: the policy decides.

        A refusal is audited once, by the core."""
        with self.db.refusals_audited(who):
            rule = self.rules.get(name)
            if rule is None:
                raise NoSuchInterlock(f"no interlock {name!r}; interlocks are {sorted(self.rules)}", interlock=name)
            self.policy.decide(who, Action.INTERLOCK_RESET, Target(name, roles=frozenset(rule.cfg.reset_roles)))
            t = rule.reset(self.db.clock())
        self.db.audit(AuditRecord.of(t.time, "interlock.reset", who, name, new="OK"))
        self._apply(rule, Transition(name, "RESET_NEEDED", "OK", t.time, f"reset by {who.user}"))
        return t

    def state(self, name: str) -> State:
        """A rule's state."""
        return self.rules[name].state

    def holding(self, pv: str) -> list[tuple[str, Any]]:
        """The engaged interlocks that hold ``pv`` at a safe value, with that value."""
        return [(r.cfg.name, self._held[r.cfg.name][pv]) for r in self._holders.get(pv, ()) if r.engaged]

    # ---- the write path's check --------------------------------------------------------------------

    def check_write(self, identity: Identity, pv: str, resource: str, value: Any) -> None:
        """Raise :class:`Interlocked` if an engaged rule forbids writing ``value`` to ``pv``.

        A held safe PV takes only its safe value, from everyone (internal actors included);
        the PVs of a refused resource take nothing, except from the server's own actors.
        """
        for rule in self._holders.get(pv, ()):
            if rule.engaged and not is_safe(value, safe := self._held[rule.cfg.name][pv]):
                raise Interlocked(pv, rule.cfg.name, f"{rule.reason}; {pv} is held at its safe value {safe!r}".lstrip("; "))
        if identity.internal:
            return
        for rule in self.rules.values():
            if rule.engaged and resource in rule.cfg.actions.refuse_writes:
                raise Interlocked(pv, rule.cfg.name, rule.reason)


def definition_problems(
    rules: Iterable[InterlockConfig], info: Callable[[str], PVInfo], pvs: Iterable[PVInfo] = ()
) -> list[tuple[tuple[Any, ...], str, Literal["error", "warning"]]]:
    """Interlock definitions that would not hold, as (site-file key path, message, level).

    Errors: a safe value its PV does not take (wrong type, outside the drive limits), a
    read-only safe PV. Warnings: a safe PV left writable while the interlock is engaged
    (``hold: false`` with no ``why_writable``), and another writable PV on the same
    instrument channel as a held safe PV (an alias that bypasses the hold) whose resource
    the interlock does not refuse. ``pvs``: every PV of the site, for the alias check.
    """
    out: list[tuple[tuple[Any, ...], str, Literal["error", "warning"]]] = []
    by_channel: dict[tuple[str, str], list[PVInfo]] = {}
    for p in pvs:
        if p.instrument is not None and p.channel is not None and p.writable:
            by_channel.setdefault((p.instrument, p.channel), []).append(p)
    for i, cfg in enumerate(rules):
        for k, sv in enumerate(cfg.actions.set):
            where = ("interlocks", i, "actions", "set", k)
            try:
                pv = info(sv.pv)
            except KeyError:
                continue  # the site's cross-check reports unknown PVs
            if not pv.writable:
                out.append((where + ("pv",), f"{sv.pv} is read-only: the interlock could not drive it to its safe value", "error"))
                continue
            try:
                coerce(pv, sv.value)
            except WriteRefused as e:
                out.append((where + ("value",), f"{sv.pv} does not take the safe value {sv.value!r}: {e.reason}", "error"))
                continue
            if not sv.hold and not sv.why_writable:
                out.append((where, f"{sv.pv} is writable while interlock {cfg.name!r} is tripped (hold: false); "
                            "if that is intended, say why in 'why_writable'", "warning"))  # fmt: skip
            if sv.hold and pv.instrument is not None and pv.channel is not None:
                for alias in by_channel.get((pv.instrument, pv.channel), ()):
                    if alias.name != pv.name and alias.resource not in cfg.actions.refuse_writes:
                        out.append((where, f"{alias.name} writes the same channel as safe PV {sv.pv} and stays writable while "
                                    f"interlock {cfg.name!r} is tripped; refuse its resource {alias.resource!r} or hold it too", "warning"))  # fmt: skip
    return out
