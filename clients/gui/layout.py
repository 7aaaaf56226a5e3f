"""Control-room layouts: which panels go where on the screen, described in YAML.

Theory of operation. A layout file is read by the same loader as a site file
(:func:`labctl.yamlmodel.parse_model`): the safe loader with YAML 1.2 booleans (a title
``ON`` or a label ``no`` stays text; only ``true``/``false`` are booleans), validated into
frozen pydantic models that forbid unknown keys. Each problem becomes one line
``wall.yaml:12:9 panels[2].pvs[1].color: ...`` and all of them are raised together in one
:class:`~labctl.ioc.errors.ConfigError`, which ``labctl`` prints before any window opens.

A layout is a grid of ``columns`` columns. Each panel takes ``colspan`` x ``rowspan``
cells, at ``row``/``col`` when both are given, otherwise at the first free place in
reading order (placed panels first, then the others in file order)::

    title: Cryostat wall
    columns: 3
    large: true                 # large-font control-room mode
    panels:
      - type: chart
        title: Temperatures
        pvs: ["CRYO:MXC:TEMP", "CRYO:STILL:TEMP", {pv: "CRYO:50K:TEMP", color: "#ff8800"}]
        span_s: 1800            # the live window, seconds
        log: true               # log axes (or per PV: {pv: ..., log: true})
        colspan: 2
      - {type: values, pvs: ["CRYO:MXC:TEMP", {pv: "CRYO:IVC:PRES", format: ".2e"}], columns: 2}
      - {type: locks}
      - {type: jobs}
      - {type: interlocks}

Panel types: ``chart`` (a strip chart; PVs with the same unit share an axis), ``values``
(big numbers with units and alarm colours), ``locks`` (resource locks), ``jobs`` (the
job queue) and ``interlocks``. The alarm banner sits above the grid unless
``banner: false``.

:func:`default_layout` builds a layout from what a server serves (its PVs' metadata and
current values) when no file is given: strip charts per instrument, a value panel, and
the lock, interlock and job tables. This module is pure: no Qt, no network.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from labctl.clients.values import Metadata
from labctl.ioc.types import PVType, Reading
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from labctl import yamlmodel

PV_NAME = re.compile(r"^[A-Za-z0-9_\-\[\]<>;]+(:[A-Za-z0-9_\-\[\]<>;]+)*$")
COLOR = re.compile(r"^(#[0-9a-fA-F]{6}|#[0-9a-fA-F]{3}|[a-z]+)$")
#: PVs the server keeps for its own state (alarm summary, locks, interlocks): shown by the banner and tables.
SYSTEM_PREFIXES = ("ALARM:", "ARB:", "ILK:")
#: Units whose quantities span decades: their axes are logarithmic in the default layout.
LOG_UNITS = frozenset({"mbar", "bar", "Pa", "hPa", "kPa", "Torr", "torr", "mTorr", "mtorr"})
PANEL_TYPES = ("chart", "values", "locks", "jobs", "interlocks")


class Model(BaseModel):
    """Base of the layout models: frozen, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _pv_entry(value: Any) -> Any:
    if isinstance(value, str):
        return {"pv": value}
    if isinstance(value, (Mapping, PVEntry)):
        return value
    raise ValueError(f"expected a PV name or a mapping with a 'pv' key, got {value!r}")


