"""A source-meter with a sample on its terminals: a simulation the real ``keithley2400`` driver talks to.

Theory of operation
-------------------
pyvisa-sim answers ``:READ?`` with one fixed pair, so an I-V curve taken through it is
flat. This plant answers the Keithley 2400's SCPI subset (the commands the driver sends,
see :mod:`labctl.drivers.keithley2400`) from state, through a
:class:`~labctl.drivers.transport.SimulationTransport`: source level, compliances, source
function, output state, and an error queue (``:SYST:ERR?``) that a refused command fills,
as the instrument's does.

The sample is a resistor of ``resistance_ohm`` in series with an ideal diode-free load, so
sourcing a voltage ``V`` measures ``I = V / R`` clipped to the current compliance
(then the voltage is what the clipped current makes, ``V = I * R``); sourcing a current
``I`` measures ``V = I * R`` clipped to the voltage compliance. ``noise`` adds a
deterministic relative ripple (a function of the number of readings), so readings differ
without a random generator. ``:READ?`` with the output off turns the output on, as the
real instrument does (the driver never lets it: it asks ``:OUTP?`` first).

Site file::

    simulations:
      sample: {model: sourcemeter, options: {resistance_ohm: 10000}}
    instruments:
      - {name: smu1, driver: keithley2400, simulation: sample, ...}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

#: The driver protocols this plant speaks.
PROTOCOLS = frozenset({"keithley2400"})

IDENTITY = "KEITHLEY INSTRUMENTS INC.,MODEL 2400,SIM0001,C32 labctl simulation"
_NO_ERROR = '0,"No error"'


@dataclass(frozen=True)
class SourceMeterOptions:
    """The sample and the instrument's start-up state (``simulations.<name>.options``)."""

    resistance_ohm: float = 10_000.0
    """The sample's resistance."""
    noise: float = 1e-4
    """Relative ripple on measured values (deterministic)."""

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> SourceMeterOptions:
        """Options from a site file's mapping.

        Raises:
            ValueError: one line per unknown option or bad value.
        """
        known = {f.name for f in fields(cls)}
        problems = [f"unknown option {k!r}; options: {', '.join(sorted(known))}" for k in options if k not in known]
        values: dict[str, float] = {}
        for k in known & set(options):
            v = options[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                problems.append(f"{k}: expected a number, got {v!r}")
            else:
                values[k] = float(v)
        if "resistance_ohm" in values and values["resistance_ohm"] <= 0:
            problems.append(f"resistance_ohm: must be positive, got {values['resistance_ohm']!r}")
        if "noise" in values and not 0 <= values["noise"] < 0.1:
            problems.append(f"noise: must be in [0, 0.1), got {values['noise']!r}")
        if problems:
            raise ValueError("\n".join(problems))
        return cls(**values)


class SourceMeterPlant:
    """A Keithley 2400 with a resistor on its terminals (one instrument, one link)."""

    protocols = PROTOCOLS

    def __init__(self, options: SourceMeterOptions | None = None, *, name: str = "sourcemeter") -> None:
        self.options = options or SourceMeterOptions()
        self.name = name
        self.voltage_setpoint = 0.0
        self.current_setpoint = 0.0
        self.compliance_current = 1.05e-4
        self.compliance_voltage = 21.0
        self.source_mode = "VOLT"
        self.output_enabled = False
        self.readings = 0
        self._errors: list[str] = []

    def endpoint(self, protocol: str) -> SourceMeterPlant:
        """The link a driver talks to (this plant itself: it is one instrument).

        Raises:
            ValueError: the plant cannot speak that protocol.
        """
        if protocol not in PROTOCOLS:
            raise ValueError(f"the sourcemeter simulation speaks {', '.join(sorted(PROTOCOLS))}, not {protocol}")
        return self

    def measure(self) -> tuple[float, float]:
        """(volts, amps) at the terminals now."""
        r = self.options.resistance_ohm
        if self.source_mode == "VOLT":
            i = self.voltage_setpoint / r
            i = max(-self.compliance_current, min(self.compliance_current, i))
            v = i * r
        else:
            v = self.current_setpoint * r
            v = max(-self.compliance_voltage, min(self.compliance_voltage, v))
            i = v / r
        self.readings += 1
        ripple = 1.0 + self.options.noise * math.sin(self.readings)
        return v * ripple, i * ripple

    def handle(self, command: str) -> str | None:
        """Answer one SCPI command (None for a command with no reply).

        A command it does not know queues ``-100,"Command error"`` and answers nothing,
        as the instrument does; a query it does not know raises ValueError (the transport
        reports it, rather than waiting for a timeout).
        """
        head, _, arg = command.strip().partition(" ")
        head = head.upper()
        if head == "*IDN?":
            return IDENTITY
        if head in ("*CLS",):
            self._errors.clear()
            return None
        if head == "*RST":
            self.__init__(self.options, name=self.name)  # type: ignore[misc]
            return None
        if head == ":SYST:ERR?":
            return self._errors.pop(0) if self._errors else _NO_ERROR
        if head == ":FORM:ELEM":
            return None
        if head == ":READ?":
            self.output_enabled = True
            v, i = self.measure()
            return f"{v:+.6E},{i:+.6E}"
        if head == ":OUTP?":
            return "1" if self.output_enabled else "0"
        if head == ":OUTP":
            return self._set_bool("output_enabled", arg)
        if head == ":SOUR:FUNC?":
            return self.source_mode
        if head == ":SOUR:FUNC":
            if arg.upper() not in ("VOLT", "CURR"):
                return self._error('-224,"Illegal parameter value"')
            self.source_mode = arg.upper()
            return None
        numeric = {
            ":SOUR:VOLT:LEV": ("voltage_setpoint", 210.0),
            ":SOUR:CURR:LEV": ("current_setpoint", 1.05),
            ":SENS:CURR:PROT": ("compliance_current", 1.05),
            ":SENS:VOLT:PROT": ("compliance_voltage", 210.0),
        }
        if head.endswith("?") and head[:-1] in numeric:
            return f"{getattr(self, numeric[head[:-1]][0]):+.6E}"
        if head in numeric:
            attr, limit = numeric[head]
            try:
                value = float(arg)
            except ValueError:
                return self._error('-104,"Data type error"')
            low = 0.0 if "PROT" in head else -limit
            if not low <= value <= limit:
                return self._error('-222,"Data out of range"')
            setattr(self, attr, value)
            return None
        if head.endswith("?"):
            raise ValueError(f"unknown query {command!r}")
        return self._error('-100,"Command error"')

    def _set_bool(self, attr: str, arg: str) -> None:
        text = arg.strip().upper()
        if text in ("1", "ON"):
            setattr(self, attr, True)
        elif text in ("0", "OFF"):
            setattr(self, attr, False)
        else:
            self._error('-224,"Illegal parameter value"')
        return None

    def _error(self, entry: str) -> None:
        self._errors.append(entry)
        return None
