"""Value types shared by every layer: PV types, alarm words, readings, identities.

These are plain immutable records. Severity and status words follow EPICS
(``epicsAlarmSeverity`` / ``epicsAlarmCondition``) so the Channel Access adapter can
pass them through unchanged and the OPC UA adapter can map them to StatusCodes.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any


class PVType(enum.StrEnum):
    """The declared type of a process variable. Never inferred from a value."""

    FLOAT64 = "float64"
    INT = "int"
    BOOL = "bool"
    ENUM = "enum"
    STRING = "string"
    FLOAT64_ARRAY = "float64[]"


class Severity(enum.IntEnum):
    """EPICS alarm severity, ordered so that ``max()`` gives the worst."""

    NO_ALARM = 0
    MINOR = 1
    MAJOR = 2
    INVALID = 3


class Status(enum.IntEnum):
    """EPICS alarm status (why a severity was raised); numbers match ``epicsAlarmCondition``."""

    NO_ALARM = 0
    READ = 1
    WRITE = 2
    HIHI = 3
    HIGH = 4
    LOLO = 5
    LOW = 6
    STATE = 7
    COS = 8
    COMM = 9
    TIMEOUT = 10
    HWLIMIT = 11
    CALC = 12
    SCAN = 13
    LINK = 14
    SOFT = 15
    BAD_SUB = 16
    UDF = 17
    DISABLE = 18
    SIMM = 19
    READ_ACCESS = 20
    WRITE_ACCESS = 21


class EventMask(enum.IntFlag):
    """Why an update was posted, as EPICS ``DBE_*`` bits.

    ``VALUE`` means the change passed the monitor deadband, ``LOG`` the archive
    deadband, ``ALARM`` that severity or status changed, ``PROPERTY`` that metadata
    changed. A subscriber asks for a mask and receives the updates that share a bit.
    """

    NONE = 0
    VALUE = 1
    LOG = 2
    ALARM = 4
    PROPERTY = 8
    ALL = VALUE | LOG | ALARM | PROPERTY


@dataclass(frozen=True, slots=True)
class Reading:
    """One immutable sample of a PV: value, source timestamp (UNIX seconds), alarm state."""

    value: Any
    timestamp: float
    severity: Severity = Severity.NO_ALARM
    status: Status = Status.NO_ALARM

    @property
    def valid(self) -> bool:
        """True unless the reading is INVALID (its value must not be trusted)."""
        return self.severity is not Severity.INVALID

    def __eq__(self, other: object) -> bool:  # arrays and NaN compare sensibly
        if not isinstance(other, Reading):
            return NotImplemented
        return (
            self.timestamp == other.timestamp
            and self.severity == other.severity
            and self.status == other.status
            and values_equal(self.value, other.value)
        )

    __hash__ = None  # type: ignore[assignment]


def values_equal(a: Any, b: Any) -> bool:
    """Equality for PV values: element-wise for arrays, NaN equal to NaN."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b, strict=False))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


@dataclass(frozen=True, slots=True)
class Update:
    """What a subscriber receives: a PV name, its new reading and why it was posted."""

    name: str
    reading: Reading
    mask: EventMask


@dataclass(frozen=True, slots=True)
class Identity:
    """Who asks: user, roles, protocol and host.

    OPC UA users are authenticated; Channel Access users and hosts are self-reported by
    the client, so the CA adapter maps them to roles through explicit access rules.

    ``internal`` marks the server's own actors (the server, an interlock, a job run on
    behalf of nobody). Only code sets it (:func:`internal_identity`): no site-file role
    or user, no CA access rule and no client can name or be granted it, so authority
    that bypasses roles and locks is never a matter of a name. The names internal
    actors go by (:data:`RESERVED_NAMES`) are refused as role and user names in site files.
    """

    user: str
    roles: frozenset[str] = field(default_factory=frozenset)
    protocol: str = "internal"
    host: str = ""
    internal: bool = field(default=False, kw_only=True)
    """The server's own actor (set by code only): the policy allows it every action, the arbiter every write."""
    client: str = field(default="", kw_only=True)
    """The session acting (set by the adapter): an OPC UA session ``opcua:session-<n>@<host>``, a CA
    circuit ``ca:<user>@<host>/<ip>:<port>``, a job ``job:<id>``. A lease belongs to the client that
    took it: another client of the same user writes under it only when handed its token."""

    def __str__(self) -> str:
        where = f"@{self.host}" if self.host else ""
        return f"{self.user}{where} ({self.protocol})"


#: The user name every internal actor acts under (its ``host`` says which actor: ``interlock:mxc_warm``).
INTERNAL_USER = "labctl"

#: Names no site-file role or user may take: the internal actors' own, and words that read like them.
RESERVED_NAMES: frozenset[str] = frozenset({INTERNAL_USER, "system", "internal"})


def internal_identity(actor: str = "") -> Identity:
    """The identity of one of the server's own actors (``interlock:<name>``, ``job:<id>``; empty: the server itself)."""
    return Identity(user=INTERNAL_USER, protocol="internal", host=actor, internal=True, client=actor)


def reserved(name: str) -> bool:
    """Whether a role or user name is reserved for internal actors (case-insensitive)."""
    return name.lower() in RESERVED_NAMES


#: The server itself (start-up values, tasks run on behalf of nobody).
SYSTEM = internal_identity()
