"""Instruments, the simulated plants they may talk to, and calibration tables."""

from __future__ import annotations

from typing import Any, Literal

from labctl.ioc.config.base import Model, Name, PositiveSeconds
from labctl.ioc.config.pvs import PVConfig
from pydantic import model_validator


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

    model: Literal["cryostat", "sourcemeter", "powersupply"]
    """``cryostat``: a dilution refrigerator (lakeshore372, tpg); ``sourcemeter``: a source-meter with a resistor on its terminals (keithley2400); ``powersupply``: a bench supply with a resistive load (scpi)."""
    options: dict[str, Any] = {}


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

