"""The control layer's records in the client: locks, leases, alarms, jobs, procedures, interlocks.

Theory of operation. The control layer (locks, jobs, alarms, interlocks, the audit trail)
is reached through the server's methods (``Objects/<site>/Control`` and each lockable
resource's ``Objects/<site>/Resources/<resource>/Lock``), whose structured answers are
JSON. The ``decode_*`` functions turn one JSON object of such an answer into the frozen
dataclasses below (:class:`LockInfo`, :class:`Lease`, :class:`AlarmInfo`,
:class:`JobInfo`, :class:`JobDetail`, :class:`ProcedureInfo`, :class:`InterlockInfo`);
this is the one place that knows the answers' field names.
:class:`HeldLock` is the lease :meth:`~labctl.clients.session.Session.hold_lock` keeps
renewed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    value: Any = None
    """The PV's value now (an enum's state index: name it with the PV's metadata)."""


@dataclass(frozen=True)
class JobInfo:
    """A job's summary.

    ``phase`` is ``steps`` or ``cleanup`` while it runs (``cleanup`` also for a failed job
    whose cleanup runs after a restart). ``waiting`` says, as data, what holds a queued (or
    paused) job -- ``{"kind": "lock", "resource", "owner", "until", "job"}``,
    ``{"kind": "interlock", "interlock", "reason"}`` or ``{"kind": "hold", "source",
    "reason"}`` -- and ``waiting_reason`` says it for people.
    """

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
    phase: str = ""
    waiting: dict | None = None
    waiting_reason: str = ""

    @property
    def state_text(self) -> str:
        """The state as a person reads it: ``running (cleanup)``, ``queued (held by interlock mxc_warm)``."""
        notes = ["paused"] if self.paused else []
        if self.phase == "cleanup":
            notes.append("cleanup")
        if self.waiting_reason:
            notes.append(self.waiting_reason)
        return self.state + (f" ({'; '.join(notes)})" if notes else "")


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
    since: float | None = None
    """When it entered its state (UNIX s; None or 0 if never since start-up)."""


@dataclass
class HeldLock:
    """A lock kept renewed by :meth:`~labctl.clients.session.Session.hold_lock`: the current lease, and why it was lost (None while held)."""

    lease: Lease
    lost: str | None = None


# ---- decoders ---------------------------------------------------------------------------


def decode_lock(d: dict[str, Any]) -> LockInfo:
    """A ``ListLocks`` entry."""
    return LockInfo(d["resource"], bool(d["lockable"]), d["owner"], d["client"], d["expires_at"], [(q["user"], int(q["priority"])) for q in d["queue"]])


def decode_alarm(d: dict[str, Any]) -> AlarmInfo:
    """A ``ListAlarms`` entry."""
    return AlarmInfo(d["source"], d["severity"], d["current"], d["status"], bool(d["acked"]), bool(d["active"]), d["message"],
                     d["guidance"], d["since"], d["shelved_until"], d.get("value"))  # fmt: skip


def decode_interlock(d: dict[str, Any]) -> InterlockInfo:
    """A ``ListInterlocks`` entry."""
    return InterlockInfo(d["name"], d["state"], d["reason"], d["description"], d.get("since"))


def decode_procedure(d: dict[str, Any]) -> ProcedureInfo:
    """A ``ListProcedures`` entry."""
    return ProcedureInfo(d["name"], d["description"], list(d["resources"]), dict(d["params"]))


def decode_job(d: dict[str, Any]) -> JobInfo:
    """A ``ListJobs`` entry."""
    return JobInfo(
        id=int(d["id"]), procedure=d["procedure"], owner=d["owner"], state=d["state"], paused=bool(d["paused"]),
        priority=int(d["priority"]), params=dict(d["params"]), resources=list(d["resources"]),
        submitted_at=d["submitted_at"], started_at=d["started_at"], ended_at=d["ended_at"], error=d["error"],
        phase=d.get("phase") or "", waiting=d.get("waiting") or None, waiting_reason=d.get("waiting_reason") or "",
    )  # fmt: skip


def decode_job_detail(d: dict[str, Any]) -> JobDetail:
    """A ``GetJob`` answer."""
    info = decode_job(d)
    log_lines = [(float(t), str(line)) for t, line in d.get("log", [])]
    results = [(r["time"], r["pv"], _value(r["value"]), r["severity"], r["status"], r["label"]) for r in d.get("results", [])]
    return JobDetail(**{k: getattr(info, k) for k in JobInfo.__dataclass_fields__}, log=log_lines, results=results)


def _value(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v
