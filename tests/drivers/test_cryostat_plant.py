"""The cryostat plant: dynamics on an injected clock, and the real drivers talking to it."""

from __future__ import annotations

import itertools
import math

import pytest
from labctl.drivers.cryostat import ACK, ENQ, NAK, CryostatOptions, CryostatPlant, UnknownCommand
from labctl.drivers.registry import create_driver, create_plant, fault_injector
from labctl.drivers.values import NoReading
from labctl.ioc.config.instruments import InstrumentConfig, SimulationConfig
from labctl.ioc.errors import ConfigError, DriverFault, DriverTimeout
from labctl.ioc.types import Status

from tests.drivers.fakes import FakeClock

BASE, COOLING, TAU_MXC = 0.010, 8.4e-3, 120.0


def magnet_controller(plant: CryostatPlant):
    inst = InstrumentConfig.model_validate({"name": "magtc", "driver": "lakeshore336", "simulation": "cryo"})
    return create_driver(inst, simulations={"cryo": plant})


def bridge_and_gauge(plant: CryostatPlant):
    bridge = InstrumentConfig.model_validate({"name": "bridge", "driver": "lakeshore372", "simulation": "cryo"})
    gauge = InstrumentConfig.model_validate({"name": "gauge", "driver": "tpg", "simulation": "cryo"})
    sims = {"cryo": plant}
    return create_driver(bridge, simulations=sims), create_driver(gauge, simulations=sims)


async def connected(*drivers):
    for d in drivers:
        await d.connect()
    return drivers


def lag(target: float, start: float, elapsed: float, tau: float) -> float:
    return target + (start - target) * math.exp(-elapsed / tau)


def test_cold_start_is_settled(clock):
    plant = CryostatPlant(clock=clock)
    expected = {"50K": 42.0, "4K": 3.1, "still": 0.75, "mxc": BASE}
    assert plant.temperatures() == expected
    clock.advance(3600)
    assert plant.temperatures() == expected
    assert plant.circulating() and plant.compressor_running


async def test_closed_loop_heater_warms_the_mixing_chamber_with_its_time_constant(clock):
    plant = CryostatPlant(clock=clock)
    bridge, gauge = await connected(*bridge_and_gauge(plant))
    assert bridge.identity.startswith("LSCI,MODEL372")
    assert await bridge.write("setpoint:0", 0.1) == 0.1
    assert await bridge.write("heater_range:0", 5) == 5  # 3.16 mA into 120 ohm
    # The ideal controller delivers the power that holds 0.1 K: P = k (T^2 - T_base^2).
    power = COOLING * (0.1**2 - BASE**2)
    assert plant.heater_power(0) == pytest.approx(power, rel=1e-12)
    full = 3.16e-3**2 * 120.0
    values = await bridge.read(["heater_output:0"])
    assert values["heater_output:0"] == pytest.approx(100 * math.sqrt(power / full), rel=1e-4)

    clock.advance(TAU_MXC)
    values = await bridge.read(["temperature:6", "resistance:6"])
    assert values["temperature:6"] == pytest.approx(lag(0.1, BASE, TAU_MXC, TAU_MXC), rel=1e-5)
    kelvin = values["temperature:6"]
    assert values["resistance:6"] == pytest.approx(800.0 * math.exp((1.64 / kelvin) ** 0.25), rel=1e-4)

    clock.advance(9 * TAU_MXC)
    assert (await bridge.read(["temperature:6"]))["temperature:6"] == pytest.approx(0.1, rel=1e-3)
    # the other stages did not move
    assert (await bridge.read(["temperature:1", "temperature:2", "temperature:5"])) == {
        "temperature:1": 42.0,
        "temperature:2": 3.1,
        "temperature:5": 0.75,
    }


def test_open_loop_power_goes_as_the_square_of_the_output(clock):
    plant = CryostatPlant(clock=clock)
    for command in ("OUTMODE 0,2,6,0,0,1,0", "RANGE 0,4", "MOUT 0,50"):
        assert plant.handle(command) is None
    power = (1e-3) ** 2 * 120.0 * 0.25
    assert plant.heater_power(0) == pytest.approx(power, rel=1e-12)
    target = math.sqrt(BASE**2 + power / COOLING)
    clock.advance(TAU_MXC)
    assert plant.temperature("mxc") == pytest.approx(lag(target, BASE, TAU_MXC, TAU_MXC), rel=1e-12)
    assert float(plant.handle("HTR?")) == pytest.approx(50.0)


