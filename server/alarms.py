"""The alarm service of a running server: alarm states, acknowledge and shelving, summary PVs, notifications.

The rules live in ``ioc`` (:mod:`labctl.ioc.alarms`: :class:`~labctl.ioc.alarms.AlarmTable`,
:class:`~labctl.ioc.alarms.RateLimiter`); :class:`AlarmService` is their async shell on one
server. It follows every PV's severity through one database subscription and turns it into
alarm states, keeps the summary PVs, sends rate-limited notifications
(:mod:`labctl.server.notify`), expires shelving with one timer, and lets authorised people
acknowledge and shelve (audited either way). Listeners (OPC UA events, the historian)
hear every alarm transition; a store (the historian) keeps the states across restarts.

It is part of the control layer (:class:`labctl.server.control.ControlService`), through
which protocol adapters reach it (``server.control.alarms``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from labctl.ioc.access import AuditRecord
from labctl.ioc.alarms import SUMMARY_PVS, Alarm, AlarmEvent, AlarmTable, RateLimiter
from labctl.ioc.policy import Action, Target
from labctl.ioc.types import EventMask, Identity, Update
from labctl.server.notify import Notifier

if TYPE_CHECKING:
    from labctl.server.app import Server

log = logging.getLogger("labctl.control")


class AlarmService:
    """Alarm states of a database's PVs, with acknowledge, shelving, summary PVs and notifications."""

    def __init__(self, server: Server) -> None:
        self.db = server.db
        site = server.site
        sources, states = {}, {}
        for info in self.db.infos():
            if info.name in SUMMARY_PVS or info.resource == "arbiter":
                continue
            cfg = info.alarm
            sources[info.name] = (bool(cfg and cfg.latch), cfg.guidance if cfg else "", info.unit)
            if info.states:
                states[info.name] = info.states
        self.table = AlarmTable(sources, states)
        n = site.notifications
        self.limiter = RateLimiter(n.burst, n.window_s, n.global_burst)
        self.notifier = Notifier(n, site.site)
        self._listeners: list[Callable[[AlarmEvent], None]] = []
        self._sub = None
        self._timer: asyncio.TimerHandle | None = None
        self.store: Any = None

    def on_event(self, fn: Callable[[AlarmEvent], None]) -> None:
        """``fn(event)`` for every alarm transition (OPC UA events, the historian)."""
        self._listeners.append(fn)

    def start(self) -> None:
        """Take every PV's current severity and follow its changes."""
        if self.store is not None:
            self.table.restore(self.store.load_alarms())
        for name in list(self.table._alarms):  # noqa: SLF001 -- the table is ours
            self._handle(self.table.update(name, self.db.read(name)))
        self._publish_summary()
        self._sub = self.db.subscribe(self._on_update, mask=EventMask.ALARM)
        self._arm_shelving()

    async def stop(self) -> None:
        """Stop following; let notifications in flight go out."""
        if self._sub is not None:
            self.db.unsubscribe(self._sub)
        if self._timer is not None:
            self._timer.cancel()
        await self.notifier.drain()

    def _on_update(self, update: Update) -> None:
        if update.name in self.table:
            self._handle(self.table.update(update.name, update.reading))

    def _handle(self, events: list[AlarmEvent]) -> None:
        if not events:
            return
        now = self.db.clock()
        for ev in events:
            if ev.kind in ("raised", "changed", "returned", "cleared") and not ev.alarm.shelved(now):
                ok, suppressed = self.limiter.allow(ev.alarm.source, now)
                if ok:
                    self.notifier.notify(ev, suppressed)
            if self.store is not None:
                self.store.save_alarm(ev)
            for fn in self._listeners:
                try:
                    fn(ev)
                except Exception:  # a listener's bug must not stop alarm handling
                    log.exception("alarm listener failed")
        self._publish_summary()

    def _publish_summary(self) -> None:
        summary = self.table.summary(self.db.clock())
        for pv, key in SUMMARY_PVS.items():
            if self.db.read(pv).value != summary[key] or not self.db.read(pv).valid:
                self.db.post(pv, summary[key])

    def _arm_shelving(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        until = [a.shelved_until for a in self.table.all() if a.shelved_until is not None]
        if until:
            delay = max(0.0, min(until) - self.db.clock())
            self._timer = asyncio.get_running_loop().call_later(delay + 1e-3, self._expire_shelving)

    def _expire_shelving(self) -> None:
        self._timer = None
        self._handle(self.table.expire_shelving(self.db.clock()))
        self._arm_shelving()

    # ---- commands -----------------------------------------------------------------------------------

    def acknowledge(self, source: str, who: Identity, comment: str = "") -> Alarm:
        """Acknowledge an alarm (the policy decides who may); a refusal is audited once, by the core."""
        now = self.db.clock()
        with self.db.refusals_audited(who):
            self.db.policy.decide(who, Action.ALARM_ACK, Target(source))
            events = self.table.acknowledge(source, who.user, now, comment)
        self.db.audit(AuditRecord.of(now, "alarm.ack", who, source, new=self.table.get(source).latched.name, reason=comment))
        self._handle(events)
        return self.table.get(source)

    def shelve(self, source: str, who: Identity, duration_s: float, reason: str) -> Alarm:
        """Shelve an alarm (experts); a refusal is audited once, by the core."""
        now = self.db.clock()
        with self.db.refusals_audited(who, new=duration_s):
            self.db.policy.decide(who, Action.ALARM_SHELVE, Target(source))
            events = self.table.shelve(source, who.user, now, duration_s, reason)
        self.db.audit(AuditRecord.of(now, "alarm.shelve", who, source, new=duration_s, reason=reason))
        self._handle(events)
        self._arm_shelving()
        return self.table.get(source)

    def unshelve(self, source: str, who: Identity) -> Alarm:
        """End shelving early (experts); a refusal is audited once, by the core."""
        now = self.db.clock()
        with self.db.refusals_audited(who):
            self.db.policy.decide(who, Action.ALARM_UNSHELVE, Target(source))
            events = self.table.unshelve(source, who.user, now)
        self.db.audit(AuditRecord.of(now, "alarm.unshelve", who, source))
        self._handle(events)
        self._arm_shelving()
        return self.table.get(source)
