"""A bench power supply with a load on its output: a simulation the generic ``scpi`` driver talks to.

Theory of operation
-------------------
pyvisa-sim answers ``:MEAS:VOLT?`` with one fixed number, so a supply simulated there
reads 4.9987 V whatever its setpoint. This plant keeps the supply's state (voltage and
current setpoints, output on/off) and answers from it, through a
:class:`~labctl.drivers.transport.SimulationTransport`, the SCPI subset of
``drivers/sim/scpi.yaml``: ``*IDN?``, ``*RST``, ``*CLS``, ``:VOLT[?]``, ``:CURR[?]``,
``:OUTP[?]`` (``ON|OFF|1|0``), ``:MEAS:VOLT?``, ``:MEAS:CURR?``, ``:READ?``
(``v,i,status``), ``:STAT?`` (``MODE=CV;T=23.5C``), ``:SYST:ERR?``.

The load is a resistor of ``load_ohm``. With the output on, the supply regulates
voltage (CV) at its setpoint while the load draws less than the current setpoint, else
current (CC) at that limit; with the output off it measures 0 V and 0 A (what a meter
on open terminals reads, not an unknown). Measurements carry a small seeded noise
(``noise`` of the value, plus a ``noise_floor_v`` floor), so read-backs follow the
setpoint the way a real one does. The internal temperature rises with the power
delivered and relaxes toward ``ambient_c`` with time constant ``thermal_tau_s``, on the
injected ``clock``.

Site file::

    simulations:
      supply: {model: powersupply, options: {load_ohm: 40}}
    instruments:
      - {name: psu, driver: scpi, simulation: supply, pvs: [...]}
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

#: The driver protocols this plant speaks.
PROTOCOLS = frozenset({"scpi"})

IDENTITY = "LABCTL,SIM-PSU-1,0001,1.0"
_NO_ERROR = '0,"No error"'
_UNDEFINED = '-113,"Undefined header"'
_RANGE = '-222,"Data out of range"'
MAX_VOLT, MAX_CURR = 30.0, 3.0


@dataclass(frozen=True)
class PowerSupplyOptions:
    """The load and the supply's start-up state (``simulations.<name>.options``)."""

    load_ohm: float = 40.0
    """The load's resistance."""
    voltage_setpoint: float = 5.0
    """Voltage setpoint at start, volts."""
    current_setpoint: float = 0.5
    """Current limit at start, amperes."""
    output_on: bool = True
    """Whether the output is on at start."""
    noise: float = 2e-4
    """Relative rms noise of measurements."""
    noise_floor_v: float = 2e-4
    """Absolute rms noise of the voltage measurement, volts (what an idle output reads around 0)."""
    ambient_c: float = 23.5
    """Internal temperature with no power delivered."""
    c_per_w: float = 2.0
    """Internal temperature rise per watt delivered."""
    thermal_tau_s: float = 120.0
    """Time constant of the internal temperature."""
    seed: int = 7
    """Seed of the noise generator."""

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> PowerSupplyOptions:
        """Options from a site file's mapping.

        Raises:
            ValueError: one line per unknown option or bad value.
        """
        defaults = cls()
        known = {f.name for f in fields(cls)}
        problems = [f"unknown option {k!r}; options: {', '.join(sorted(known))}" for k in options if k not in known]
        values: dict[str, Any] = {}
        for k in sorted(known & set(options)):
            v, default = options[k], getattr(defaults, k)
            if isinstance(default, bool):
                if not isinstance(v, bool):
                    problems.append(f"{k}: expected true or false, got {v!r}")
                    continue
                values[k] = v
            elif isinstance(default, int):
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    problems.append(f"{k}: expected a whole number >= 0, got {v!r}")
                    continue
                values[k] = v
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                problems.append(f"{k}: expected a number >= 0, got {v!r}")
            else:
                values[k] = float(v)
        for k, top in (("load_ohm", math.inf), ("thermal_tau_s", math.inf), ("voltage_setpoint", MAX_VOLT), ("current_setpoint", MAX_CURR)):
            v = values.get(k)
            if v is not None and (v > top or (k in ("load_ohm", "thermal_tau_s") and v == 0)):
                problems.append(f"{k}: out of range, got {v!r}")
        if problems:
            raise ValueError("\n".join(problems))
        return cls(**values)