def test_closed_loop_saturates_when_the_range_is_too_small(clock):
    plant = CryostatPlant(clock=clock)
    plant.handle("SETP 0,0.5")
    plant.handle("RANGE 0,2")  # 100 µA: at most 1.2 µW
    assert float(plant.handle("HTR? 0")) == pytest.approx(100.0)
    clock.advance(20 * TAU_MXC)
    assert plant.temperature("mxc") == pytest.approx(math.sqrt(BASE**2 + 1.2e-6 / COOLING), rel=1e-6)


def test_result_does_not_depend_on_how_often_the_plant_is_asked():
    # Each integration step is exact for inputs held over it, so one 600 s jump and
    # 600 one-second polls agree to rounding.
    clocks = [FakeClock(), FakeClock()]
    plants = [CryostatPlant(clock=c) for c in clocks]
    for plant in plants:
        plant.handle("SETP 0,0.05")
        plant.handle("RANGE 0,5")
    clocks[0].advance(600)
    for _ in range(600):
        clocks[1].advance(1)
        plants[1].temperature("mxc")
    assert plants[1].temperature("mxc") == pytest.approx(plants[0].temperature("mxc"), rel=1e-12)


async def test_compressor_stop_warms_every_stage_and_the_vacuum_follows(clock):
    plant = CryostatPlant(clock=clock)
    bridge, gauge = await connected(*bridge_and_gauge(plant))
    cold = await gauge.read(["pressure:1", "pressure:2"])
    assert cold == {"pressure:1": pytest.approx(2e-8), "pressure:2": pytest.approx(5e-7)}

    plant.stop_compressor()
    history = []
    for _ in range(6):
        clock.advance(600)
        t = await bridge.read(["temperature:1", "temperature:2", "temperature:5", "temperature:6"])
        p = await gauge.read(["pressure:1", "pressure:2"])
        history.append((t, p))
    # The 50 K plate warms toward ambient with its warm-up time constant, exactly.
    assert history[-1][0]["temperature:1"] == pytest.approx(lag(295.0, 42.0, 3600, 20000.0), rel=1e-5)
    for (t0, p0), (t1, p1) in itertools.pairwise(history):
        for channel in t0:
            assert t1[channel] > t0[channel]
        assert p1["pressure:1"] > p0["pressure:1"] and p1["pressure:2"] > p0["pressure:2"]
    final_t, final_p = history[-1]
    assert not plant.circulating()
    assert final_t["temperature:6"] > 1.0 and final_t["temperature:2"] > 30.0
    assert final_p["pressure:1"] > 1e-6

    plant.start_compressor()
    clock.advance(24 * 3600)
    assert plant.circulating()
    assert plant.temperature("mxc") == pytest.approx(BASE, rel=1e-3)
    assert (await gauge.read(["pressure:1"]))["pressure:1"] == pytest.approx(2e-8, rel=1e-3)


def test_pressure_follows_temperature_between_cold_and_warm(clock):
    warm = CryostatPlant(CryostatOptions(start="warm", compressor_running=False), clock=clock)
    assert warm.temperatures() == {stage: 295.0 for stage in ("50K", "4K", "still", "mxc")}
    assert warm.pressure(1) == pytest.approx(5e-3) and warm.pressure(2) == pytest.approx(2e-4)
    cold = CryostatPlant(clock=clock)
    assert cold.pressure(1) == pytest.approx(2e-8) and cold.pressure(2) == pytest.approx(5e-7)
    # a warm start with the compressor running cools down, and the pressure with it
    cooling = CryostatPlant(CryostatOptions(start="warm"), clock=clock)
    before = cooling.pressure(1)
    clock.advance(3600)
    assert cooling.temperature("4K") < 295.0 and cooling.pressure(1) < before


async def test_forced_gauge_status_reaches_the_driver(clock):
    plant = CryostatPlant(clock=clock)
    _, gauge = await connected(*bridge_and_gauge(plant))
    plant.set_gauge_status(2, 3)
    values = await gauge.read(["pressure:1", "pressure:2", "status:2"])
    assert values["pressure:2"] == NoReading(Status.READ, "sensor error") and values["status:2"] == 3
    assert values["pressure:1"] == pytest.approx(2e-8)
    plant.set_gauge_status(2, None)
    assert (await gauge.read(["status:2"]))["status:2"] == 0
    with pytest.raises(ValueError):
        plant.set_gauge_status(3, 0)


