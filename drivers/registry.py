"""From site-file configuration to running drivers and simulated plants.

Theory of operation: the server (and the site-file checker) never import a driver
module by name. They ask this module:

* :func:`check_instrument` -- every problem with one instrument's configuration, as
  ``(key path inside the instrument, message)`` pairs, the shape
  :meth:`labctl.ioc.config.site.CoreSiteConfig.cross_check` uses, so the checker can prefix
  ``instruments[i]`` and point at a line and column: unknown driver, unknown option,
  a PV bound to a channel the driver lacks, a writable PV on a read-only channel, a PV
  type that does not fit the channel, drive limits beyond the instrument's, an enum
  with too few states, a simulation that does not speak the driver's protocol, a
  missing pyvisa-sim file;
* :func:`list_channels` -- the channels a configured instrument offers;
* :func:`create_plant` -- a simulated plant from a ``simulations:`` entry;
* :func:`create_driver` -- the driver with its transport, raising
  :class:`~labctl.ioc.errors.ConfigError` listing every problem if the configuration is wrong.

Transports are chosen from the instrument config: ``simulation: <name>`` talks to that
plant through a :class:`~labctl.drivers.transport.SimulationTransport`; ``visa_library:
'@sim'`` opens the driver's shipped ``drivers/sim/<driver>.yaml`` (or ``sim_file``,
relative to the site file's directory) in pyvisa-sim; anything else is a real VISA
resource. Simulated instruments are wrapped in a
:class:`~labctl.drivers.transport.FaultyTransport`, so the demo and tests can make one
stop answering (see :func:`fault_injector`).

A PV binds to ``channel`` if it gives one, else to a channel named like the PV (the
generic SCPI driver names its channels that way).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from labctl.drivers.base import KINDS_FOR_PV_TYPE, BoundChannel, Problem, VisaDriver
from labctl.drivers.cryostat import PROTOCOLS as CRYOSTAT_PROTOCOLS
from labctl.drivers.cryostat import CryostatOptions, CryostatPlant
from labctl.drivers.keithley2400 import Keithley2400
from labctl.drivers.lakeshore import LakeShore336, LakeShore372
from labctl.drivers.powersupply import PROTOCOLS as POWERSUPPLY_PROTOCOLS
from labctl.drivers.powersupply import PowerSupplyOptions, PowerSupplyPlant
from labctl.drivers.scpi import ScpiDriver
from labctl.drivers.sourcemeter import PROTOCOLS as SOURCEMETER_PROTOCOLS
from labctl.drivers.sourcemeter import SourceMeterOptions, SourceMeterPlant
from labctl.drivers.tpg import TPG
from labctl.drivers.transport import FaultyTransport, SimulationTransport, Transport, VisaTransport
from labctl.ioc.config.instruments import InstrumentConfig, SimulationConfig
from labctl.ioc.errors import ConfigError
from labctl.ioc.types import PVType

#: Driver name (the site file's ``driver:``) -> class.
DRIVERS: Mapping[str, type[VisaDriver]] = MappingProxyType(
    {cls.model: cls for cls in (LakeShore336, LakeShore372, Keithley2400, TPG, ScpiDriver)}
)

#: Where the shipped pyvisa-sim definitions live.
SIM_DIR = Path(__file__).resolve().parent / "sim"

#: Plant model (``simulations.<name>.model``) -> the protocols it speaks.
PLANT_PROTOCOLS: Mapping[str, frozenset[str]] = MappingProxyType({"cryostat": CRYOSTAT_PROTOCOLS, "sourcemeter": SOURCEMETER_PROTOCOLS, "powersupply": POWERSUPPLY_PROTOCOLS})

_PY_KIND_NAMES = {float: "float64", int: "int or enum", bool: "bool", str: "string", tuple: "float64[]"}


def sim_file_for(inst: InstrumentConfig, base_dir: str | Path | None = None) -> Path:
    """The pyvisa-sim definition an ``@sim`` instrument uses.

    Args:
        inst: The instrument.
        base_dir: The site file's directory (``sim_file`` is relative to it).
    """
    if inst.sim_file is not None:
        path = Path(inst.sim_file)
        return path if path.is_absolute() else Path(base_dir or ".") / path
    return SIM_DIR / f"{inst.driver}.yaml"


def _summary(channels: Mapping[str, BoundChannel]) -> str:
    """``temperature:{A,B}, setpoint:{1,2}, heater_output:0``: channel names grouped by family."""
    families: dict[str, list[str]] = {}
    for name in channels:
        family, colon, suffix = name.partition(":")
        families.setdefault(family if colon else name, []).append(suffix if colon else "")
    parts = []
    for family, suffixes in families.items():
        if suffixes == [""]:
            parts.append(family)
        elif len(suffixes) == 1:
            parts.append(f"{family}:{suffixes[0]}")
        else:
            parts.append(f"{family}:{{{','.join(suffixes)}}}")
    return ", ".join(parts) or "(none)"


def list_channels(inst: InstrumentConfig) -> tuple[str, ...]:
    """The channels ``inst``'s driver serves (for ``scpi``: one per valid PV).

    Raises:
        ConfigError: the driver name is unknown.
    """
    cls = _driver_class(inst)
    channels, _ = cls.bind_config(inst)
    return tuple(channels)


def _driver_class(inst: InstrumentConfig) -> type[VisaDriver]:
    try:
        return DRIVERS[inst.driver]
    except KeyError:
        raise ConfigError(f"instrument {inst.name!r}", [_unknown_driver(inst)[1]]) from None


def _unknown_driver(inst: InstrumentConfig) -> Problem:
    return (("driver",), f"unknown driver {inst.driver!r}; drivers: {', '.join(sorted(DRIVERS))}")


def _protocols_of(simulation: Any) -> frozenset[str] | None:
    if isinstance(simulation, SimulationConfig):
        return PLANT_PROTOCOLS.get(simulation.model)
    return getattr(simulation, "protocols", None)


def check_instrument(
    inst: InstrumentConfig,
    *,
    simulations: Mapping[str, Any] | None = None,
    base_dir: str | Path | None = None,
) -> list[Problem]:
    """Every problem with one instrument's configuration.

    Args:
        inst: The instrument.
        simulations: Simulation name -> its :class:`~labctl.ioc.config.instruments.SimulationConfig` or
            plant (None: do not check the simulation).
        base_dir: The site file's directory, for ``sim_file``.

    Returns:
        ``(key path inside the instrument, message)`` pairs; empty if all is well.
    """
    cls = DRIVERS.get(inst.driver)
    if cls is None:
        return [_unknown_driver(inst)]
    channels, problems = cls.bind_config(inst)
    summary = _summary(channels)
    for i, pv in enumerate(inst.pvs):
        name = pv.channel or pv.name
        where = ("pvs", i, "channel" if pv.channel else "name")
        channel = channels.get(name)
        if channel is None:
            if inst.driver == "scpi":
                continue  # its spec problem is already listed
            if pv.channel:
                problems.append((where, f"PV {pv.name}: the {cls.model} driver has no channel {name!r}; channels: {summary}"))
            else:
                problems.append(
                    (where, f"PV {pv.name}: no 'channel' given and no {cls.model} channel has this name; channels: {summary}")
                )
            continue
        problems.extend(_check_binding(i, pv, channel))
    problems.extend(_check_source(inst, cls, simulations, base_dir))
    return problems


def _check_binding(i: int, pv: Any, channel: BoundChannel) -> list[Problem]:
    spec = channel.spec
    out: list[Problem] = []
    if spec.kind not in KINDS_FOR_PV_TYPE[pv.type]:
        out.append(
            (("pvs", i, "type"), f"PV {pv.name}: channel {channel.name!r} gives {_PY_KIND_NAMES[spec.kind]} values, not {pv.type.value}")
        )
        return out
    if pv.writable and not spec.writable:
        out.append((("pvs", i, "writable"), f"PV {pv.name}: channel {channel.name!r} is read-only"))
    if not pv.writable and not spec.readable:
        out.append((("pvs", i, "writable"), f"PV {pv.name}: channel {channel.name!r} cannot be read, so the PV must be writable"))
    if pv.drive is not None and spec.limits is not None:
        low, high = spec.limits
        if pv.drive[0] < low or pv.drive[1] > high:
            out.append(
                (("pvs", i, "drive"), f"PV {pv.name}: drive limits {list(pv.drive)} exceed what {channel.name!r} takes, [{low:g}, {high:g}]")
            )
    if pv.type is PVType.ENUM and spec.values:
        needed = max(spec.values) + 1
        if isinstance(needed, int) and len(pv.states) < needed:
            out.append(
                (("pvs", i, "states"), f"PV {pv.name}: channel {channel.name!r} takes values up to {needed - 1}, so it needs {needed} states, not {len(pv.states)}")
            )
    return out


def _check_source(
    inst: InstrumentConfig, cls: type[VisaDriver], simulations: Mapping[str, Any] | None, base_dir: str | Path | None
) -> list[Problem]:
    out: list[Problem] = []
    protocol = cls.protocol or cls.model
    if inst.simulation is not None:
        if simulations is not None:
            if inst.simulation not in simulations:
                out.append((("simulation",), f"unknown simulation {inst.simulation!r}; declared: {sorted(simulations)}"))
            else:
                speaks = _protocols_of(simulations[inst.simulation])
                if speaks is None or protocol not in speaks:
                    spoken = ", ".join(sorted(speaks or ())) or "nothing"
                    out.append(
                        (("simulation",), f"simulation {inst.simulation!r} cannot host the {cls.model} driver; it speaks {spoken}")
                    )
        if inst.sim_file is not None:
            out.append((("sim_file",), "'sim_file' is for pyvisa-sim ('visa_library: \"@sim\"'), not a simulation"))
    elif inst.visa_library == "@sim":
        path = sim_file_for(inst, base_dir)
        if not path.is_file():
            shipped = "" if inst.sim_file else f" (the {cls.model} driver ships none)"
            out.append((("sim_file",) if inst.sim_file else ("visa_library",), f"pyvisa-sim file {str(path)!r} not found{shipped}"))
    elif inst.sim_file is not None:
        out.append((("sim_file",), "'sim_file' applies only with 'visa_library: \"@sim\"'"))
    return out


def _dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def create_driver(
    inst: InstrumentConfig,
    *,
    simulations: Mapping[str, Any],
    base_dir: str | Path | None = None,
) -> VisaDriver:
    """The driver for ``inst``, with its transport (not yet connected).

    Args:
        inst: The instrument.
        simulations: Simulation name -> plant (from :func:`create_plant`).
        base_dir: The site file's directory, for ``sim_file``.

    Raises:
        ConfigError: listing every problem :func:`check_instrument` finds.
    """
    problems = check_instrument(inst, simulations=simulations, base_dir=base_dir)
    if problems:
        raise ConfigError(f"instrument {inst.name!r}", [f"instrument {inst.name}: {_dotted(p)}: {m}" for p, m in problems])
    cls = DRIVERS[inst.driver]
    channels, _ = cls.bind_config(inst)
    transport = _create_transport(inst, cls, simulations, base_dir)
    return cls(inst.name, transport, channels, options=inst.options)


def _create_transport(
    inst: InstrumentConfig, cls: type[VisaDriver], simulations: Mapping[str, Any], base_dir: str | Path | None
) -> Transport:
    if inst.simulation is not None:
        endpoint = simulations[inst.simulation].endpoint(cls.protocol or cls.model)
        return FaultyTransport(SimulationTransport(inst.name, endpoint, timeout_s=inst.timeout_s))
    assert inst.resource is not None  # InstrumentConfig requires resource or simulation
    write_termination, read_termination = cls.terminations_for(inst.options)
    simulated = inst.visa_library == "@sim"
    visa = VisaTransport(
        inst.name,
        inst.resource,
        library=inst.visa_library,
        sim_file=sim_file_for(inst, base_dir) if simulated else None,
        timeout_s=inst.timeout_s,
        write_termination=write_termination,
        read_termination=read_termination,
        serial=cls.serial_for(inst.options),
    )
    return FaultyTransport(visa) if simulated else visa


def create_plant(name: str, config: SimulationConfig, clock: Callable[[], float] = time.monotonic) -> CryostatPlant | SourceMeterPlant | PowerSupplyPlant:
    """The simulated plant for a ``simulations:`` entry.

    Args:
        name: The simulation's name.
        config: Its configuration.
        clock: Monotonic seconds driving the plant's dynamics.

    Raises:
        ConfigError: unknown model or bad options, one line per problem.
    """
    if config.model == "sourcemeter":
        try:
            return SourceMeterPlant(SourceMeterOptions.from_mapping(config.options), name=name)
        except ValueError as e:
            raise ConfigError(f"simulation {name!r}", [f"simulations.{name}.options: {line}" for line in str(e).splitlines()]) from None
    if config.model == "powersupply":
        try:
            return PowerSupplyPlant(PowerSupplyOptions.from_mapping(config.options), clock=clock, name=name)
        except ValueError as e:
            raise ConfigError(f"simulation {name!r}", [f"simulations.{name}.options: {line}" for line in str(e).splitlines()]) from None
    if config.model != "cryostat":
        raise ConfigError(f"simulation {name!r}", [f"simulations.{name}.model: unknown plant model {config.model!r}"])
    try:
        options = CryostatOptions.from_mapping(config.options)
    except ValueError as e:
        raise ConfigError(f"simulation {name!r}", [f"simulations.{name}.options: {line}" for line in str(e).splitlines()]) from None
    return CryostatPlant(options, clock=clock, name=name)


def fault_injector(driver: VisaDriver) -> FaultyTransport | None:
    """The fault-injecting transport of a simulated instrument (None for real hardware)."""
    transport = driver.transport
    return transport if isinstance(transport, FaultyTransport) else None
