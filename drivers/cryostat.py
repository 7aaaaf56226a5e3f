"""A dilution-refrigerator cryostat simulation that the real drivers talk to.

Theory of operation
-------------------
pyvisa-sim answers from static tables; a cryostat needs dynamics. This module is a
small plant model with four stages -- the 50 K and 4 K pulse-tube plates, the still
and the mixing chamber (``50K``, ``4K``, ``still``, ``mxc``) -- plus a superconducting
magnet mounted on the 4 K plate (``magnet``), and the instruments that watch it: a Lake
Shore 372 bridge (thermometers and heaters), a Lake Shore 336 on the magnet, and a
Pfeiffer TPG gauge (vacuum cans). The real ``lakeshore372``, ``lakeshore336`` and ``tpg``
drivers run against it through a :class:`~labctl.drivers.transport.SimulationTransport`,
one :class:`PlantEndpoint` per link.

Each stage temperature is a first-order lag toward an equilibrium that depends on what
cools and heats it::

    dT/dt = (T_eq - T) / tau            T(t + dt) = T_eq + (T - T_eq) * exp(-dt / tau)

There is no background thread: time comes from the injected ``clock`` (seconds), and
every call first integrates from the last call to ``clock()`` in steps of at most
``max_step_s``, each step exact for inputs held constant over it. With constant inputs
and settled upstream stages the result is exact for any step size, so tests drive the
clock by hand and check time constants to machine precision.

Equilibria (``compressor`` is the pulse-tube compressor; the dilution unit
*circulates* while the compressor runs and the 4 K plate is below
``circulation_limit_k``):

* 50 K plate: ``stage50_k`` with the compressor on, else ``ambient_k`` (warm-up lag).
* 4 K plate: ``stage4_k`` plus a load from a warm 50 K plate, else ``ambient_k``.
* still: ``still_k`` plus ``still_k_per_w`` x still-heater power while circulating,
  else it follows the 4 K plate.
* mixing chamber: while circulating, cooling power ``cooling_w_per_k2 * T^2`` (the
  dilution law, 84 n' T^2) balances the heater power, so
  ``T_eq = sqrt(mxc_base_k^2 + P / cooling_w_per_k2)``; otherwise it follows the still
  (plus ``warm_k_per_w`` x heater power).

Cold-regime time constants are ``tau_s``; when a stage is warming because the
compressor is off or the unit does not circulate, ``warm_tau_s`` applies.

The magnet coil follows the 4 K plate it is mounted on, plus what its heater (the Lake
Shore 336's output 1) puts in: ``T_eq = T_4K + magnet_k_per_w * P``, time constant
``magnet_tau_s``. Output 1 is closed loop: an ideal controller delivers the power that
holds the coil at setpoint 1, limited by the range (``RANGE 1,<n>``: 0 off, 1 low, 2
medium, 3 high = ``magnet_heater_w`` / 100, / 10, x 1). So the coil sits at the 4 K plate's
temperature with the heater off, at its setpoint with enough range, and warms with the
plate when the compressor stops. The 336's inputs read the thermometers that
``magnet_inputs`` places (default: A on the coil, B on the current leads' heat sink on
the 50 K plate); an input with no thermometer reads 0, as a disabled 336 input does.

Heaters (Lake Shore 372 outputs): 0 is the sample heater on the mixing chamber, with a
current range (``RANGE 0,<n>``, 31.6 µA ... 100 mA into ``sample_heater_ohm``) and
either closed loop (output mode 5: an ideal controller delivers the power that holds
the setpoint, limited by the range) or open loop (mode 2: ``MOUT 0,<percent>``,
percent of current, so power goes as its square). Output 1 is the warm-up heater on the
mixing chamber and output 2 the still heater, both open loop with range 0 off / 1 on.

Pressures follow temperatures: gauge 1 reads the inner vacuum can, log-interpolated
between ``ivc_mbar[0]`` at the 4 K plate's cold temperature and ``ivc_mbar[1]`` at
ambient (gas desorbs as the can warms); gauge 2 the outer vacuum can, likewise from the
50 K plate with ``ovc_mbar``. A gauge reports underrange below 5e-9 mbar and overrange
above 1000 mbar (a Pfeiffer PKR's span), or a status forced by :meth:`CryostatPlant.set_gauge_status`.

What the instruments read is the plant's state seen through a real sensor. With the
options ``noise`` (relative rms measurement noise, drawn from a generator seeded with
``seed``: the same sequence every run), ``drift`` (a slow relative wander of each
stage's reading, a sine of period ``drift_period_s`` with a phase per stage) and
``ripple_k`` (the pulse tube's ripple on the 4 K plate, ``ripple_hz``), every
temperature, resistance and pressure reading -- the 336's too, each thermometer with its
own drift phase -- moves as a real one does. All are off by default, so the plant's own
readers (:meth:`~CryostatPlant.temperature`...) and a plant without them answer exact
values; the demo turns them on. Resistances follow the
thermometer law ``R = R_INF * exp((T0 / T) ** 0.25)`` of the reading's temperature, so
a calibration table made from that law (the demo's ``rox_mxc``) gives the temperature back.

Control methods for tests and the demo: :meth:`~CryostatPlant.stop_compressor`,
:meth:`~CryostatPlant.start_compressor`, :meth:`~CryostatPlant.set_gauge_status`; and
the readers :meth:`~CryostatPlant.temperature` (a stage or ``magnet``),
:meth:`~CryostatPlant.pressure`, :meth:`~CryostatPlant.heater_power`,
:meth:`~CryostatPlant.magnet_heater_power`.

Commands answered (Lake Shore 372): ``*IDN?``, ``KRDG? <ch>``, ``RDGR? <ch>``,
``SRDG? <ch>``, ``SETP? <o>``, ``SETP <o>,<K>``, ``RANGE? <o>``, ``RANGE <o>,<n>``,
``HTR?``, ``HTR? <o>``, ``MOUT? <o>``, ``MOUT <o>,<%>``, ``STILL?``, ``STILL <%>``,
``OUTMODE? <o>``, ``OUTMODE <o>,<mode>[,...]``. Channels are ``A`` and 1-16; those
without a thermometer read 0. (Lake Shore 336): ``*IDN?``, ``*CLS``, ``KRDG? <in>``,
``SRDG? <in>`` (inputs A-D), ``SETP[?] <o>`` (1-4), ``RANGE[?] <o>`` (1-2: 0-3, 3-4: 0-1),
``HTR? <o>`` (1-2; nothing but output 1 heats anything, so output 2 reads 0 %),
``MOUT[?] <o>`` (1-4; manual outputs are kept and read back, they heat nothing). (TPG):
``PR1``, ``PR2``, ``PRX``, ``UNI``, ``PNR``, ``TID`` acknowledged with ACK and answered
after ENQ; anything else gets NAK.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

STAGES = ("50K", "4K", "still", "mxc")
#: The magnet coil: not a stage of the refrigerator, a load on its 4 K plate.
MAGNET = "magnet"
#: Where a Lake Shore 336 input's thermometer may sit.
PLACES = (*STAGES, MAGNET)

#: Sample-heater (output 0) full-scale current per range index, amperes.
SAMPLE_HEATER_RANGES_A = (0.0, 31.6e-6, 100e-6, 316e-6, 1e-3, 3.16e-3, 10e-3, 31.6e-3, 100e-3)
#: Lake Shore 372 output modes the plant models.
MODE_OFF, MODE_OPEN_LOOP, MODE_CLOSED_LOOP = 0, 2, 5
#: The span of a Pfeiffer PKR full-range gauge, mbar.
GAUGE_MIN_MBAR, GAUGE_MAX_MBAR = 5e-9, 1000.0
#: RuOx-like thermometer law R = R_INF * exp((T0 / T) ** 0.25).
R_INF_OHM, T0_K = 800.0, 1.64

ACK, NAK, ENQ = "\x06", "\x15", "\x05"
TPG_MNEMONICS = frozenset({"PR1", "PR2", "PRX", "UNI", "PNR", "TID"})
LAKESHORE_HEADS = frozenset(
    {"*IDN?", "*CLS", "KRDG?", "RDGR?", "SRDG?", "SETP?", "SETP", "RANGE?", "RANGE", "HTR?",
     "MOUT?", "MOUT", "STILL?", "STILL", "OUTMODE?", "OUTMODE"}
)  # fmt: skip
LAKESHORE336_HEADS = frozenset({"*IDN?", "*CLS", "KRDG?", "SRDG?", "SETP?", "SETP", "RANGE?", "RANGE", "HTR?", "MOUT?", "MOUT"})
INPUTS_336 = ("A", "B", "C", "D")
PROTOCOLS = frozenset({"lakeshore372", "lakeshore336", "tpg"})


class UnknownCommand(ValueError):
    """The simulated instrument does not accept this command."""


def _stage_map(defaults: Mapping[str, float]) -> Callable[[], dict[str, float]]:
    return lambda: dict(defaults)


@dataclass(frozen=True)
class CryostatOptions:
    """Parameters of the plant (the ``options`` of a ``model: cryostat`` simulation)."""

    ambient_k: float = 295.0
    """Room temperature: where every stage goes without cooling."""
    stage50_k: float = 42.0
    """50 K plate temperature with the compressor running."""
    stage4_k: float = 3.1
    """4 K plate temperature with the compressor running."""
    still_k: float = 0.75
    """Still temperature while circulating, still heater off."""
    still_k_per_w: float = 20.0
    """Still temperature rise per watt of still heater."""
    mxc_base_k: float = 0.010
    """Mixing-chamber base temperature with no heater power."""
    cooling_w_per_k2: float = 8.4e-3
    """Dilution cooling coefficient (84 J/(mol K^2) x 100 µmol/s circulation)."""
    warm_k_per_w: float = 50.0
    """Mixing-chamber rise above the still per watt while not circulating."""
    circulation_limit_k: float = 4.5
    """The unit circulates only while the 4 K plate is colder than this."""
    tau_s: dict[str, float] = field(default_factory=_stage_map({"50K": 1800.0, "4K": 1200.0, "still": 300.0, "mxc": 120.0}))
    """Cold-regime time constant per stage."""
    warm_tau_s: dict[str, float] = field(default_factory=_stage_map({"50K": 20000.0, "4K": 30000.0, "still": 3000.0, "mxc": 3000.0}))
    """Warming time constant per stage (compressor off, or not circulating)."""
    sample_heater_ohm: float = 120.0
    """Sample-heater resistance (output 0)."""
    warmup_heater_w: float = 1.0
    """Warm-up heater (output 1) full power."""
    still_heater_w: float = 0.02
    """Still heater (output 2) full power."""
    channels: dict[int, str] = field(default_factory=lambda: {1: "50K", 2: "4K", 5: "still", 6: "mxc"})
    """Lake Shore 372 scanner channel -> stage its thermometer sits on."""
    ivc_mbar: tuple[float, float] = (2e-8, 5e-3)
    """Inner vacuum can pressure (cold, warm); follows the 4 K plate."""
    ovc_mbar: tuple[float, float] = (5e-7, 2e-4)
    """Outer vacuum can pressure (cold, warm); follows the 50 K plate."""
    magnet_tau_s: float = 300.0
    """Time constant of the magnet coil toward its equilibrium."""
    magnet_k_per_w: float = 2.0
    """Magnet coil rise above the 4 K plate per watt of its heater."""
    magnet_heater_w: float = 1.0
    """Magnet heater (Lake Shore 336 output 1) full power on its high range."""
    magnet_inputs: dict[str, str] = field(default_factory=lambda: {"A": MAGNET, "B": "50K"})
    """Lake Shore 336 input -> where its thermometer sits (a stage or ``magnet``)."""
    start: str = "cold"
    """``cold`` (settled at base) or ``warm`` (every stage at ambient, cooling down)."""
    compressor_running: bool = True
    """Whether the compressor runs at the start."""
    max_step_s: float = 5.0
    """Longest integration step."""
    noise: float = 0.0
    """Relative rms noise of every temperature, resistance and pressure reading (0: exact readings)."""
    drift: float = 0.0
    """Relative amplitude of a slow wander of each reading (0: none)."""
    drift_period_s: float = 900.0
    """Period of that wander, seconds."""
    ripple_k: float = 0.0
    """Amplitude of the pulse tube's temperature ripple on the 4 K plate, kelvin (0: none)."""
    ripple_hz: float = 1.4
    """Frequency of the pulse tube's cycle."""
    seed: int = 1
    """Seed of the noise generator (the same readings every run)."""

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> CryostatOptions:
        """Validate site-file options.

        Raises:
            ValueError: one line per problem (unknown key, wrong type, bad value).
        """
        known = {f.name: f for f in dataclasses.fields(cls)}
        problems = []
        values: dict[str, Any] = {}
        for key, value in options.items():
            if key not in known:
                problems.append(f"unknown cryostat option {key!r}; known: {', '.join(sorted(known))}")
                continue
            try:
                values[key] = _convert_option(key, value, getattr(cls(), key))
            except (TypeError, ValueError) as e:
                problems.append(f"cryostat option {key!r}: {e}")
        if problems:
            raise ValueError("\n".join(problems))
        return cls(**values)