def test_each_link_keeps_its_own_handshake(clock):
    plant = CryostatPlant(clock=clock)
    first, second = plant.endpoint("tpg"), plant.endpoint("tpg")
    assert first.handle(ENQ) == NAK  # nothing asked yet
    assert first.handle("PR1") == ACK and second.handle("PR2") == ACK
    assert first.handle(ENQ) == "0,2.0000E-08"
    assert second.handle(ENQ) == "0,5.0000E-07"
    assert first.handle("WHAT") == NAK
    with pytest.raises(ValueError, match="speaks lakeshore336, lakeshore372, tpg, not keithley2400"):
        plant.endpoint("keithley2400")


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("KRDG? 17", "no input '17'"),
        ("KRDG?", "takes 1 argument"),
        ("SETP 0,cold", "expected a number"),
        ("SETP 2,0.1", "no output 2"),
        ("RANGE 1,2", "expected an integer in \\[0, 1\\]"),
        ("OUTMODE 0,3", "output mode 3 is not simulated"),
        ("HTR? 1", "sample heater \\(output 0\\) only"),
        ("FOO 1", "does not know 'FOO 1'"),
    ],
)
def test_lakeshore_commands_it_refuses(clock, command, message):
    endpoint = CryostatPlant(clock=clock).endpoint("lakeshore372")
    with pytest.raises(UnknownCommand, match=message):
        endpoint.handle(command)


async def test_a_refused_command_is_a_driver_fault(clock):
    bridge, _ = await connected(*bridge_and_gauge(CryostatPlant(clock=clock)))
    with pytest.raises(DriverFault, match="bridge: the simulation refused 'FOO\\?'"):
        await bridge.transport.query("FOO?")


async def test_the_demo_can_kill_the_gauge(clock):
    plant = CryostatPlant(clock=clock)
    bridge, gauge = await connected(*bridge_and_gauge(plant))
    injector = fault_injector(gauge)
    assert injector is not None
    injector.stop_answering(wait_s=0)
    with pytest.raises(DriverTimeout, match="gauge: no answer to 'PR1'"):
        await gauge.read(["pressure:1"])
    # the bridge on the same plant is unaffected
    assert (await bridge.read(["temperature:6"]))["temperature:6"] == BASE
    injector.resume()
    assert (await gauge.read(["pressure:1"]))["pressure:1"] == pytest.approx(2e-8)


def test_create_plant_validates_options(clock):
    plant = create_plant("cryo", SimulationConfig(model="cryostat", options={"mxc_base_k": 0.02, "tau_s": {"mxc": 60}}), clock)
    assert plant.temperature("mxc") == 0.02 and plant.options.tau_s["mxc"] == 60.0 and plant.options.tau_s["4K"] == 1200.0
    bad = {"colour": "blue", "mxc_base_k": -1, "start": "tepid", "tau_s": {"mk": 1}, "channels": {"20": "mxc"}}
    with pytest.raises(ConfigError) as info:
        create_plant("cryo", SimulationConfig(model="cryostat", options=bad), clock)
    lines = info.value.problems
    assert len(lines) == 5
    assert all(line.startswith("simulations.cryo.options: ") for line in lines)
    assert any("unknown cryostat option 'colour'" in line for line in lines)
    assert any("'mxc_base_k': must be positive" in line for line in lines)
    assert any("expected 'cold' or 'warm'" in line for line in lines)
    assert any("unknown stage 'mk'" in line for line in lines)
    assert any("channel '20'" in line for line in lines)


# ---- the magnet and its Lake Shore 336 -------------------------------------------------

TAU_MAGNET, K_PER_W = 300.0, 2.0


async def test_the_magnet_sits_on_the_4k_plate_and_its_336_reads_it(clock):
    plant = CryostatPlant(clock=clock)
    (magtc,) = await connected(magnet_controller(plant))
    assert magtc.identity.startswith("LSCI,MODEL336")
    values = await magtc.read(["temperature:A", "temperature:B", "temperature:C", "setpoint:1", "heater_range:1", "heater_output:1"])
    # A on the coil (at the 4 K plate's temperature, heater off), B on the leads' heat sink (50 K plate), C has no sensor
    assert values == {
        "temperature:A": 3.1, "temperature:B": 42.0, "temperature:C": 0.0,
        "setpoint:1": 4.2, "heater_range:1": 0, "heater_output:1": 0.0,
    }  # fmt: skip
    assert plant.temperature("magnet") == 3.1 and plant.magnet_heater_power() == 0.0
    assert "magnet" not in plant.temperatures()  # the refrigerator's stages only


