"""Errors raised by the process database, drawn as a tree::

    LabctlError
    ├── ConfigError                 a site file is malformed (lists every problem)
    ├── UnknownPV                   no PV has that name
    ├── WriteRefused                a write was refused before it reached an instrument
    │   ├── PermissionDenied        the identity's roles do not allow writing this PV
    │   ├── NotWritable             the PV is read-only
    │   ├── LockedBy                the PV's resource is locked by someone else
    │   ├── WrongType               the value is not of the PV's type (or is NaN, too long...)
    │   ├── OutOfRange              the value is outside the PV's drive limits
    │   └── Interlocked             an interlock forbids writing the resource
    └── DriverError                 the instrument side failed
        ├── DriverFault             the instrument answered wrongly or the link is down
        └── DriverTimeout           the instrument did not answer in time

``WriteRefused`` means *you sent something the rules refuse* (expected: logged at INFO
and audited, no traceback); ``DriverError`` means *the peer misbehaved*. Every refusal
carries its fields (``pv``, ``owner``, ``until``, ``limit``...) so each protocol adapter
maps it to its own status through one table, and its ``str()`` is a sentence a person
understands.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from typing import Any


class LabctlError(Exception):
    """Base of every error labctl raises on purpose."""


class ConfigError(LabctlError):
    """A site file is malformed. ``problems`` holds one line per problem."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{source}: {n} problem{'s' if n != 1 else ''}"
        super().__init__("\n".join([head, *self.problems]))


class UnknownPV(LabctlError, KeyError):
    """No PV has this name."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(name)

    def __str__(self) -> str:
        return f"no PV named {self.name!r}"


class WriteRefused(LabctlError):
    """A write was refused by the rules. Subclasses say which rule."""

    def __init__(self, pv: str, reason: str) -> None:
        self.pv = pv
        self.reason = reason
        super().__init__(f"{pv}: write refused: {reason}")


class PermissionDenied(WriteRefused):
    """The identity's roles do not allow writing this PV."""

    def __init__(self, pv: str, user: str, resource: str) -> None:
        self.user = user
        self.resource = resource
        super().__init__(pv, f"user {user!r} may not write resource {resource!r}")


class NotWritable(WriteRefused):
    """The PV is read-only."""

    def __init__(self, pv: str) -> None:
        super().__init__(pv, "the PV is read-only")


def _utc(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%H:%M:%S UTC")


class LockedBy(WriteRefused):
    """The PV's resource is locked by someone else."""

    def __init__(self, pv: str, resource: str, owner: str, until: float | None, job: int | None = None) -> None:
        self.resource = resource
        self.owner = owner
        self.until = until
        self.job = job
        who = owner + (f" (job {job})" if job is not None else "")
        reason = f"resource {resource!r} is locked by {who}"
        if until is not None:
            reason += f" until {_utc(until)}"
        elif owner == "":
            reason = f"resource {resource!r} is lockable: take its lock before writing"
        super().__init__(pv, reason)


class WrongType(WriteRefused):
    """The value is not of the PV's type, or not acceptable for it (NaN, too long, bad state)."""

    def __init__(self, pv: str, reason: str, value: Any = None) -> None:
        self.value = value
        super().__init__(pv, reason)


class OutOfRange(WriteRefused):
    """The value is outside the PV's drive limits."""

    def __init__(self, pv: str, value: Any, low: float | None, high: float | None) -> None:
        self.value = value
        self.low = low
        self.high = high
        self.limit = (low, high)
        super().__init__(pv, f"{value!r} is outside the drive limits [{low}, {high}]")


class Interlocked(WriteRefused):
    """An interlock forbids writing the PV's resource."""

    def __init__(self, pv: str, interlock: str, detail: str = "") -> None:
        self.interlock = interlock
        extra = f": {detail}" if detail else ""
        super().__init__(pv, f"interlock {interlock!r} is tripped{extra}")


class DriverError(LabctlError):
    """The instrument side failed."""

    def __init__(self, instrument: str, message: str) -> None:
        self.instrument = instrument
        super().__init__(f"{instrument}: {message}")


class DriverFault(DriverError):
    """The instrument answered wrongly, or its link is down."""


class DriverTimeout(DriverError):
    """The instrument did not answer in time."""
