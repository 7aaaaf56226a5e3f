"""The process database: every PV of a site, its current reading, and the write path.

Theory of operation. One asyncio loop owns the database. Values enter through
:meth:`Database.post` (from instrument scans, driver pushes, soft writes and derived
PVs); ``post`` stamps the alarm state (limits with hysteresis and delay, or the
severity the caller gives, e.g. INVALID/COMM for a lost instrument), decides the event
bits from the deadbands, stores the reading, and hands the update to subscribers:
callbacks inline, monitors through their bounded latest-value buffers. Derived PVs that
depend on the PV are then recomputed. Nothing in ``post`` awaits, so a slow consumer can
never hold up a scan.

Reads are always current. Every post stores its reading -- a change inside the
deadbands, and a scan of an unchanged value with its new time stamp, too -- so
:meth:`Database.read` returns the latest value, severity and time; the deadbands decide
only which subscribers hear of it (monitor deadband: VALUE, archive deadband: LOG), as
MDEL and ADEL do in an EPICS record. A post that passes no deadband costs a store and
nothing else. The protocol adapters keep their own copy of what they serve for their
monitors and refresh it from :meth:`Database.read` when a client reads (the OPC UA
publisher, the Channel Access channels); :meth:`Database.read_fresh` waits for the next
post itself (:meth:`Database.next_reading`), not for a monitor.

Writes from every protocol go through :meth:`Database.write`, which runs the checks in
one order: the PV is writable -> the identity's roles allow its resource -> the
identity holds the resource's lock -> the value has the PV's type and is within the
drive limits -> no interlock forbids it -> the driver writes -> the read-back is posted
-> the write is audited. Each refusal is a :class:`~labctl.ioc.errors.WriteRefused` subclass,
audited with its reason before it is raised.

An accepted write is acknowledged only once its audit record is durable: with a journal
attached (:attr:`Database.journal`, the :class:`~labctl.ioc.access.AuditJournal` protocol;
the server's is :mod:`labctl.server.journal`), :meth:`Database.audit_durable` awaits the
record's batched fsync -- one await, the write path's last step. Every other audit record
goes to the journal too, unawaited. While the journal cannot store records, writes are
refused as ``Unavailable`` before they reach an instrument.

A write the instrument took but whose read-back then failed is neither accepted nor
refused: it is audited as ``write.unconfirmed`` (:data:`~labctl.ioc.access.WRITE_UNCONFIRMED`,
``accepted`` true, the read-back's error as the reason), the PV goes INVALID (TIMEOUT or
READ) until the instrument is read again -- the value it shows is the one before the
write -- and :class:`~labctl.ioc.errors.WrittenUnconfirmed` is raised, which the protocols
answer with a status that says "sent, not confirmed".
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import math
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from labctl.ioc.access import (
    WRITE_UNCONFIRMED,
    AuditJournal,
    AuditRecord,
    InterlockCheck,
    LockCheck,
    NoInterlocks,
    NoLocks,
)
from labctl.ioc.driver import Driver, NoReading, readable
from labctl.ioc.errors import (
    DriverError,
    DriverFault,
    DriverTimeout,
    LabctlError,
    NotWritable,
    Refused,
    Unavailable,
    UnknownPV,
    WriteRefused,
    WrittenUnconfirmed,
    WrongType,
)
from labctl.ioc.expr import EvaluationError, Expression, Table
from labctl.ioc.links import InstrumentLink
from labctl.ioc.policy import Policy
from labctl.ioc.pv import AlarmEvaluator, Deadbands, PVInfo, canonical, coerce, held_value
from labctl.ioc.subscription import Callback, Monitor
from labctl.ioc.types import EventMask, Identity, PVType, Reading, Severity, Status, Update

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class _Record:
    info: PVInfo
    reading: Reading
    alarm: AlarmEvaluator
    deadbands: Deadbands
    expression: Expression | None = None
    dependents: list[_Record] | tuple[()] = ()
    """Derived PVs computed from this one (a list once it has one; nearly every PV has none)."""


#: The evaluator of every PV without alarm limits (it keeps no state).
_NO_LIMITS = AlarmEvaluator(None)


class Database:
    """All PVs of a site. Create it, :meth:`attach` drivers, then ``await start()``."""

    def __init__(
        self,
        pvs: Iterable[PVInfo],
        *,
        policy: Policy,
        tables: Mapping[str, Table] | None = None,
        clock: Callable[[], float] = time.time,
        locks: LockCheck | None = None,
        interlocks: InterlockCheck | None = None,
    ) -> None:
        self.policy = policy
        self.locks: LockCheck = locks or NoLocks()
        self.interlocks: InterlockCheck = interlocks or NoInterlocks()
        self.clock = clock
        self._records: dict[str, _Record] = {}
        self._links: dict[str, InstrumentLink] = {}
        self._callbacks: list[Callback] = []
        self._monitors: list[Monitor] = []
        self._waiting: dict[str, list[asyncio.Future[Reading]]] = {}
        """Futures of :meth:`next_reading` by PV name, resolved by the next post."""
        self._audit_sinks: list[Callable[[AuditRecord], None]] = []
        self.journal: AuditJournal | None = None
        """Where audit records become durable (the server's journal); None: the log and the sinks only."""
        self._started = False
        now = clock()
        for info in pvs:
            if info.name in self._records:
                raise LabctlError(f"duplicate PV name {info.name!r}")
            self._records[info.name] = _Record(
                info,
                info.undefined(now),
                _NO_LIMITS if info.alarm is None else AlarmEvaluator(info.alarm),
                Deadbands(info.monitor_deadband, info.archive_deadband),
            )
        self._link_derived(tables or {})
        for rec in self._records.values():
            if rec.info.instrument is None and rec.info.expr is None and rec.info.initial is not None:
                self.post(rec.info.name, coerce(_unlimited(rec.info), rec.info.initial), now)
        for rec in self._records.values():
            if rec.expression is not None:
                self._recompute(rec)

    def _link_derived(self, tables: Mapping[str, Table]) -> None:
        for rec in self._records.values():
            info = rec.info
            if info.expr is None:
                continue
            for var, src in info.inputs:
                if src not in self._records:
                    raise LabctlError(f"{info.name}: input {var} names unknown PV {src!r}")
                source = self._records[src]
                if not source.dependents:
                    source.dependents = []
                source.dependents.append(rec)  # type: ignore[union-attr]
            rec.expression = Expression(info.expr, [v for v, _ in info.inputs], tables)
        # refuse cycles: a derived PV may not (indirectly) depend on itself
        state: dict[str, int] = {}

        def visit(rec: _Record, path: list[str]) -> None:
            mark = state.get(rec.info.name)
            if mark == 1:
                raise LabctlError(f"derived PVs form a cycle: {' -> '.join([*path, rec.info.name])}")
            if mark == 2:
                return
            state[rec.info.name] = 1
            for dep in rec.dependents:
                visit(dep, [*path, rec.info.name])
            state[rec.info.name] = 2

        for rec in self._records.values():
            visit(rec, [])

    # ---- queries ------------------------------------------------------------------------

    def names(self, pattern: str | None = None) -> list[str]:
        """PV names in declaration order, optionally filtered by a glob pattern."""
        if pattern is None:
            return list(self._records)
        return [n for n in self._records if fnmatch.fnmatchcase(n, pattern)]

    def infos(self) -> list[PVInfo]:
        """Every PV's description, in declaration order."""
        return [r.info for r in self._records.values()]

    def info(self, name: str) -> PVInfo:
        """The description of one PV (raises UnknownPV)."""
        return self._record(name).info

    def read(self, name: str) -> Reading:
        """The latest reading of one PV, whatever the deadbands passed on (raises UnknownPV).

        A new Reading object per post: an adapter that compares the one it serves with this
        one by identity knows whether it is still current.
        """
        return self._record(name).reading

    def next_reading(self, name: str) -> asyncio.Future[Reading]:
        """A future of the PV's next posted reading, passed a deadband or not (raises UnknownPV).

        For a caller that must see a new reading even when the value does not change (a
        scan, a push of the same value): monitors wake only past the deadbands. Cancel the
        future to stop waiting; it is forgotten at the next post.
        """
        self._record(name)
        fut: asyncio.Future[Reading] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(name, []).append(fut)
        return fut

    async def read_fresh(self, name: str, *, timeout_s: float = 10.0) -> Reading:
        """A reading the source produced after this call began, with its own timestamp (jobs' ``read`` and ``wait``).

        An instrument PV on a readable channel is read through its driver now (the value is
        posted as a scan's would be); a channel that cannot be read (pushed values) waits for
        its next value. A derived PV reads its inputs fresh and is recomputed; a soft PV's
        reading is its value (nothing else produces one). Unlike :meth:`read`, never the
        value of the scan before a write.

        Raises:
            UnknownPV: no such PV.
            DriverError: the instrument is not connected, failed, or sent nothing within ``timeout_s``.
        """
        rec = self._record(name)
        info = rec.info
        if info.expr is not None:
            for _, src in info.inputs:
                await self.read_fresh(src, timeout_s=timeout_s)
            return rec.reading
        if info.instrument is None:
            return rec.reading
        link = self._links.get(info.instrument)
        if link is None:
            raise DriverError(info.instrument, "instrument is not attached")
        assert info.channel is not None
        if not link.connected:
            detail = f": {link.last_error}" if link.last_error else ""
            raise DriverFault(info.instrument, f"not connected (reconnecting){detail}")
        if readable(link.driver, info.channel):
            await link.read([info.channel])
            return rec.reading
        # Pushed values: wait for the next one, changed or not (an unchanged value wakes no monitor).
        fut = self.next_reading(name)
        try:
            async with asyncio.timeout(timeout_s):
                await fut
        except TimeoutError:
            raise DriverTimeout(info.instrument, f"{name}: no new value within {timeout_s:g} s") from None
        finally:
            fut.cancel()
        return rec.reading

    def __contains__(self, name: object) -> bool:
        return name in self._records

    def __len__(self) -> int:
        return len(self._records)

    def _record(self, name: str) -> _Record:
        try:
            return self._records[name]
        except KeyError:
            raise UnknownPV(name) from None

    def link(self, instrument: str) -> InstrumentLink:
        """The link supervising an instrument."""
        return self._links[instrument]

    @property
    def links(self) -> Mapping[str, InstrumentLink]:
        """Every instrument link by instrument name."""
        return self._links

    # ---- subscriptions ------------------------------------------------------------------

    def subscribe(
        self, fn: Callable[[Update], None], *, names: Collection[str] | None = None, mask: EventMask = EventMask.ALL
    ) -> Callback:
        """Call ``fn(update)`` inline for every matching update; undo with :meth:`unsubscribe`."""
        cb = Callback(fn, mask, frozenset(names) if names is not None else None)
        self._check_names(names)
        self._callbacks.append(cb)
        return cb

    def unsubscribe(self, cb: Callback) -> None:
        """Remove a callback subscriber."""
        cb.closed = True
        if cb in self._callbacks:
            self._callbacks.remove(cb)

    def monitor(
        self, names: Collection[str] | None = None, *, mask: EventMask = EventMask.VALUE | EventMask.ALARM, initial: bool = True
    ) -> Monitor:
        """An async iterator of updates (latest per PV kept); ``initial`` queues the current readings first."""
        self._check_names(names)
        mon = Monitor(names, mask, self._monitors.remove)
        self._monitors.append(mon)
        if initial:
            for name in names if names is not None else self._records:
                mon.deliver(Update(name, self._records[name].reading, EventMask.ALL))
        return mon

    def _check_names(self, names: Collection[str] | None) -> None:
        for n in names or ():
            if n not in self._records:
                raise UnknownPV(n)

    # ---- updates ------------------------------------------------------------------------

    def post(
        self,
        name: str,
        value: Any,
        timestamp: float | None = None,
        severity: Severity | None = None,
        status: Status | None = None,
    ) -> Update | None:
        """Set a PV's new value; evaluate alarms and deadbands; notify subscribers.

        ``severity``/``status`` override the limit alarm (e.g. INVALID/COMM). A
        :class:`~labctl.ioc.driver.NoReading` for ``value`` posts INVALID with its status,
        keeping the PV's last value (:func:`~labctl.ioc.pv.held_value`). Returns the
        posted update, or None if the change passed no deadband and no alarm changed.
        """
        rec = self._record(name)
        info = rec.info
        ts = self.clock() if timestamp is None else timestamp
        if isinstance(value, NoReading):  # the source has no reading now (a channel switched off)
            return self._set(rec, Reading(held_value(info, rec.reading.value), ts, Severity.INVALID, value.status))
        try:
            value = canonical(info, value)
        except WrongType as e:
            log.warning("%s: bad value from its source: %s", name, e.reason)
            return self._set(rec, Reading(rec.reading.value, ts, Severity.INVALID, Status.READ))
        if severity is None:
            if _is_nan(info, value):
                severity, status = Severity.INVALID, (Status.CALC if info.expr else Status.READ)
            else:
                severity, status = rec.alarm.evaluate(value, ts)
        return self._set(rec, Reading(value, ts, severity, status or Status.NO_ALARM))

    def invalidate(self, names: Iterable[str], status: Status = Status.COMM, timestamp: float | None = None) -> None:
        """Mark PVs INVALID (keeping their last value, which clients must not trust)."""
        ts = self.clock() if timestamp is None else timestamp
        for name in names:
            rec = self._record(name)
            if rec.reading.severity is Severity.INVALID and rec.reading.status is status:
                continue
            self._set(rec, Reading(rec.reading.value, ts, Severity.INVALID, status))

    def _set(self, rec: _Record, reading: Reading) -> Update | None:
        rec.reading = reading  # every post: reads are current whatever the deadbands pass on
        if self._waiting:
            waiting = self._waiting.pop(rec.info.name, None)
            if waiting:
                for fut in waiting:
                    if not fut.done():
                        fut.set_result(reading)
        mask = rec.deadbands.mask(reading)
        update = None
        if mask:
            update = Update(rec.info.name, reading, mask)
            for cb in list(self._callbacks):
                if cb.wants(update):
                    cb.deliver(update)
            for mon in self._monitors:
                if mon.wants(update):
                    mon.deliver(update)
        for dep in rec.dependents:
            self._recompute(dep)
        return update

    def _recompute(self, rec: _Record) -> None:
        assert rec.expression is not None
        env: dict[str, Any] = {}
        ts = 0.0
        status: Status | None = None
        for var, src in rec.info.inputs:
            r = self._records[src].reading
            if not r.valid:
                # A failed input makes the result INVALID/LINK; else an input never defined leaves
                # it undefined (UDF), and one switched off leaves it switched off (DISABLE).
                why = r.status if r.status in (Status.UDF, Status.DISABLE) else Status.LINK
                if status is None or _INPUT_STATUS_RANK[why] < _INPUT_STATUS_RANK[status]:
                    status = why
            env[var] = r.value
            ts = max(ts, r.timestamp)
        if status is not None:
            value = held_value(rec.info, rec.reading.value) if status is Status.DISABLE else rec.reading.value
            self._set(rec, Reading(value, max(ts, rec.reading.timestamp), Severity.INVALID, status))
            return
        try:
            value = rec.expression.evaluate(env)
        except EvaluationError as e:
            log.debug("%s: %s", rec.info.name, e)
            self._set(rec, Reading(rec.reading.value, ts, Severity.INVALID, Status.CALC))
            return
        self.post(rec.info.name, value, ts)

    # ---- writes -------------------------------------------------------------------------

    def add_audit_sink(self, sink: Callable[[AuditRecord], None]) -> None:
        """Receive every audit record (writes here; arbiter and alarms add their own)."""
        self._audit_sinks.append(sink)

    def remove_audit_sink(self, sink: Callable[[AuditRecord], None]) -> None:
        """Stop sending audit records to ``sink``."""
        if sink in self._audit_sinks:
            self._audit_sinks.remove(sink)

    def audit(self, record: AuditRecord) -> Awaitable[None] | None:
        """Send an audit record to the journal, every sink, and the log at INFO (a refusal is expected, not a warning).

        The record gets its ``uid`` here, so the journal and the sinks (the historian) see the
        same key. Returns the journal's awaitable (resolved once the record is durable), or
        None without a journal; only :meth:`audit_durable` waits for it.
        """
        if not record.uid:
            record = replace(record, uid=uuid.uuid4().hex)
        log.info("audit: %s", record)
        durable = self.journal.append(record) if self.journal is not None else None
        for sink in self._audit_sinks:
            try:
                sink(record)
            except Exception:  # an audit sink's bug must not fail the write it records
                log.exception("audit sink %r failed", sink)
        return durable

    async def audit_durable(self, record: AuditRecord) -> None:
        """:meth:`audit`, then wait until the record is durable: the write path's last step before it answers.

        Raises:
            Unavailable: the journal could not store it (the action was done; its record is
                in the log and the historian's queue, not on disk), so the caller is not told "accepted".
        """
        durable = self.audit(record)
        if durable is None:
            return
        try:
            await durable
        except OSError as e:
            raise Unavailable(
                f"done, but its audit record could not be stored durably ({e})", action=record.action, target=record.target
            ) from None

    def _check_journal(self, identity: Identity, name: str, old: Any, value: Any) -> None:
        """Refuse a write before it reaches an instrument while its record could not be made durable."""
        if self.journal is not None and not self.journal.healthy:
            err = Unavailable("the audit journal cannot store records (see the server log)", action="write", target=name)
            raise self.refuse(identity, err, old=old, new=_plain(value))

    def refuse(self, who: Identity, err: Refused, *, old: Any = None, new: Any = None) -> Refused:
        """Audit a refusal once (a second call for the same error does nothing) and return it, to raise.

        Every refusal of every action goes through here: the write path's, the control
        layer's (through :meth:`refusals_audited`), and those the protocol adapters meet
        before an action reaches the core (a write to an attribute that is not a PV's value,
        a node a client may not add), so each leaves exactly one record, alike on every protocol.
        """
        if not getattr(err, "audited", False):
            err.audited = True  # type: ignore[attr-defined]
            action = str(err.action) or "refused"
            self.audit(AuditRecord.of(self.clock(), action, who, err.target, old=old, new=new, accepted=False, reason=err.reason))
        return err

    @contextlib.contextmanager
    def refusals_audited(self, who: Identity, *, new: Any = None) -> Iterator[None]:
        """Audit (once) any :class:`Refused` raised inside the block, then let it propagate."""
        try:
            yield
        except Refused as e:
            self.refuse(who, e, new=new)
            raise

    def check_write(self, name: str, value: Any, identity: Identity) -> Any:
        """Run the write path's checks without writing; return the canonical value."""
        rec = self._record(name)
        info = rec.info
        if not info.writable:
            raise NotWritable(name)
        self.policy.check_write(identity, name, info.resource)
        self.locks.check_write(identity, name, info.resource, self.clock())
        v = coerce(info, value)
        self.interlocks.check_write(identity, name, info.resource, v)
        return v

    def may_write(self, name: str, identity: Identity) -> bool:
        """Whether ``identity`` may write ``name`` now (writable, roles, lock), ignoring the value."""
        info = self._record(name).info
        if not info.writable or not self.policy.may_write(identity, info.resource):
            return False
        try:
            self.locks.check_write(identity, name, info.resource, self.clock())
        except WriteRefused:
            return False
        return True

    async def write(self, name: str, value: Any, identity: Identity) -> Reading:
        """Write a PV through the full write path; return its reading afterwards.

        Raises:
            UnknownPV: no such PV.
            WriteRefused: a rule refused the write (subclass says which).
            WrittenUnconfirmed: the instrument took the value but reading it back failed
                (audited as ``write.unconfirmed``; the PV is INVALID until read again).
            DriverError: the instrument failed to take the value.
        """
        rec = self._record(name)
        info = rec.info
        old = rec.reading.value
        try:
            v = self.check_write(name, value, identity)
        except WriteRefused as e:
            raise self.refuse(identity, e, old=old, new=_plain(value)) from None
        self._check_journal(identity, name, old, value)
        if info.instrument is None:
            self.post(name, v)
        else:
            link = self._links.get(info.instrument)
            try:
                if link is None:
                    raise DriverError(info.instrument, "instrument is not attached")
                assert info.channel is not None
                try:
                    readback = await link.write(info.channel, v)
                except WriteRefused as e:  # the instrument's own limits: say it in the PV's terms
                    e.pv, e.target, e.args = name, name, (f"{name}: write refused: {e.reason}",)
                    raise self.refuse(identity, e, old=old, new=v) from None
            except DriverError as e:
                self.audit(AuditRecord.of(self.clock(), "write", identity, name, old=old, new=v, accepted=False, reason=str(e)))
                raise
            # The instrument took the value: from here on a failure means "not confirmed", never "refused".
            try:
                if readback is not None:
                    self.post(name, readback)
                elif readable(link.driver, info.channel):
                    await link.read([info.channel])
                else:
                    self.post(name, v)  # write-only: the value written is the best knowledge
            except DriverError as e:
                # What the PV shows is the value before the write: not to be trusted until read again.
                self.invalidate([name], Status.TIMEOUT if isinstance(e, DriverTimeout) else Status.READ)
                unconfirmed = WrittenUnconfirmed(info.instrument, name, v, e)
                await self.audit_durable(
                    AuditRecord.of(self.clock(), WRITE_UNCONFIRMED, identity, name, old=old, new=v, reason=unconfirmed.cause)
                )
                raise unconfirmed from e
        # Durable before the caller is told "accepted" (one await on the journal's batched fsync).
        await self.audit_durable(AuditRecord.of(self.clock(), "write", identity, name, old=old, new=v))
        return rec.reading

    # ---- instruments --------------------------------------------------------------------

    def attach(
        self, driver: Driver, *, timeout_s: float = 2.0, reconnect_min_s: float = 0.5, reconnect_max_s: float = 30.0
    ) -> InstrumentLink:
        """Bind a driver to the PVs whose ``instrument`` is its name."""
        pvs = [r.info for r in self._records.values() if r.info.instrument == driver.name]
        if driver.name in self._links:
            raise LabctlError(f"instrument {driver.name!r} is attached twice")
        known = set(driver.channels())
        bad = [f"{p.name} -> {p.channel!r}" for p in pvs if p.channel not in known]
        if bad:
            raise LabctlError(f"{driver.name}: unknown channels {bad}; the driver has {sorted(known)}")
        link = InstrumentLink(
            driver,
            pvs,
            post=self._post_from_link,
            invalidate=self.invalidate,
            clock=self.clock,
            timeout_s=timeout_s,
            reconnect_min_s=reconnect_min_s,
            reconnect_max_s=reconnect_max_s,
        )
        self._links[driver.name] = link
        if self._started:
            link.start()
        return link

    def _post_from_link(self, name: str, value: Any, ts: float) -> None:
        self.post(name, value, ts)

    async def start(self) -> None:
        """Start every instrument link (connect and scan)."""
        self._started = True
        for link in self._links.values():
            link.start()

    async def stop(self) -> None:
        """Stop scanning, close drivers, end monitors."""
        self._started = False
        await asyncio.gather(*(link.stop() for link in self._links.values()))
        for mon in list(self._monitors):
            mon.close()

    # ---- summaries ----------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """PV counts by kind and severity (for start-up logs and ``labctl check``)."""
        out: dict[str, int] = defaultdict(int)
        for r in self._records.values():
            out["total"] += 1
            kind = "derived" if r.info.expr else ("instrument" if r.info.instrument else "soft")
            out[kind] += 1
            out[r.reading.severity.name] += 1
        return dict(out)


#: Which invalid input decides a derived PV's status: a failure first, then "undefined", then "switched off".
_INPUT_STATUS_RANK = {Status.LINK: 0, Status.UDF: 1, Status.DISABLE: 2}


def _is_nan(info: PVInfo, value: Any) -> bool:
    return info.type is PVType.FLOAT64 and isinstance(value, float) and math.isnan(value) and not info.allow_nan


def _unlimited(info: PVInfo) -> PVInfo:
    """The same PV without drive limits (initial values need not be within them)."""
    return info if info.drive is None else replace(info, drive=None)


def _plain(value: Any) -> Any:
    """A value as it may be shown in an audit record (bounded size)."""
    text = repr(value)
    return value if len(text) <= 200 else text[:197] + "..."

