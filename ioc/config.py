"""The site file: one YAML document that describes a whole labctl site.

Theory of operation: the YAML is composed (so every key keeps its line and column),
converted to Python data with the safe loader, and validated into frozen pydantic models
that forbid unknown keys. Cross-references (a PV's resource, a derived PV's inputs, a
role named by a user) are checked after the per-field validation. Every problem found
becomes one line ``site.yaml:14:7 instruments[0].pvs[2].unit: expected a string, got 12``
and all of them are raised together in one :class:`~ioc.errors.ConfigError`.

A top-level PV entry with ``range`` stands for a numbered family of PVs (``name:
"DAQ:CH{n:05d}"``, ``range: {n: [0, 99999]}``), as EPICS substitution files write large
databases: it is validated once, every name it makes is checked, and it is expanded on
demand (:meth:`SiteConfig.iter_pvs`, :meth:`PVConfig.instances`), so a site of 100 000
channels is a few lines that read in a fraction of a second and hold no per-PV model.

Layers above read these models; nothing here touches an instrument or a socket.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import re
import string
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ioc.errors import ConfigError
from ioc.types import PVType
from ioc.yamlpos import at_key, dotted, key_positions

PV_NAME = re.compile(r"^[A-Za-z0-9_\-\[\]<>;]+(:[A-Za-z0-9_\-\[\]<>;]+)*$")
IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
PASSWORD_HASH = re.compile(r"^scrypt\$\d+\$\d+\$\d+\$[0-9a-f]{32}\$[0-9a-f]{64}$")

#: Roles every site has unless it redefines them.
DEFAULT_ROLES: dict[str, dict[str, Any]] = {
    "viewer": {"description": "reads everything, writes nothing"},
    "operator": {"description": "writes the apparatus, acknowledges alarms", "write": ["*"], "acknowledge": True},
    "expert": {
        "description": "an operator who may also shelve alarms and reset interlocks",
        "write": ["*"],
        "acknowledge": True,
        "shelve": True,
    },
    "admin": {
        "description": "an expert who may also break locks and cancel anyone's jobs",
        "write": ["*"],
        "acknowledge": True,
        "shelve": True,
        "admin": True,
    },
}


class Model(BaseModel):
    """Base of all config models: frozen, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


Name = Annotated[str, Field(pattern=IDENT.pattern, description="an identifier")]
PositiveSeconds = Annotated[float, Field(gt=0)]


class AlarmConfig(Model):
    """Alarm limits of a numeric PV, EPICS-style, with hysteresis."""

    lolo: float | None = None
    """Below this: MAJOR/LOLO."""
    low: float | None = None
    """Below this: MINOR/LOW."""
    high: float | None = None
    """Above this: MINOR/HIGH."""
    hihi: float | None = None
    """Above this: MAJOR/HIHI."""
    hysteresis: float = Field(0.0, ge=0)
    """An alarm clears only when the value is back inside its limit by this much."""
    delay_s: float = Field(0.0, ge=0)
    """A limit must be exceeded for this long before the alarm is raised."""
    latch: bool = False
    """The alarm stays until acknowledged, even after the value recovers."""
    guidance: str = ""
    """Text for the operator: what this alarm means and what to do."""

    @model_validator(mode="after")
    def _ordered(self) -> AlarmConfig:
        limits = [(k, getattr(self, k)) for k in ("lolo", "low", "high", "hihi")]
        given = [(k, v) for k, v in limits if v is not None]
        for (k1, v1), (k2, v2) in zip(given, given[1:], strict=False):
            if v1 > v2:
                raise ValueError(f"alarm limits must be ordered lolo <= low <= high <= hihi, but {k1}={v1} > {k2}={v2}")
        return self


class DeadbandConfig(Model):
    """Deadbands: a change smaller than these is not posted to monitors / the archive."""

    monitor: float = Field(0.0, ge=0)
    """Monitor deadband (EPICS MDEL): 0 posts every change."""
    archive: float = Field(0.0, ge=0)
    """Archive deadband (EPICS ADEL): 0 archives every change."""


