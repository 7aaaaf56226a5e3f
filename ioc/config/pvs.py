"""Process variables in the site file: type, metadata, alarm limits, deadbands, numbered PVs.

A top-level PV entry with ``range`` stands for a numbered family of PVs (``name:
"DAQ:CH{n:05d}"``, ``range: {n: [0, 99999]}``), as EPICS substitution files write large
databases: it is validated once, every name it makes is checked, and it is expanded on
demand (:meth:`~labctl.ioc.config.site.CoreSiteConfig.iter_pvs`, :meth:`PVConfig.instances`),
so a site of 100 000 channels is a few lines that read in a fraction of a second and hold
no per-PV model.
"""

from __future__ import annotations

import itertools
import math
import re
import string
from collections.abc import Iterator, Mapping
from typing import Any

from labctl.ioc.config.base import IDENT, Model, PositiveSeconds
from labctl.ioc.types import PVType
from pydantic import Field, field_validator, model_validator

PV_NAME = re.compile(r"^[A-Za-z0-9_\-\[\]<>;]+(:[A-Za-z0-9_\-\[\]<>;]+)*$")


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
    """Most elements a float64[] PV holds (EPICS NELM: a write of fewer leaves it holding that many),
    or the longest string a string PV takes (default 39, what DBR_STRING holds; longer ones are
    served over Channel Access as EPICS long strings)."""
    allow_nan: bool = False
    """Accept NaN in writes (float64 / float64[] only)."""
    autosave: bool = True
    """Save this PV's value and restore it at the next start (writable PVs: server-kept ones and
    instrument setpoints; see server.autosave). ``false`` for a value that must start afresh."""
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