class PVEntry(Model):
    """One PV on a panel: a name, or a mapping with the name and how to show it."""

    pv: str = Field(pattern=PV_NAME.pattern)
    """The PV's name (``CRYO:MXC:TEMP``)."""
    label: str | None = None
    """Shown instead of the name."""
    color: str | None = Field(None, pattern=COLOR.pattern)
    """Curve colour on a chart: ``#rrggbb`` or a colour name."""
    log: bool | None = None
    """Chart: a logarithmic axis for this PV's unit (default: the chart's ``log``)."""
    format: str | None = None
    """Values panel: a Python format spec for the number, e.g. ``.3f`` or ``.2e``."""

    @field_validator("format")
    @classmethod
    def _format(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                format(1.5, v)
            except ValueError as e:
                raise ValueError(f"not a number format spec ({e}): {v!r}") from None
        return v


PVItem = Annotated[PVEntry, BeforeValidator(_pv_entry)]


class Placement(Model):
    """Where a panel sits in the grid (cells are counted from 0)."""

    row: int | None = Field(None, ge=0)
    col: int | None = Field(None, ge=0)
    rowspan: int = Field(1, ge=1, le=24)
    colspan: int = Field(1, ge=1, le=24)

    @model_validator(mode="after")
    def _both(self) -> Placement:
        if (self.row is None) != (self.col is None):
            raise ValueError("give both row and col, or neither (the panel then takes the next free place)")
        return self


class ChartPanel(Placement):
    """A strip chart: recent history, then live; PVs with the same unit share an axis."""

    type: Literal["chart"]
    title: str = ""
    pvs: list[PVItem] = Field(min_length=1, max_length=32)
    span_s: float = Field(600.0, gt=0, le=366 * 86400)
    """The time window shown while following live data, seconds. The window's charts share one
    time axis: the first chart's span is where every chart starts (the span selector changes it)."""
    log: bool = False
    """Logarithmic value axes (a PV's own ``log`` takes precedence for its unit)."""


class ValuesPanel(Placement):
    """Big numbers with units and alarm colours."""

    type: Literal["values"]
    title: str = ""
    pvs: list[PVItem] = Field(min_length=1, max_length=200)
    columns: int = Field(4, ge=1, le=16)
    """Tiles per row inside the panel."""


class LocksPanel(Placement):
    """Resource locks: holder, expiry and queue length of each lockable resource."""

    type: Literal["locks"]
    title: str = "Locks"
    resources: list[str] | None = None
    """Only these resources (default: every lockable resource of the site)."""


class JobsPanel(Placement):
    """The job queue: queued and running jobs, then the latest finished ones."""

    type: Literal["jobs"]
    title: str = "Job queue"
    finished: int = Field(10, ge=0, le=500)
    """How many finished jobs to list below the active ones."""


class InterlocksPanel(Placement):
    """Interlock states."""

    type: Literal["interlocks"]
    title: str = "Interlocks"


Panel = Annotated[ChartPanel | ValuesPanel | LocksPanel | JobsPanel | InterlocksPanel, Field(discriminator="type")]


class Layout(Model):
    """A control-room screen: a grid of panels under the alarm banner."""

    title: str = ""
    """Window title (default: the site's name)."""
    columns: int = Field(2, ge=1, le=12)
    """Grid columns."""
    large: bool = False
    """Large-font control-room mode (``labctl gui --large`` turns it on too)."""
    banner: bool = True
    """Show the alarm banner above the grid."""
    panels: list[Panel] = Field(min_length=1, max_length=100)

    def cross_check(self) -> list[tuple[tuple[Any, ...], str]]:
        """Placement problems as (key path, message)."""
        try:
            self.cells()
        except _PlacementError as e:
            return [(e.path, e.message)]
        return []

    def cells(self) -> list[tuple[int, int, int, int]]:
        """Each panel's (row, col, rowspan, colspan), in panel order."""
        taken: dict[tuple[int, int], int] = {}
        out: dict[int, tuple[int, int, int, int]] = {}

        def fits(i: int, r: int, c: int, p: Placement) -> int | None:
            for rr in range(r, r + p.rowspan):
                for cc in range(c, c + p.colspan):
                    if (rr, cc) in taken:
                        return taken[(rr, cc)]
            return None

        def take(i: int, r: int, c: int, p: Placement) -> None:
            for rr in range(r, r + p.rowspan):
                for cc in range(c, c + p.colspan):
                    taken[(rr, cc)] = i
            out[i] = (r, c, p.rowspan, p.colspan)

        for i, p in enumerate(self.panels):
            if p.colspan > self.columns:
                raise _PlacementError(("panels", i, "colspan"), f"{p.colspan} columns do not fit in a grid of {self.columns}")
            if p.row is None or p.col is None:
                continue
            if p.col + p.colspan > self.columns:
                raise _PlacementError(("panels", i, "col"), f"column {p.col} + colspan {p.colspan} is beyond the grid's {self.columns} columns")
            other = fits(i, p.row, p.col, p)
            if other is not None:
                raise _PlacementError(("panels", i, "row"), f"overlaps panels[{other}]")
            take(i, p.row, p.col, p)
        for i, p in enumerate(self.panels):
            if i in out:
                continue
            r = 0
            while i not in out:
                for c in range(self.columns - p.colspan + 1):
                    if fits(i, r, c, p) is None:
                        take(i, r, c, p)
                        break
                r += 1
        return [out[i] for i in range(len(self.panels))]

    def pv_names(self) -> list[str]:
        """Every PV the layout shows, once, in order."""
        names: dict[str, None] = {}
        for p in self.panels:
            for e in getattr(p, "pvs", ()):
                names[e.pv] = None
        return list(names)


class _PlacementError(Exception):
    def __init__(self, path: tuple[Any, ...], message: str) -> None:
        self.path = path
        self.message = message


# ---- loading ------------------------------------------------------------------------


def _describe(err: Mapping[str, Any], data: Any) -> tuple[tuple[Any, ...], str]:
    """The key path and one sentence for a pydantic error (the layout's own wording, else the shared one)."""
    loc = yamlmodel.clean_loc(err["loc"])
    # A discriminated union puts the tag ('chart') after the panel's index: no key of the file.
    loc = tuple(
        part
        for i, part in enumerate(loc)
        if not (isinstance(part, str) and i >= 2 and loc[i - 2] == "panels" and isinstance(loc[i - 1], int) and part in PANEL_TYPES)
    )
    kind = err["type"]
    kinds = ", ".join(PANEL_TYPES)
    if kind == "union_tag_invalid":
        return loc + ("type",), f"unknown panel type {err['ctx']['tag']!r}; expected one of {kinds}"
    if kind == "union_tag_not_found":
        return loc, f"a panel needs a 'type': one of {kinds}"
    key = str(loc[-1]) if loc else ""
    if key == "pv" and isinstance(_at(data, loc[:-1]), str):
        loc = loc[:-1]  # the PV was given as a plain name: there is no 'pv' key to point at
    if kind == "string_pattern_mismatch":
        what = {"pv": "a PV name (colon-separated, e.g. CRYO:MXC:TEMP)", "color": "a colour: #rrggbb or a name"}.get(
            key, "the expected form"
        )
        return loc, f"expected {what}, got {err.get('input')!r}"
    return loc, yamlmodel.describe(err, "layout")[1]


def _at(data: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def parse_layout(text: str, source: str = "<layout>") -> Layout:
    """Validate the YAML text of a layout; raise ConfigError listing every problem with file:line:col and key."""
    return yamlmodel.parse_model(
        text, source, Layout, schema="layout", top_keys="layout keys (title, columns, panels...)", describe_error=_describe
    )


def load_layout(path: str | Path) -> Layout:
    """Read and validate a layout file."""
    return parse_layout(yamlmodel.read_text(path, "layout file"), str(Path(path)))


# ---- the default layout ---------------------------------------------------------------

#: Limits of the default layout, so a big site still fits a screen.
MAX_CHARTS = 6
MAX_PER_CHART = 6
MAX_UNITS_PER_CHART = 2
MAX_VALUES = 24


def is_system(name: str) -> bool:
    """A PV the server keeps for its own state (alarm summary, lock, interlock)."""
    return name.startswith(SYSTEM_PREFIXES)


def _group(meta: Metadata) -> str:
    # Browse paths are <site>/<instrument>/<channel>: PVs of one instrument belong together.
    parts = meta.path.split("/")
    return parts[1] if len(parts) >= 3 else meta.name.split(":")[0]


def wants_log(unit: str, values: Iterable[Any]) -> bool:
    """A log axis suits pressures, and positive values that span two decades or more."""
    if unit in LOG_UNITS:
        return True
    nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return len(nums) > 1 and min(nums) > 0 and max(nums) / min(nums) >= 100


def default_layout(metas: Sequence[Metadata], readings: Mapping[str, Reading] | None = None, *, title: str = "") -> Layout:
    """A layout for a site: charts per instrument, the numbers, and the lock, interlock and job tables."""
    readings = readings or {}
    analog = [m for m in metas if m.type is PVType.FLOAT64 and not m.writable and not is_system(m.name)]
    groups: dict[str, list[Metadata]] = {}
    for m in analog:
        groups.setdefault(_group(m), []).append(m)
    panels: list[dict[str, Any]] = []
    for group, members in groups.items():
        by_unit: dict[str, list[Metadata]] = {}
        for m in members:
            by_unit.setdefault(m.unit, []).append(m)
        units = list(by_unit)
        for start in range(0, len(units), MAX_UNITS_PER_CHART):
            chosen = units[start : start + MAX_UNITS_PER_CHART]
            entries = []
            for unit in chosen:
                log = wants_log(unit, (readings[m.name].value for m in by_unit[unit] if m.name in readings))
                entries += [{"pv": m.name, **({"log": True} if log else {})} for m in by_unit[unit]]
            entries = entries[:MAX_PER_CHART]
            shown = ", ".join(u or "no unit" for u in chosen)
            panels.append({"type": "chart", "title": f"{group} ({shown})", "pvs": entries})
    panels = panels[:MAX_CHARTS]
    columns = 3 if len(panels) >= 3 else max(1, len(panels)) if panels else 3
    numbers = [m.name for m in analog][:MAX_VALUES]
    if numbers:
        panels.append({"type": "values", "title": "Readings", "pvs": numbers, "columns": min(6, 2 * columns), "colspan": columns})
    names = {m.name for m in metas}
    tables = []
    if any(n.startswith("ARB:") for n in names):
        tables.append({"type": "locks"})
    if any(n.startswith("ILK:") for n in names):
        tables.append({"type": "interlocks"})
    tables.append({"type": "jobs"})
    panels += tables
    return Layout.model_validate({"title": title, "columns": columns, "panels": panels})