#: Options that may be zero (off); every other number must be positive.
_MAY_BE_ZERO = frozenset({"noise", "drift", "ripple_k"})


def _convert_option(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TypeError(f"expected a whole number >= 0, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"expected a number, got {value!r}")
        if value < 0 or (value == 0 and key not in _MAY_BE_ZERO):
            raise ValueError(f"must be {'zero or positive' if key in _MAY_BE_ZERO else 'positive'}, got {value!r}")
        if key in ("noise", "drift") and value >= 0.5:
            raise ValueError(f"is relative: expected less than 0.5, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if value not in ("cold", "warm"):
            raise ValueError(f"expected 'cold' or 'warm', got {value!r}")
        return value
    if isinstance(default, tuple):
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) and v > 0 for v in value)):
            raise TypeError(f"expected [cold, warm] positive pressures, got {value!r}")
        return (float(value[0]), float(value[1]))
    if key == "magnet_inputs":
        if not isinstance(value, Mapping):
            raise TypeError(f"expected a mapping of Lake Shore 336 input to place, got {value!r}")
        inputs = {}
        for name, place in value.items():
            if str(name).upper() not in INPUTS_336 or place not in PLACES:
                raise ValueError(f"input {name!r}: {place!r}; inputs are A-D, places {', '.join(PLACES)}")
            inputs[str(name).upper()] = place
        return inputs
    if key == "channels":
        if not isinstance(value, Mapping):
            raise TypeError(f"expected a mapping of channel number to stage, got {value!r}")
        out = {}
        for ch, stage in value.items():
            number = int(ch)
            if not 1 <= number <= 16 or stage not in STAGES:
                raise ValueError(f"channel {ch!r}: {stage!r}; channels are 1-16, stages {', '.join(STAGES)}")
            out[number] = stage
        return out
    # per-stage time constants: merged over the defaults
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a mapping of stage to seconds, got {value!r}")
    merged = dict(default)
    for stage, seconds in value.items():
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise ValueError(f"{stage}: expected positive seconds, got {seconds!r}")
        merged[stage] = float(seconds)
    return merged