class PVConfig(Model):
    """One process variable: name, explicit type, metadata, and where its value comes from.

    With ``range``, one entry declares a numbered family of PVs (see :meth:`expand`).
    """

    name: str
    """EPICS-style name: colon-separated, upper case by convention (``CRYO:MXC:TEMP``).
    With ``range``, a template: ``{n}`` / ``{n:05d}`` is replaced by each number of ``n``."""
    range: dict[str, tuple[int, int]] | None = None
    """Numbered PVs from one entry, like an EPICS substitution file: variable -> ``[first,
    last]`` (both included). Several variables give every combination, the first one
    outermost. ``{var}`` (Python format spec allowed) is replaced in ``name``,
    ``description`` and the PV names of ``inputs``."""
    type: PVType
    """float64 | int | bool | enum | string | float64[] -- never inferred from a value."""
    description: str = ""
    unit: str = ""
    precision: int = Field(3, ge=0, le=17)
    display: tuple[float, float] | None = None
    """Display range [low, high] (EPICS LOPR/HOPR)."""
    drive: tuple[float, float] | None = None
    """Drive limits [low, high]: writes outside are refused (EPICS DRVL/DRVH)."""
    alarm: AlarmConfig | None = None
    deadband: DeadbandConfig = DeadbandConfig()
    writable: bool = False
    resource: str | None = None
    """The resource this PV belongs to (defaults to its instrument's resource)."""
    states: tuple[str, ...] = ()
    """Enum state strings, index 0 first (enum PVs only)."""
    length: int | None = Field(None, gt=0)
    """Exact length of a float64[] PV, or the longest string a string PV takes."""
    allow_nan: bool = False
    """Accept NaN in writes (float64 / float64[] only)."""
    initial: Any = None
    """Initial value of a soft PV (one with no instrument and no expression)."""
    scan_s: PositiveSeconds | None = None
    """Scan period of an instrument PV (defaults to the instrument's)."""
    channel: str | None = None
    """Driver channel this PV reads and writes (driver-specific; defaults to the PV name)."""
    read: str | None = None
    """Generic SCPI driver: the query that reads this PV."""
    write: str | None = None
    """Generic SCPI driver: the command that writes it; ``{value}`` is replaced."""
    parse: str | None = None
    """Generic SCPI driver: how to turn the reply into a value (see drivers.scpi)."""
    expr: str | None = None
    """Derived PV: an expression over ``inputs`` (see ioc.expr); makes the PV read-only."""
    inputs: dict[str, str] = {}
    """Derived PV: expression variable -> PV name."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if "{" not in v and not PV_NAME.match(v):
            raise ValueError(f"expected a PV name (colon-separated words of A-Z a-z 0-9 _ - [ ] < > ;), got {v!r}")
        return v

    @field_validator("states")
    @classmethod
    def _states_unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError("enum states must be unique")
        if any(len(s) > 25 for s in v):
            raise ValueError("enum state strings are at most 25 characters (the Channel Access limit)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PVConfig:
        t = self.type
        numeric = t in (PVType.FLOAT64, PVType.INT, PVType.FLOAT64_ARRAY)
        if t is PVType.ENUM and not self.states:
            raise ValueError("an enum PV needs 'states'")
        if t is not PVType.ENUM and self.states:
            raise ValueError(f"'states' is only for enum PVs, not {t.value}")
        if self.alarm is not None and not numeric:
            raise ValueError(f"alarm limits need a numeric PV, not {t.value}")
        if self.drive is not None and not numeric:
            raise ValueError(f"drive limits need a numeric PV, not {t.value}")
        for key in ("drive", "display"):
            lim = getattr(self, key)
            if lim is not None and (not all(math.isfinite(x) for x in lim) or lim[0] > lim[1]):
                raise ValueError(f"{key} must be [low, high] with low <= high, got {list(lim)}")
        if self.allow_nan and t not in (PVType.FLOAT64, PVType.FLOAT64_ARRAY):
            raise ValueError("allow_nan is only for float64 and float64[] PVs")
        if self.length is not None and t not in (PVType.STRING, PVType.FLOAT64_ARRAY):
            raise ValueError("length is only for string and float64[] PVs")
        if self.expr is not None:
            if self.writable:
                raise ValueError("a derived PV (with 'expr') cannot be writable")
            if not self.inputs:
                raise ValueError("a derived PV needs 'inputs' (expression variable -> PV name)")
        elif self.inputs:
            raise ValueError("'inputs' is only for derived PVs (with 'expr')")
        if self.range is not None:
            _check_range(self)
        elif "{" in self.name:
            raise ValueError(f"{{...}} in the PV name {self.name!r} needs 'range' (the numbers to put there)")
        return self

    @property
    def derived(self) -> bool:
        """True for a PV computed from other PVs."""
        return self.expr is not None

    @property
    def count(self) -> int:
        """How many PVs this entry declares (1 without ``range``)."""
        return math.prod(last - first + 1 for first, last in self.range.values()) if self.range else 1

    def expand(self) -> Iterator[PVConfig]:
        """The PVs this entry declares: itself, or one per combination of its ``range`` numbers.

        The copies are made on demand (a large range is never held in memory at once):
        each has the numbers put into ``name``, ``description`` and the input PV names,
        and no ``range``.
        """
        if self.range is None:
            yield self
            return
        for fields in self.instances():
            yield self.model_copy(update={**fields, "range": None})

    def instances(self) -> Iterator[dict[str, Any]]:
        """Per PV this entry declares, the fields in which it differs from the entry.

        ``name`` always, ``description`` and ``inputs`` when they use the numbers; without
        ``range``, one empty dict. Cheaper than :meth:`expand` where only these are read.
        """
        if self.range is None:
            yield {}
            return
        name, description, inputs = self.name, self.description, self.inputs
        numbered_description = "{" in description
        for numbers in _combinations(self.range):
            fields: dict[str, Any] = {"name": name.format_map(numbers)}
            if numbered_description:
                fields["description"] = description.format_map(numbers)
            if inputs:
                fields["inputs"] = {var: src.format_map(numbers) for var, src in inputs.items()}
            yield fields


# ---- numbered PVs (``range``) -----------------------------------------------------------

#: The most PVs one ``range`` entry may declare (a typo should not build a billion).
MAX_RANGE_PVS = 1_000_000
_FORMATTER = string.Formatter()


def _combinations(ranges: Mapping[str, tuple[int, int]]) -> Iterator[dict[str, int]]:
    """``{var: number}`` for every combination, the first variable outermost."""
    keys = list(ranges)
    if len(keys) == 1:
        (key,), ((first, last),) = keys, ranges.values()
        for n in range(first, last + 1):
            yield {key: n}
        return
    for numbers in itertools.product(*(range(first, last + 1) for first, last in ranges.values())):
        yield dict(zip(keys, numbers, strict=True))


def _template_fields(text: str, what: str) -> set[str]:
    """The ``{var}`` fields of a template text; ValueError for anything but plain variables."""
    try:
        parsed = list(_FORMATTER.parse(text))
    except ValueError as e:
        raise ValueError(f"{what} {text!r}: {e} (write {{var}} or {{var:05d}})") from None
    out = set()
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not IDENT.match(field) or "-" in field or conversion or "{" in (spec or ""):
            raise ValueError(f"{what} {text!r}: {{{field}{'!' + conversion if conversion else ''}"
                             f"{':' + spec if spec else ''}}} is not a range variable (write {{var}} or {{var:05d}})")
        out.add(field)
    return out


def _check_range(pv: PVConfig) -> None:
    """A numbered entry is complete and every PV name it makes is valid (ValueError if not)."""
    assert pv.range is not None
    if not pv.range:
        raise ValueError("'range' needs at least one variable: {n: [first, last]}")
    for var, (first, last) in pv.range.items():
        if not IDENT.match(var) or "-" in var:
            raise ValueError(f"range variable {var!r} is not a valid name (letters, digits, _)")
        if first > last:
            raise ValueError(f"range {var}: [first, last] with first <= last, got [{first}, {last}]")
    if pv.count > MAX_RANGE_PVS:
        raise ValueError(f"range declares {pv.count} PVs; at most {MAX_RANGE_PVS} per entry")
    texts = [("name", pv.name), ("description", pv.description), *((f"inputs.{k}", v) for k, v in pv.inputs.items())]
    for what, text in texts:
        unknown = sorted(_template_fields(text, what) - set(pv.range))
        if unknown:
            raise ValueError(f"{what} {text!r} uses {unknown}, not a range variable; range: {sorted(pv.range)}")
    used = _template_fields(pv.name, "name")
    unused = [v for v in pv.range if v not in used]
    if unused:
        raise ValueError(f"the name {pv.name!r} must use every range variable (else the names repeat); unused: {unused}")
    for numbers in _combinations(pv.range):
        try:
            name = pv.name.format_map(numbers)
        except ValueError as e:
            raise ValueError(f"name {pv.name!r}: {e}") from None
        if not PV_NAME.match(name):
            raise ValueError(f"name {pv.name!r} makes {name!r} for {numbers}, not a valid PV name")


class InstrumentConfig(Model):
    """An instrument: its driver, how to reach it, and the PVs it serves."""

    name: Name
    driver: str
    """Driver name, e.g. lakeshore336, lakeshore372, keithley2400, tpg, scpi."""
    description: str = ""
    resource: str | None = None
    """VISA resource string (``TCPIP::10.0.0.5::7777::SOCKET``, ``GPIB0::12::INSTR``...)."""
    visa_library: str | None = None
    """pyvisa library: ``@py``, ``@ivi``, or ``@sim`` for pyvisa-sim (the driver's shipped definition)."""
    sim_file: str | None = None
    """pyvisa-sim definition file to use instead of the driver's own (with ``visa_library: '@sim'``)."""
    simulation: str | None = None
    """Name of an entry under ``simulations``: the instrument talks to that plant instead of VISA."""
    scan_s: PositiveSeconds = 1.0
    """Default scan period of its PVs."""
    timeout_s: PositiveSeconds = 2.0
    """How long one instrument call may take before the instrument counts as not answering."""
    reconnect_min_s: PositiveSeconds = 0.5
    """First wait before reconnecting a lost instrument; doubles on each failure..."""
    reconnect_max_s: PositiveSeconds = 30.0
    """...up to this."""
    lock_resource: str | None = None
    """The resource its PVs belong to unless a PV says otherwise (defaults to the instrument name)."""
    options: dict[str, Any] = {}
    """Driver-specific options (see each driver's documentation)."""
    pvs: tuple[PVConfig, ...] = ()

    @model_validator(mode="after")
    def _source(self) -> InstrumentConfig:
        if self.simulation is None and self.resource is None:
            raise ValueError("an instrument needs either 'resource' (VISA) or 'simulation'")
        if self.simulation is not None and (self.resource is not None or self.visa_library is not None):
            raise ValueError("'simulation' excludes 'resource' and 'visa_library'")
        for pv in self.pvs:
            if pv.derived:
                raise ValueError(f"PV {pv.name}: derived PVs go under the top-level 'pvs', not an instrument")
            if pv.range is not None:
                raise ValueError(f"PV {pv.name}: 'range' is for the top-level 'pvs'; list an instrument's PVs one by one")
        return self

    @property
    def default_resource(self) -> str:
        """The resource of a PV of this instrument that names none."""
        return self.lock_resource or self.name


class SimulationConfig(Model):
    """A simulated plant that simulated instruments talk to."""

    model: Literal["cryostat"]
    options: dict[str, Any] = {}


class ResourceConfig(Model):
    """A named group of PVs that is locked and written as one."""

    name: Name
    description: str = ""
    lockable: bool = True
    """Only the lock holder may write the PVs of a lockable resource."""
    max_lease_s: PositiveSeconds = 3600.0
    """The longest lease one request may take."""


class RoleConfig(Model):
    """What a role may do."""

    description: str = ""
    write: tuple[str, ...] = ()
    """Resource names or glob patterns this role may write (``*`` for all)."""
    acknowledge: bool = False
    """May acknowledge alarms."""
    shelve: bool = False
    """May shelve alarms and reset interlocks."""
    admin: bool = False
    """May break locks, cancel anyone's jobs, and do everything else."""

    def may_write(self, resource: str) -> bool:
        """Whether this role grants writing PVs of ``resource``."""
        return self.admin or any(fnmatch.fnmatchcase(resource, pat) for pat in self.write)


class UserConfig(Model):
    """A user account. Passwords are stored only as salted hashes (``labctl passwd``)."""

    name: Name
    roles: tuple[str, ...] = ("viewer",)
    password_hash: str | None = Field(None, pattern=PASSWORD_HASH.pattern)
    """``scrypt$N$r$p$salt$hash`` as printed by ``labctl passwd``."""
    certificate: str | None = None
    """Path of the user's X.509 certificate (PEM or DER) for certificate login."""
    description: str = ""


class OpcUaConfig(Model):
    """The OPC UA endpoint."""

    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(4840, ge=0, le=65535)
    """TCP port; 0 picks a free one."""
    security: tuple[Literal["None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"], ...] = (
        "None",
        "Basic256Sha256_Sign",
        "Basic256Sha256_SignAndEncrypt",
    )
    """Security policies offered. Drop ``None`` outside a localhost demo."""
    anonymous: bool = True
    """Allow anonymous (read-only) sessions."""


class CAAccessRule(Model):
    """Grants roles to Channel Access clients whose self-reported user and host match."""

    users: tuple[str, ...] = ("*",)
    """User group names or user names (globs allowed)."""
    hosts: tuple[str, ...] = ("*",)
    """Host group names or host names/addresses (globs allowed)."""
    roles: tuple[str, ...]
    """Roles granted to matching clients."""


class CAAccessConfig(Model):
    """Channel Access security, in the spirit of an EPICS ACF. No rule matched: read-only."""

    user_groups: dict[str, tuple[str, ...]] = {}
    host_groups: dict[str, tuple[str, ...]] = {}
    rules: tuple[CAAccessRule, ...] = ()
    check_client_ip: bool = False
    """Match ``hosts`` against the client's IP address, which a client cannot forge on a TCP
    connection, instead of the host name it reports (EPICS ``asCheckClientIP``)."""


class CAConfig(Model):
    """The Channel Access server. ``EPICS_CAS_*`` environment variables apply unless set here."""

    enabled: bool = True
    prefix: str = ""
    """Prepended to every PV name on Channel Access."""
    interfaces: tuple[str, ...] | None = None
    """Addresses to bind (default: ``EPICS_CAS_INTF_ADDR_LIST`` or all)."""
    port: int | None = Field(None, ge=0, le=65535)
    """TCP/UDP server port (default: ``EPICS_CAS_SERVER_PORT`` or 5064)."""
    beacon_port: int | None = Field(None, ge=0, le=65535)
    """Beacon port (default: ``EPICS_CAS_BEACON_PORT`` or 5065)."""
    access: CAAccessConfig = CAAccessConfig()


class HistorianConfig(Model):
    """Where and how samples are archived."""

    enabled: bool = True
    url: str = "sqlite:///{state_dir}/history.sqlite"
    """SQLAlchemy URL: ``sqlite:///...`` or ``postgresql+psycopg://...``; ``{state_dir}`` is replaced."""
    batch_size: int = Field(5000, gt=0)
    batch_age_s: PositiveSeconds = 0.5
    spool_max_mb: float = Field(512.0, gt=0)
    retention_days: float | None = Field(None, gt=0)


class ServerConfig(Model):
    """Process-level settings."""

    state_dir: str = "./var"
    """Where the server keeps its state (history, spool, certificates), relative to the working directory."""
    opcua: OpcUaConfig = OpcUaConfig()
    ca: CAConfig = CAConfig()


class TableConfig(Model):
    """A calibration table for ``interp(x, 'table')``: points sorted by x."""

    points: tuple[tuple[float, float], ...] = ()
    file: str | None = None
    """CSV file of x,y rows (relative to the site file) instead of ``points``."""

    @model_validator(mode="after")
    def _one_source(self) -> TableConfig:
        if bool(self.points) == bool(self.file):
            raise ValueError("a table needs exactly one of 'points' or 'file'")
        return self


class ParamConfig(Model):
    """A procedure parameter."""

    type: Literal["float64", "int", "bool", "string", "float64[]"] = "float64"
    default: Any = None
    """Value when the submitter gives none (no default: the parameter is required)."""
    description: str = ""
    min: float | None = None
    max: float | None = None


class SetStep(Model):
    """Write a PV. ``value`` is a number/string/list, or an expression over parameters in ``=...``."""

    pv: str
    value: Any


class RampStep(Model):
    """Move a PV to a target at a rate, writing every ``step_s``."""

    pv: str
    to: Any
    """Target (a value or ``=expression``)."""
    rate: float = Field(gt=0)
    """Units per second."""
    step_s: PositiveSeconds = 1.0


class WaitStep(Model):
    """Wait until a condition over PVs holds (fails the job after ``timeout_s``)."""

    until: str
    """Expression over ``inputs`` and the parameters, e.g. ``t < sp * 1.05``."""
    inputs: dict[str, str] = {}
    """Expression variable -> PV name."""
    timeout_s: PositiveSeconds
    hold_s: float = Field(0.0, ge=0)
    """The condition must hold this long without interruption."""


class ReadStep(Model):
    """Read PVs into the job's results."""

    pvs: tuple[str, ...]
    label: str = ""
    """Tag for the results (may use ``{param}`` placeholders)."""


class RepeatStep(Model):
    """Run ``steps`` once per value in ``values``, binding each to ``var``."""

    var: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    values: Any
    """A list, or ``=expression`` naming a float64[] parameter."""
    steps: tuple[Step, ...]


class Step(Model):
    """One step: exactly one of the keys."""

    set: SetStep | None = None
    ramp: RampStep | None = None
    wait: WaitStep | None = None
    read: ReadStep | None = None
    sleep: float | None = Field(None, ge=0)
    """Seconds to wait."""
    repeat: RepeatStep | None = None
    log: str | None = None
    """A line for the job's log (``{param}`` placeholders allowed)."""

    @model_validator(mode="after")
    def _one(self) -> Step:
        given = [k for k in ("set", "ramp", "wait", "read", "sleep", "repeat", "log") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a step has exactly one of set, ramp, wait, read, sleep, repeat, log; got {given or 'none'}")
        return self

    @property
    def kind(self) -> str:
        """The step's key."""
        return next(k for k in ("set", "ramp", "wait", "read", "sleep", "repeat", "log") if getattr(self, k) is not None)


RepeatStep.model_rebuild()


class ProcedureConfig(Model):
    """A procedure users submit as jobs: parameters, the resources it locks, its steps."""

    description: str = ""
    resources: tuple[str, ...] = ()
    """Resources the job must hold (locked for its whole run)."""
    params: dict[str, ParamConfig] = {}
    steps: tuple[Step, ...]
    roles: tuple[str, ...] = ("operator", "expert", "admin")
    """Roles allowed to submit it."""


class SafeValue(Model):
    """Drive a PV to a value when an interlock trips."""

    pv: str
    value: Any


class InterlockActions(Model):
    """What a tripped interlock does. Fixed kinds, configured as data: nothing else can run."""

    hold_queue: bool = False
    """Hold the job queue: running jobs pause at their next step, queued ones wait."""
    refuse_writes: tuple[str, ...] = ()
    """Resources whose PVs nobody may write while tripped."""
    set: tuple[SafeValue, ...] = ()
    """PVs driven to a safe value on trip (heater off)."""


class InterlockConfig(Model):
    """A rule that watches PVs and protects the apparatus.

    Either the *level* form -- ``pv`` with ``warn`` / ``trip`` / ``resume`` thresholds in
    ``direction`` -- or the *condition* form -- an expression over ``inputs`` in
    ``condition`` (and optionally ``clear``).
    """

    name: Name
    description: str = ""
    pv: str | None = None
    direction: Literal["above", "below"] = "above"
    warn: float | None = None
    """Level form: beyond this, warn (no action)."""
    trip: float | None = None
    """Level form: beyond this for ``for_s``, trip."""
    resume: float | None = None
    """Level form: back beyond this (on the safe side) for ``clear_for_s``, release (default: ``trip``)."""
    condition: str | None = None
    """Condition form: trip while this expression over ``inputs`` is true for ``for_s``."""
    warn_condition: str | None = None
    clear: str | None = None
    """Condition form: release when this is true for ``clear_for_s`` (default: ``not condition``)."""
    inputs: dict[str, str] = {}
    invalid_trips: bool = True
    """An INVALID input counts as the trip condition (a dead sensor is not a safe sensor)."""
    for_s: float = Field(0.0, ge=0)
    """Grace period: the trip condition must hold this long."""
    clear_for_s: float = Field(0.0, ge=0)
    """The release condition must hold this long."""
    reset: Literal["auto", "manual"] = "auto"
    """``manual``: after clearing, an authorised person must reset it."""
    reset_roles: tuple[str, ...] = ("expert", "admin")
    actions: InterlockActions = InterlockActions()

    @model_validator(mode="after")
    def _form(self) -> InterlockConfig:
        level = self.pv is not None
        cond = self.condition is not None
        if level == cond:
            raise ValueError("an interlock needs either 'pv' with 'trip' (level form) or 'condition' with 'inputs'")
        if level:
            if self.trip is None:
                raise ValueError("a level interlock needs 'trip'")
            sign = 1 if self.direction == "above" else -1
            if self.warn is not None and sign * (self.warn - self.trip) > 0:
                raise ValueError(f"'warn' must come before 'trip' when rising {self.direction} ({self.warn} vs {self.trip})")
            if self.resume is not None and sign * (self.resume - self.trip) > 0:
                raise ValueError(f"'resume' must be on the safe side of 'trip' ({self.resume} vs {self.trip})")
            if self.inputs or self.clear or self.warn_condition:
                raise ValueError("'inputs', 'clear' and 'warn_condition' belong to the condition form")
        else:
            if not self.inputs:
                raise ValueError("a condition interlock needs 'inputs' (expression variable -> PV name)")
            if self.warn is not None or self.trip is not None or self.resume is not None:
                raise ValueError("'warn', 'trip' and 'resume' belong to the level form (with 'pv')")
        return self

    @property
    def watched(self) -> list[str]:
        """The PVs the rule reads."""
        return [self.pv] if self.pv else list(self.inputs.values())


class WebhookConfig(Model):
    """POST each alarm notification as JSON to a URL."""

    url: str = Field(pattern=r"^https?://")
    min_severity: Literal["MINOR", "MAJOR", "INVALID"] = "MAJOR"
    timeout_s: PositiveSeconds = 5.0


class EmailConfig(Model):
    """Send each alarm notification by e-mail (SMTP)."""

    smtp_host: str
    smtp_port: int = Field(25, gt=0, le=65535)
    sender: str
    to: tuple[str, ...] = Field(min_length=1)
    starttls: bool = False
    username: str | None = None
    password_env: str | None = None
    """Name of the environment variable holding the SMTP password (never the password itself)."""
    min_severity: Literal["MINOR", "MAJOR", "INVALID"] = "MAJOR"


class NotificationsConfig(Model):
    """Where alarm notifications go (the log always), and how often at most."""

    burst: int = Field(5, gt=0)
    """At most this many notifications per alarm source..."""
    window_s: PositiveSeconds = 60.0
    """...within this window."""
    global_burst: int = Field(50, gt=0)
    """At most this many notifications in all per window."""
    webhooks: tuple[WebhookConfig, ...] = ()
    email: EmailConfig | None = None


class SiteConfig(Model):
    """The whole site."""

    site: Name
    """Site name: the OPC UA namespace is ``urn:labctl:<site>``."""
    description: str = ""
    server: ServerConfig = ServerConfig()
    historian: HistorianConfig = HistorianConfig()
    roles: dict[str, RoleConfig] = {}
    """Roles beyond (or redefining) viewer, operator, expert, admin."""
    users: tuple[UserConfig, ...] = ()
    resources: tuple[ResourceConfig, ...] = ()
    tables: dict[str, TableConfig] = {}
    simulations: dict[str, SimulationConfig] = {}
    instruments: tuple[InstrumentConfig, ...] = ()
    pvs: tuple[PVConfig, ...] = ()
    """PVs of no instrument: derived PVs (``expr``) and soft PVs (memory, with ``initial``).
    An entry with ``range`` stands for many PVs: read them through :meth:`iter_pvs`."""
    procedures: dict[str, ProcedureConfig] = {}
    """Procedures users submit as jobs."""
    interlocks: tuple[InterlockConfig, ...] = ()
    """Rules that watch PVs and protect the apparatus."""
    notifications: NotificationsConfig = NotificationsConfig()
    """Alarm notification sinks and rate limits."""

    # ---- derived views -------------------------------------------------------------

    @property
    def all_roles(self) -> dict[str, RoleConfig]:
        """Default roles overlaid with the site's own."""
        merged = {k: RoleConfig(**v) for k, v in DEFAULT_ROLES.items()}
        merged.update(self.roles)
        return merged

    def iter_pvs(self) -> Iterator[tuple[InstrumentConfig | None, PVConfig]]:
        """Every PV with its instrument (None for soft and derived PVs)."""
        for inst in self.instruments:
            for pv in inst.pvs:
                yield inst, pv
        for entry in self.pvs:
            for pv in entry.expand():
                yield None, pv

    def resource_of(self, inst: InstrumentConfig | None, pv: PVConfig) -> str:
        """The resource a PV belongs to."""
        if pv.resource:
            return pv.resource
        return inst.default_resource if inst is not None else "soft"

    def state_path(self) -> Path:
        """The state directory."""
        return Path(self.server.state_dir)

    # ---- cross-reference checks ----------------------------------------------------

    def cross_check(self) -> list[tuple[tuple[Any, ...], str]]:
        """Problems that span several keys, as (key path, message)."""
        problems: list[tuple[tuple[Any, ...], str]] = []
        declared = {r.name for r in self.resources}
        implicit = {inst.default_resource for inst in self.instruments} | {"soft"}
        seen: dict[str, tuple[Any, ...]] = {}
        names = [i.name for i in self.instruments]
        for i, name in enumerate(names):
            if names.index(name) != i:
                problems.append((("instruments", i, "name"), f"duplicate instrument name {name!r}"))
        rnames = [r.name for r in self.resources]
        for i, name in enumerate(rnames):
            if rnames.index(name) != i:
                problems.append((("resources", i, "name"), f"duplicate resource name {name!r}"))
        for ii, inst in enumerate(self.instruments):
            if inst.simulation is not None and inst.simulation not in self.simulations:
                problems.append(
                    (("instruments", ii, "simulation"), f"unknown simulation {inst.simulation!r}; declared: {sorted(self.simulations)}")
                )
            for pi, pv in enumerate(inst.pvs):
                self._check_pv(pv, (pv.name,), ("instruments", ii, "pvs", pi), seen, declared | implicit, problems)
        for pi, entry in enumerate(self.pvs):
            path = ("pvs", pi)
            names = (fields["name"] for fields in entry.instances()) if entry.range else (entry.name,)
            self._check_pv(entry, names, path, seen, declared | implicit, problems)
            if entry.expr is None and entry.writable is False and entry.initial is None:
                problems.append((path, "a soft PV needs 'initial' or 'writable: true' (or 'expr' for a derived PV)"))
        for pi, entry in enumerate(self.pvs):
            for var in entry.inputs:
                if not IDENT.match(var) or "-" in var:
                    problems.append((("pvs", pi, "inputs", var), f"{var!r} is not a valid expression variable name"))
            unknown: dict[str, list[str]] = {}
            for fields in entry.instances() if entry.inputs else ():
                for var, src in fields.get("inputs", entry.inputs).items():
                    if src not in seen:
                        unknown.setdefault(var, []).append(src)
            for var, missing in unknown.items():  # one problem per input, however many numbers
                more = f" ({len(missing) - 1} more of this range are unknown too)" if len(missing) > 1 else ""
                problems.append((("pvs", pi, "inputs", var), f"unknown PV {missing[0]!r}{more}"))
        from ioc.procedure import check_procedure  # late: procedure.py imports this module

        roles = self.all_roles
        for pname, proc in self.procedures.items():
            problems.extend(check_procedure(pname, proc, set(seen)))
            for ri, res in enumerate(proc.resources):
                if res not in declared:
                    problems.append((("procedures", pname, "resources", ri), f"unknown resource {res!r}; declared: {sorted(declared)}"))
            for r in proc.roles:
                if r not in roles:
                    problems.append((("procedures", pname, "roles"), f"unknown role {r!r}; defined: {sorted(roles)}"))
        inames = [i.name for i in self.interlocks]
        for ii, ilk in enumerate(self.interlocks):
            path = ("interlocks", ii)
            if inames.index(ilk.name) != ii:
                problems.append((path + ("name",), f"duplicate interlock name {ilk.name!r}"))
            for pv in ilk.watched:
                if pv not in seen:
                    problems.append((path, f"unknown PV {pv!r}"))
            for si, sv in enumerate(ilk.actions.set):
                if sv.pv not in seen:
                    problems.append((path + ("actions", "set", si, "pv"), f"unknown PV {sv.pv!r}"))
            for ri, res in enumerate(ilk.actions.refuse_writes):
                if res not in declared | implicit:
                    problems.append((path + ("actions", "refuse_writes", ri), f"unknown resource {res!r}"))
            for r in ilk.reset_roles:
                if r not in roles:
                    problems.append((path + ("reset_roles",), f"unknown role {r!r}; defined: {sorted(roles)}"))
            from ioc.expr import Expression, ExpressionError

            for key in ("condition", "warn_condition", "clear"):
                src = getattr(ilk, key)
                if src is not None:
                    try:
                        Expression(src, list(ilk.inputs))
                    except ExpressionError as e:
                        problems.append((path + (key,), f"expression: {e}"))
        unames = [u.name for u in self.users]
        for ui, user in enumerate(self.users):
            if unames.index(user.name) != ui:
                problems.append((("users", ui, "name"), f"duplicate user name {user.name!r}"))
            for r in user.roles:
                if r not in roles:
                    problems.append((("users", ui, "roles"), f"unknown role {r!r}; defined: {sorted(roles)}"))
        for ri, rule in enumerate(self.server.ca.access.rules):
            for r in rule.roles:
                if r not in roles:
                    problems.append(
                        (("server", "ca", "access", "rules", ri, "roles"), f"unknown role {r!r}; defined: {sorted(roles)}")
                    )
        return problems

    @staticmethod
    def _check_pv(pv, names, path, seen, resources, problems) -> None:
        """The entry's resource is declared; each of its ``names`` is new."""
        taken = []
        for name in names:
            if name in seen:
                taken.append(name)
            else:
                seen[name] = path
        if taken:  # one problem per entry, however many numbers it has
            more = f"; {len(taken) - 1} more of its names are taken too" if len(taken) > 1 else ""
            problems.append((path + ("name",), f"duplicate PV name {taken[0]!r} (also at {dotted(seen[taken[0]])}){more}"))
        if pv.resource is not None and pv.resource not in resources:
            problems.append((path + ("resource",), f"unknown resource {pv.resource!r}; declared: {sorted(resources)}"))


# ---- loading ------------------------------------------------------------------------


class _LazyPositions(dict):
    """Key path -> (line, column), composed only when an error needs a position (a large site parses fast)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self._text: str | None = text

    def _load(self) -> None:
        if self._text is not None:
            node = yaml.compose(self._text, Loader=_PositionLoader)
            self._text = None
            if node is not None:
                key_positions(node, (), self)

    def __contains__(self, key: object) -> bool:
        self._load()
        return super().__contains__(key)

    def __getitem__(self, key: Any) -> tuple[int, int]:
        self._load()
        return super().__getitem__(key)


def _describe(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        return "unknown key (not part of the site file schema)"
    if kind == "missing":
        return "required key is missing"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind in ("enum", "literal_error"):
        return f"{msg}, got {got!r}"
    if got is not None and not isinstance(got, (dict, list)) and kind not in ("value_error", "assertion_error"):
        return f"{msg[0].lower() + msg[1:]}, got {got!r}"
    return msg[0].lower() + msg[1:]


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic inserts union member tags (e.g. 'tuple[float, float]') into loc; drop them.
    return tuple(p for p in loc if isinstance(p, int) or not any(c in str(p) for c in "[]|"))


def _yaml12_booleans(loader: type) -> type:
    loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    return loader


@_yaml12_booleans
class SiteLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The safe loader (libyaml's when present) with YAML 1.2 booleans: ``states: [OFF, ON]`` stays text."""


@_yaml12_booleans
class _PositionLoader(yaml.SafeLoader):
    """The same rules in pure Python, composing nodes with line and column (for error messages)."""


def parse_site(text: str, source: str = "<site>") -> SiteConfig:
    """Validate the YAML text of a site file; raise ConfigError listing every problem."""
    try:
        data = yaml.load(text, Loader=SiteLoader)  # noqa: S506 -- SiteLoader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(source, [f"{source}{where} not valid YAML: {e.problem or e}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError(source, [f"{source}: not valid YAML: {e}"]) from None
    positions = _LazyPositions(text)
    if not isinstance(data, dict):
        raise ConfigError(source, [f"{source}: expected a mapping of site keys at the top level, got {type(data).__name__}"])
    try:
        site = SiteConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = _clean_loc(err["loc"])
            lines.append(f"{at_key(source, loc, positions)}: {_describe(err)}")
        raise ConfigError(source, sorted(set(lines), key=lines.index)) from None
    problems = site.cross_check()
    if problems:
        raise ConfigError(source, [f"{at_key(source, p, positions)}: {m}" for p, m in problems])
    return site


def load_site(path: str | Path) -> SiteConfig:
    """Read and validate a site file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(p), [f"{p}: cannot read the site file: {e.strerror or e}"]) from None
    return parse_site(text, str(p))