class PowerSupplyPlant:
    """A SCPI bench supply driving a resistive load (one instrument, one link).

    Args:
        options: The load and start-up state.
        clock: Monotonic seconds (the internal temperature's time).
        name: The simulation's name (for messages).
    """

    protocols = PROTOCOLS

    def __init__(self, options: PowerSupplyOptions | None = None, *, clock: Callable[[], float] = time.monotonic, name: str = "powersupply") -> None:
        self.options = options or PowerSupplyOptions()
        self.name = name
        self._clock = clock
        self._random = random.Random(self.options.seed)
        self._reset()
        self._last = clock()
        self._temp_c = self.options.ambient_c + self.options.c_per_w * self.power()

    def _reset(self) -> None:
        o = self.options
        self.voltage_setpoint = o.voltage_setpoint
        self.current_setpoint = o.current_setpoint
        self.output_enabled = o.output_on
        self._errors: list[str] = []

    def endpoint(self, protocol: str) -> PowerSupplyPlant:
        """The link a driver talks to (this plant itself).

        Raises:
            ValueError: the plant cannot speak that protocol.
        """
        if protocol not in PROTOCOLS:
            raise ValueError(f"the powersupply simulation speaks {', '.join(sorted(PROTOCOLS))}, not {protocol}")
        return self

    # ---- physics -------------------------------------------------------------------

    def output(self) -> tuple[float, float, str]:
        """(volts, amps, mode) at the output terminals, without noise."""
        if not self.output_enabled:
            return 0.0, 0.0, "OFF"
        r = self.options.load_ohm
        i = self.voltage_setpoint / r
        if i <= self.current_setpoint:
            return self.voltage_setpoint, i, "CV"
        return self.current_setpoint * r, self.current_setpoint, "CC"

    def power(self) -> float:
        """Watts delivered to the load."""
        v, i, _ = self.output()
        return v * i

    def temperature(self) -> float:
        """The internal temperature now, Celsius."""
        o = self.options
        now = self._clock()
        dt = now - self._last
        if dt > 0:
            self._last = now
            target = o.ambient_c + o.c_per_w * self.power()
            self._temp_c = target + (self._temp_c - target) * math.exp(-dt / o.thermal_tau_s)
        return self._temp_c

    def measure(self) -> tuple[float, float]:
        """(volts, amps) as the built-in meter reads them (with noise)."""
        o = self.options
        v, i, _ = self.output()
        gauss = self._random.gauss
        return v * (1.0 + o.noise * gauss(0.0, 1.0)) + o.noise_floor_v * gauss(0.0, 1.0), i * (1.0 + o.noise * gauss(0.0, 1.0))

    # ---- protocol ------------------------------------------------------------------

    def handle(self, command: str) -> str | None:
        """Answer one SCPI command (None for a command with no reply).

        A command it does not know, or a value out of range, queues a SCPI error for
        ``:SYST:ERR?`` and answers nothing, as the instrument does; a query it does not
        know raises ValueError (the transport reports it at once rather than time out).
        """
        self.temperature()  # advance the thermal state before anything changes the power
        head, _, arg = command.strip().partition(" ")
        head, arg = head.upper(), arg.strip()
        if head == "*IDN?":
            return IDENTITY
        if head == "*RST":
            self._reset()
            return None
        if head == "*CLS":
            self._errors.clear()
            return None
        if head == ":SYST:ERR?":
            return self._errors.pop(0) if self._errors else _NO_ERROR
        if head == ":MEAS:VOLT?":
            return f"{self.measure()[0]:+.5E}"
        if head == ":MEAS:CURR?":
            return f"{self.measure()[1]:+.5E}"
        if head == ":READ?":
            v, i = self.measure()
            return f"{v:+.5E},{i:+.5E},0"
        if head == ":STAT?":
            mode = self.output()[2]
            return f"MODE={'CV' if mode == 'OFF' else mode};T={self.temperature() + 0.05 * self._random.gauss(0.0, 1.0):.2f}C"
        if head == ":OUTP?":
            return "ON" if self.output_enabled else "OFF"
        if head == ":OUTP":
            text = arg.upper()
            if text in ("ON", "1", "TRUE"):
                self.output_enabled = True
            elif text in ("OFF", "0", "FALSE"):
                self.output_enabled = False
            else:
                return self._error(_RANGE)
            return None
        numeric = {":VOLT": ("voltage_setpoint", MAX_VOLT), ":CURR": ("current_setpoint", MAX_CURR)}
        if head.endswith("?") and head[:-1] in numeric:
            return f"{getattr(self, numeric[head[:-1]][0]):+.5E}"
        if head in numeric:
            attr, top = numeric[head]
            try:
                value = float(arg)
            except ValueError:
                return self._error(_RANGE)
            if not 0.0 <= value <= top:
                return self._error(_RANGE)
            setattr(self, attr, value)
            return None
        if head.endswith("?"):
            raise ValueError(f"unknown query {command!r}")
        return self._error(_UNDEFINED)

    def _error(self, entry: str) -> None:
        self._errors.append(entry)
        return None