@dataclass
class _Output:
    """One Lake Shore 372 heater output's settings."""

    mode: int
    range: int = 0
    manual_pct: float = 0.0
    setpoint_k: float = 0.0


class CryostatPlant:
    """The simulated cryostat: stage temperatures, heaters, compressor and vacuum gauges.

    Args:
        options: Plant parameters (defaults: a typical dry dilution refrigerator).
        clock: Seconds, monotonic; time advances only through it.
        name: The simulation's name (for messages).
    """

    protocols = PROTOCOLS
    """The driver command sets an endpoint can speak."""

    def __init__(
        self, options: CryostatOptions | None = None, *, clock: Callable[[], float] = time.monotonic, name: str = "cryostat"
    ) -> None:
        self.options = options or CryostatOptions()
        self.name = name
        self._clock = clock
        self._last = clock()
        self._compressor = self.options.compressor_running
        self._outputs = {0: _Output(MODE_CLOSED_LOOP), 1: _Output(MODE_OPEN_LOOP), 2: _Output(MODE_OPEN_LOOP)}
        # The Lake Shore 336's outputs (its power-on setpoints); output 1 heats the magnet.
        self._outputs336 = {n: _Output(MODE_CLOSED_LOOP, setpoint_k=sp) for n, sp in ((1, 4.2), (2, 50.0), (3, 0.0), (4, 0.0))}
        self._gauge_status: dict[int, int | None] = {1: None, 2: None}
        o = self.options
        if o.start == "warm":
            self._t = {place: o.ambient_k for place in PLACES}
        else:
            self._t = {"50K": o.stage50_k, "4K": o.stage4_k, "still": o.still_k, "mxc": o.mxc_base_k, MAGNET: o.stage4_k}
        self._default = PlantEndpoint(self, frozenset({"lakeshore372", "tpg"}))
        self._random = random.Random(self.options.seed)

    # ---- control -------------------------------------------------------------------

    @property
    def compressor_running(self) -> bool:
        """Whether the pulse-tube compressor runs."""
        return self._compressor

    def stop_compressor(self) -> None:
        """Stop the compressor: from now on every stage warms toward ambient."""
        self._advance()
        self._compressor = False

    def start_compressor(self) -> None:
        """Start the compressor: the stages cool back down."""
        self._advance()
        self._compressor = True

    def set_gauge_status(self, gauge: int, status: int | None) -> None:
        """Force a TPG status code on a gauge (3 sensor error, 4 sensor off...); None clears it."""
        if gauge not in self._gauge_status:
            raise ValueError(f"no gauge {gauge}; gauges: 1 (IVC), 2 (OVC)")
        if status is not None and not 0 <= status <= 6:
            raise ValueError(f"TPG status codes are 0-6, got {status}")
        self._gauge_status[gauge] = status

    # ---- readings ------------------------------------------------------------------

    def temperature(self, stage: str) -> float:
        """A stage's (or the ``magnet`` coil's) temperature now, kelvin."""
        if stage not in self._t:
            raise ValueError(f"no stage {stage!r}; stages: {', '.join(PLACES)}")
        self._advance()
        return self._t[stage]

    def temperatures(self) -> dict[str, float]:
        """Every stage's temperature now, kelvin (the refrigerator's four; the magnet's is :meth:`temperature`)."""
        self._advance()
        return {stage: self._t[stage] for stage in STAGES}

    def circulating(self) -> bool:
        """Whether the dilution unit circulates (compressor on and 4 K plate cold)."""
        self._advance()
        return self._circulating()

    def heater_power(self, output: int) -> float:
        """The power of a Lake Shore 372 heater output now, watts."""
        self._advance()
        return self._power(output)

    def magnet_heater_power(self) -> float:
        """The power of the magnet heater (Lake Shore 336 output 1) now, watts."""
        self._advance()
        return self._magnet_power()

    def pressure(self, gauge: int) -> float:
        """A vacuum gauge's true pressure now, mbar (1: IVC, 2: OVC)."""
        self._advance()
        return self._pressure(gauge)

    # ---- protocol ------------------------------------------------------------------

    def endpoint(self, protocol: str) -> PlantEndpoint:
        """A new link speaking one driver's command set (``lakeshore372``, ``lakeshore336`` or ``tpg``).

        Raises:
            ValueError: the plant cannot speak that protocol.
        """
        if protocol not in PROTOCOLS:
            raise ValueError(f"the cryostat simulation speaks {', '.join(sorted(PROTOCOLS))}, not {protocol}")
        return PlantEndpoint(self, frozenset({protocol}))

    def handle(self, command: str) -> str | None:
        """Answer a Lake Shore 372 or TPG command on the plant's own link (tests, consoles)."""
        return self._default.handle(command)

    # ---- physics -------------------------------------------------------------------

    def _circulating(self) -> bool:
        return self._compressor and self._t["4K"] < self.options.circulation_limit_k

    def _power(self, output: int) -> float:
        o = self.options
        out = self._outputs[output]
        if output == 0:
            full = SAMPLE_HEATER_RANGES_A[out.range] ** 2 * o.sample_heater_ohm
        elif output == 1:
            full = o.warmup_heater_w if out.range else 0.0
        else:
            full = o.still_heater_w if out.range else 0.0
        return full * (self._output_pct(output) / 100.0) ** 2

    def _output_pct(self, output: int) -> float:
        """Output in percent of full-scale current (power goes as its square)."""
        o = self.options
        out = self._outputs[output]
        if out.range == 0 or out.mode == MODE_OFF:
            return 0.0
        if out.mode == MODE_OPEN_LOOP or output != 0:
            return out.manual_pct
        # Closed loop on the mixing chamber: an ideal controller delivers the power
        # that holds the setpoint at equilibrium, limited by the range.
        full = SAMPLE_HEATER_RANGES_A[out.range] ** 2 * o.sample_heater_ohm
        needed = o.cooling_w_per_k2 * max(0.0, out.setpoint_k**2 - o.mxc_base_k**2)
        return 100.0 * math.sqrt(min(needed, full) / full)

    def _magnet_full_w(self) -> float:
        """The magnet heater's power at 100 % on its present range (0 off, then decades up to high)."""
        rng = self._outputs336[1].range
        return self.options.magnet_heater_w * 10.0 ** (rng - 3) if rng else 0.0

    def _magnet_power(self) -> float:
        """What the 336's ideal loop 1 delivers: the power that holds the coil at its setpoint, within the range."""
        o = self.options
        needed = max(0.0, (self._outputs336[1].setpoint_k - self._t["4K"]) / o.magnet_k_per_w)
        return min(needed, self._magnet_full_w())

    def _equilibria(self) -> dict[str, tuple[float, float]]:
        """(T_eq, tau) per stage (and the magnet) for the present state."""
        o, t = self.options, self._t
        cold, warm = o.tau_s, o.warm_tau_s
        eq: dict[str, tuple[float, float]] = {}
        if self._compressor:
            eq["50K"] = (o.stage50_k, cold["50K"])
            # A warm 50 K plate loads the 4 K plate (a small fraction of its excess).
            eq["4K"] = (o.stage4_k + 0.05 * max(0.0, t["50K"] - o.stage50_k), cold["4K"])
        else:
            eq["50K"] = (o.ambient_k, warm["50K"])
            eq["4K"] = (o.ambient_k, warm["4K"])
        mxc_power = self._power(0) + self._power(1)
        if self._circulating():
            eq["still"] = (o.still_k + o.still_k_per_w * self._power(2), cold["still"])
            eq["mxc"] = (math.sqrt(o.mxc_base_k**2 + mxc_power / o.cooling_w_per_k2), cold["mxc"])
        else:
            eq["still"] = (t["4K"], warm["still"])
            eq["mxc"] = (t["still"] + o.warm_k_per_w * mxc_power, warm["mxc"])
        eq[MAGNET] = (t["4K"] + o.magnet_k_per_w * self._magnet_power(), o.magnet_tau_s)
        return eq

    def _advance(self) -> None:
        now = self._clock()
        elapsed = now - self._last
        if elapsed <= 0:
            return
        self._last = now
        steps = max(1, math.ceil(elapsed / self.options.max_step_s))
        dt = elapsed / steps
        for _ in range(steps):
            eq = self._equilibria()
            for stage, (target, tau) in eq.items():
                self._t[stage] = target + (self._t[stage] - target) * math.exp(-dt / tau)

    def _pressure(self, gauge: int) -> float:
        o = self.options
        if gauge == 1:
            (p_cold, p_warm), temp, t_cold = o.ivc_mbar, self._t["4K"], o.stage4_k
        elif gauge == 2:
            (p_cold, p_warm), temp, t_cold = o.ovc_mbar, self._t["50K"], o.stage50_k
        else:
            raise ValueError(f"no gauge {gauge}; gauges: 1 (IVC), 2 (OVC)")
        span = math.log(o.ambient_k / t_cold)
        s = min(1.0, max(0.0, math.log(max(temp, t_cold) / t_cold) / span))
        return 10 ** (math.log10(p_cold) + s * (math.log10(p_warm) - math.log10(p_cold)))

    # ---- what a sensor reads -------------------------------------------------------

    def _seen(self, value: float, key: str) -> float:
        """``value`` as a sensor reads it now: drift (a slow wander, phase by ``key``) and noise."""
        o = self.options
        if o.drift:
            phase = (sum(map(ord, key)) % 97) / 97.0 * 2.0 * math.pi
            value *= 1.0 + o.drift * math.sin(2.0 * math.pi * self._last / o.drift_period_s + phase)
        if o.noise:
            value *= 1.0 + o.noise * max(-4.0, min(4.0, self._random.gauss(0.0, 1.0)))
        return value

    def _thermometer(self, stage: str, key: str | None = None) -> float:
        """The temperature a thermometer on ``stage`` reads (ripple, drift, noise), kelvin.

        ``key`` names the thermometer (its drift's phase); default: the stage's own.
        """
        kelvin = self._t[stage]
        if stage == "4K" and self.options.ripple_k:
            kelvin += self.options.ripple_k * math.sin(2.0 * math.pi * self.options.ripple_hz * self._last)
        return max(1e-4, self._seen(kelvin, key or stage))

    def _gauge_reading(self, gauge: int) -> str:
        pressure = self._seen(self._pressure(gauge), f"gauge{gauge}")
        status = self._gauge_status[gauge]
        if status is None:
            status = 1 if pressure < GAUGE_MIN_MBAR else 2 if pressure > GAUGE_MAX_MBAR else 0
        if status == 1:
            pressure = GAUGE_MIN_MBAR
        elif status == 2:
            pressure = GAUGE_MAX_MBAR
        elif status >= 3:
            pressure = 0.0
        return f"{status},{pressure:.4E}"

    # ---- Lake Shore 372 commands ---------------------------------------------------

    def _stage_of(self, channel: str) -> str | None:
        text = channel.strip().upper()
        if text == "A":
            return None
        try:
            number = int(text)
        except ValueError:
            raise UnknownCommand(f"no input {channel!r}; inputs are A and 1-16") from None
        if not 1 <= number <= 16:
            raise UnknownCommand(f"no input {channel!r}; inputs are A and 1-16")
        return self.options.channels.get(number)

    def _output_of(self, text: str, allowed: tuple[int, ...] = (0, 1, 2)) -> _Output:
        try:
            number = int(text)
        except ValueError:
            raise UnknownCommand(f"no output {text!r}") from None
        if number not in allowed:
            raise UnknownCommand(f"no output {number}; outputs here are {allowed}")
        return self._outputs[number]

    def _lakeshore(self, head: str, args: list[str]) -> str | None:
        self._advance()
        nargs = {"*IDN?": 0, "*CLS": 0, "KRDG?": 1, "RDGR?": 1, "SRDG?": 1, "SETP?": 1, "SETP": 2, "RANGE?": 1,
                 "RANGE": 2, "MOUT?": 1, "MOUT": 2, "STILL?": 0, "STILL": 1, "OUTMODE?": 1}  # fmt: skip
        if head in nargs and len(args) != nargs[head]:
            raise UnknownCommand(f"{head} takes {nargs[head]} argument(s), got {len(args)}")
        if head == "*IDN?":
            return "LSCI,MODEL372,LSCI-SIM,1.9"
        if head == "*CLS":
            return None
        if head in ("KRDG?", "RDGR?", "SRDG?"):
            stage = self._stage_of(args[0])
            if stage is None:
                return f"{0.0:+.5E}"
            kelvin = self._thermometer(stage)
            value = kelvin if head == "KRDG?" else R_INF_OHM * math.exp((T0_K / kelvin) ** 0.25)
            return f"{value:+.5E}"
        if head == "SETP?":
            return f"{self._output_of(args[0], (0, 1)).setpoint_k:+.5E}"
        if head == "SETP":
            self._output_of(args[0], (0, 1)).setpoint_k = _number(args[1], 0.0, 400.0)
            return None
        if head == "RANGE?":
            return str(self._output_of(args[0]).range)
        if head == "RANGE":
            out = self._output_of(args[0])
            top = len(SAMPLE_HEATER_RANGES_A) - 1 if out is self._outputs[0] else 1
            out.range = int(_number(args[1], 0, top, integer=True))
            return None
        if head == "HTR?":
            if len(args) > 1 or (args and args[0].strip() != "0"):
                raise UnknownCommand("HTR? reads the sample heater (output 0) only")
            return f"{self._output_pct(0):+.4E}"
        if head == "MOUT?":
            return f"{self._output_of(args[0]).manual_pct:+.4E}"
        if head == "MOUT":
            self._output_of(args[0]).manual_pct = _number(args[1], 0.0, 100.0)
            return None
        if head == "STILL?":
            return f"{self._outputs[2].manual_pct:+.4E}"
        if head == "STILL":
            self._outputs[2].manual_pct = _number(args[0], 0.0, 100.0)
            return None
        if head == "OUTMODE?":
            out = self._output_of(args[0])
            return f"{out.mode},{6 if out is self._outputs[0] else 0},0,0,1,1"
        if head == "OUTMODE":
            if len(args) < 2:
                raise UnknownCommand("OUTMODE takes <output>,<mode>[,...]")
            mode = int(_number(args[1], 0, 6, integer=True))
            if mode not in (MODE_OFF, MODE_OPEN_LOOP, MODE_CLOSED_LOOP):
                raise UnknownCommand(f"output mode {mode} is not simulated; modes: 0 off, 2 open loop, 5 closed loop")
            self._output_of(args[0]).mode = mode
            return None
        raise UnknownCommand(f"the simulated Lake Shore 372 does not know {head!r}")

    # ---- Lake Shore 336 commands ---------------------------------------------------

    def _output336(self, text: str, allowed: tuple[int, ...] = (1, 2, 3, 4)) -> _Output:
        try:
            number = int(text)
        except ValueError:
            raise UnknownCommand(f"no output {text!r}") from None
        if number not in allowed:
            raise UnknownCommand(f"no output {number}; outputs here are {allowed}")
        return self._outputs336[number]

    def _lakeshore336(self, head: str, args: list[str]) -> str | None:
        self._advance()
        nargs = {"*IDN?": 0, "*CLS": 0, "KRDG?": 1, "SRDG?": 1, "SETP?": 1, "SETP": 2, "RANGE?": 1, "RANGE": 2,
                 "HTR?": 1, "MOUT?": 1, "MOUT": 2}  # fmt: skip
        if len(args) != nargs[head]:
            raise UnknownCommand(f"{head} takes {nargs[head]} argument(s), got {len(args)}")
        if head == "*IDN?":
            return "LSCI,MODEL336,LSA1SIM/0000001,2.9"
        if head == "*CLS":
            return None
        if head in ("KRDG?", "SRDG?"):
            name = args[0].upper()
            if name not in INPUTS_336:
                raise UnknownCommand(f"no input {args[0]!r}; inputs are A-D")
            place = self.options.magnet_inputs.get(name)
            if place is None:
                return "+0.00000"
            kelvin = self._thermometer(place, f"ls336:{name}")
            value = kelvin if head == "KRDG?" else R_INF_OHM * math.exp((T0_K / kelvin) ** 0.25)
            return f"{value:+.6g}"
        if head == "SETP?":
            return f"{self._output336(args[0]).setpoint_k:+.6g}"
        if head == "SETP":
            self._output336(args[0]).setpoint_k = _number(args[1], 0.0, 1500.0)
            return None
        if head == "RANGE?":
            return str(self._output336(args[0]).range)
        if head == "RANGE":
            number = int(_number(args[0], 1, 4, integer=True))
            top = 3 if number <= 2 else 1
            self._outputs336[number].range = int(_number(args[1], 0, top, integer=True))
            return None
        if head == "HTR?":
            self._output336(args[0], (1, 2))
            full = self._magnet_full_w()
            pct = 100.0 * math.sqrt(self._magnet_power() / full) if args[0].strip() == "1" and full > 0 else 0.0
            return f"{pct:+.2f}"
        if head == "MOUT?":
            return f"{self._output336(args[0]).manual_pct:+.2f}"
        # MOUT
        self._output336(args[0]).manual_pct = _number(args[1], 0.0, 100.0)
        return None

    # ---- TPG answers ---------------------------------------------------------------

    def _tpg_data(self, mnemonic: str) -> str:
        self._advance()
        if mnemonic == "PR1":
            return self._gauge_reading(1)
        if mnemonic == "PR2":
            return self._gauge_reading(2)
        if mnemonic == "PRX":
            return f"{self._gauge_reading(1)},{self._gauge_reading(2)}"
        if mnemonic == "UNI":
            return "0"
        if mnemonic == "PNR":
            return "LABCTL-SIM-1.0"
        return "PKR,PKR"  # TID: gauge identification