async def test_the_magnet_heater_holds_its_setpoint_with_the_coil_time_constant(clock):
    plant = CryostatPlant(clock=clock)
    (magtc,) = await connected(magnet_controller(plant))
    assert await magtc.write("setpoint:1", 4.0) == 4.0
    assert await magtc.write("heater_range:1", 3) == 3  # high: 1 W
    power = (4.0 - 3.1) / K_PER_W  # what holds the coil at 4.0 K
    assert plant.magnet_heater_power() == pytest.approx(power, rel=1e-12)
    assert (await magtc.read(["heater_output:1"]))["heater_output:1"] == pytest.approx(100 * math.sqrt(power), abs=0.01)
    clock.advance(TAU_MAGNET)
    assert plant.temperature("magnet") == pytest.approx(lag(4.0, 3.1, TAU_MAGNET, TAU_MAGNET), rel=1e-12)
    clock.advance(20 * TAU_MAGNET)
    assert (await magtc.read(["temperature:A"]))["temperature:A"] == pytest.approx(4.0, rel=1e-5)
    # too small a range saturates: low is 10 mW, 20 mK above the plate
    assert await magtc.write("heater_range:1", 1) == 1
    clock.advance(30 * TAU_MAGNET)
    assert plant.temperature("magnet") == pytest.approx(3.1 + K_PER_W * 0.01, rel=1e-9)
    assert (await magtc.read(["heater_output:1"]))["heater_output:1"] == 100.0
    assert await magtc.write("heater_range:1", 0) == 0
    clock.advance(30 * TAU_MAGNET)
    assert plant.temperature("magnet") == pytest.approx(3.1, rel=1e-9)


async def test_the_magnet_warms_with_the_cryostat(clock):
    plant = CryostatPlant(clock=clock)
    (magtc,) = await connected(magnet_controller(plant))
    plant.stop_compressor()
    before = await magtc.read(["temperature:A", "temperature:B"])
    clock.advance(3600)
    after = await magtc.read(["temperature:A", "temperature:B"])
    assert after["temperature:A"] > before["temperature:A"] + 1.0 and after["temperature:B"] > before["temperature:B"] + 1.0
    # the coil follows the plate it is mounted on, a time constant behind
    plate = plant.temperature("4K")
    assert 0.9 * plate < plant.temperature("magnet") < plate


async def test_magnet_readings_move_as_real_ones_and_repeat_with_the_seed(clock):
    options = CryostatOptions(noise=0.003, drift=0.01, seed=18)
    runs = []
    for _ in range(2):
        clock.now = 1000.0
        (magtc,) = await connected(magnet_controller(CryostatPlant(options, clock=clock)))
        readings = []
        for _ in range(5):
            clock.advance(2.0)
            readings.append(await magtc.read(["temperature:A", "temperature:B"]))
        runs.append(readings)
    assert runs[0] == runs[1]  # seeded: the same readings every run
    coil = [r["temperature:A"] for r in runs[0]]
    assert len(set(coil)) == len(coil)  # every reading differs...
    assert all(abs(t - 3.1) < 3.1 * 0.05 for t in coil)  # ...around the coil's temperature


def test_magnet_inputs_place_the_336_thermometers(clock):
    plant = create_plant("cryo", SimulationConfig(model="cryostat", options={"magnet_inputs": {"a": "still", "D": "magnet"}}), clock)
    link = plant.endpoint("lakeshore336")
    assert float(link.handle("KRDG? A")) == 0.75 and float(link.handle("KRDG? D")) == 3.1
    assert float(link.handle("KRDG? B")) == 0.0
    with pytest.raises(ConfigError, match="input 'E'"):
        create_plant("cryo", SimulationConfig(model="cryostat", options={"magnet_inputs": {"E": "magnet"}}), clock)
    with pytest.raises(ConfigError, match="places 50K, 4K, still, mxc, magnet"):
        create_plant("cryo", SimulationConfig(model="cryostat", options={"magnet_inputs": {"A": "coil"}}), clock)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("KRDG? E", "no input 'E'"),
        ("SETP 5,4.2", "no output 5"),
        ("RANGE 1,4", "expected an integer in \\[0, 3\\]"),
        ("RANGE 3,2", "expected an integer in \\[0, 1\\]"),
        ("HTR? 3", "no output 3"),
        ("MOUT 1,101", "expected a number in \\[0, 100\\]"),
        ("OUTMODE? 1", "Lake Shore 336 does not know 'OUTMODE\\? 1'"),
    ],
)
def test_lakeshore336_commands_it_refuses(clock, command, message):
    endpoint = CryostatPlant(clock=clock).endpoint("lakeshore336")
    with pytest.raises(UnknownCommand, match=message):
        endpoint.handle(command)


def test_lakeshore336_settings_round_trip(clock):
    endpoint = CryostatPlant(clock=clock).endpoint("lakeshore336")
    for command, query, reply in [("SETP 2,77.5", "SETP? 2", "+77.5"), ("RANGE 2,2", "RANGE? 2", "2"), ("MOUT 4,12.5", "MOUT? 4", "+12.50")]:
        assert endpoint.handle(command) is None
        assert endpoint.handle(query) == reply
    assert endpoint.handle("HTR? 2") == "+0.00"  # output 2 heats nothing in the plant