def _number(text: str, low: float, high: float, *, integer: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UnknownCommand(f"expected a number, got {text!r}") from None
    if not low <= value <= high or (integer and not value.is_integer()):
        kind = "an integer" if integer else "a number"
        raise UnknownCommand(f"expected {kind} in [{low:g}, {high:g}], got {text!r}")
    return value


class PlantEndpoint:
    """One link into the plant: the simulated instrument a driver talks to.

    Each link keeps its own TPG hand-shake state (the last acknowledged mnemonic),
    so a bridge and a gauge sharing a plant never disturb each other.

    Args:
        plant: The plant.
        protocols: The command sets this link answers.
    """

    def __init__(self, plant: CryostatPlant, protocols: frozenset[str]) -> None:
        self.plant = plant
        self.protocols = protocols
        self._pending: str | None = None

    def handle(self, command: str) -> str | None:
        """Answer one command (see the module docstring for the command set).

        Raises:
            UnknownCommand: a Lake Shore command that is malformed or unknown.
        """
        if "tpg" in self.protocols:
            if command == ENQ:
                if self._pending is None:
                    return NAK
                return self.plant._tpg_data(self._pending)
            if command.strip() in TPG_MNEMONICS:
                self._pending = command.strip()
                return ACK
        head, _, rest = command.strip().partition(" ")
        head = head.upper()
        args = [a.strip() for a in rest.split(",")] if rest.strip() else []
        if "lakeshore372" in self.protocols and head in LAKESHORE_HEADS:
            return self.plant._lakeshore(head, args)
        if "lakeshore336" in self.protocols and head in LAKESHORE336_HEADS:
            return self.plant._lakeshore336(head, args)
        if "tpg" in self.protocols:
            return NAK
        model = "336" if "lakeshore336" in self.protocols else "372"
        raise UnknownCommand(f"the simulated Lake Shore {model} does not know {command!r}")
