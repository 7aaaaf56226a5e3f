"""The registry: choosing drivers and transports, and checking bindings before anything runs."""

from __future__ import annotations

import re

import pytest
from labctl.drivers.registry import (
    DRIVERS,
    SIM_DIR,
    check_instrument,
    create_driver,
    create_plant,
    fault_injector,
    list_channels,
)
from labctl.drivers.transport import FaultyTransport, SimulationTransport, VisaTransport
from labctl.ioc.config.instruments import InstrumentConfig, SimulationConfig
from labctl.ioc.driver import Driver
from labctl.ioc.errors import ConfigError, DriverTimeout

SIMULATIONS = {"cryo": SimulationConfig(model="cryostat")}


def inst(**fields) -> InstrumentConfig:
    fields.setdefault("name", "dev")
    if "simulation" not in fields:
        fields.setdefault("resource", "GPIB0::12::INSTR")
    return InstrumentConfig.model_validate(fields)


def test_every_driver_ships_a_simulation_and_implements_the_protocol():
    assert set(DRIVERS) == {"lakeshore336", "lakeshore372", "keithley2400", "tpg", "scpi"}
    for name, cls in DRIVERS.items():
        assert (SIM_DIR / f"{name}.yaml").is_file()
        driver = create_driver(inst(driver=name, visa_library="@sim"), simulations={})
        assert isinstance(driver, Driver)
        assert driver.name == "dev" and cls.model == name


def test_list_channels():
    assert list_channels(inst(driver="keithley2400")) == (
        "voltage",
        "current",
        "voltage_setpoint",
        "current_setpoint",
        "compliance_current",
        "compliance_voltage",
        "source_mode",
        "output_enabled",
    )
    assert list_channels(inst(driver="tpg")) == ("pressure:1", "pressure:2", "status:1", "status:2", "pressure_unit")
    ls336 = list_channels(inst(driver="lakeshore336"))
    assert {"temperature:A", "temperature:D", "setpoint:4", "heater_range:2", "heater_output:1"} <= set(ls336)
    ls372 = list_channels(inst(driver="lakeshore372"))
    assert {"temperature:A", "resistance:16", "setpoint:0", "heater_range:0", "heater_output:0", "manual_output:2"} <= set(ls372)
    scpi = inst(driver="scpi", pvs=[{"name": "A:B", "type": "float64", "read": "X?"}, {"name": "C", "type": "int", "read": "Y?", "channel": "y"}])
    assert list_channels(scpi) == ("A:B", "y")
    with pytest.raises(ConfigError, match="unknown driver 'keithley6517'"):
        list_channels(inst(driver="keithley6517"))


def test_transport_follows_the_configuration(tmp_path):
    real = create_driver(inst(driver="lakeshore336", resource="TCPIP0::10.0.0.5::7777::SOCKET", timeout_s=3), simulations={})
    assert type(real.transport) is VisaTransport and fault_injector(real) is None
    assert real.transport.library is None and real.transport.timeout_s == 3
    assert real.transport.serial["baud_rate"] == 57600  # applied only if the resource is serial

    sim = create_driver(inst(driver="lakeshore336", visa_library="@sim"), simulations={})
    assert isinstance(sim.transport, FaultyTransport)
    assert sim.transport.inner.sim_file == SIM_DIR / "lakeshore336.yaml"

    own = tmp_path / "mine.yaml"
    own.write_text((SIM_DIR / "lakeshore336.yaml").read_text())
    custom = create_driver(inst(driver="lakeshore336", visa_library="@sim", sim_file="mine.yaml"), simulations={}, base_dir=tmp_path)
    assert custom.transport.inner.sim_file == own

    plant = create_plant("cryo", SimulationConfig(model="cryostat"))
    bridge = create_driver(inst(driver="lakeshore372", simulation="cryo"), simulations={"cryo": plant})
    assert isinstance(bridge.transport.inner, SimulationTransport)

    scpi = create_driver(inst(driver="scpi", options={"write_termination": "\r\n", "baud_rate": 19200}), simulations={})
    assert scpi.transport.write_termination == "\r\n" and scpi.transport.read_termination == "\n"
    assert scpi.transport.serial == {"baud_rate": 19200}


def test_unknown_driver_is_named():
    with pytest.raises(ConfigError) as info:
        create_driver(inst(driver="lakeshore999"), simulations={})
    assert info.value.problems == [
        "instrument dev: driver: unknown driver 'lakeshore999'; drivers: keithley2400, lakeshore336, lakeshore372, scpi, tpg"
    ]


def test_unknown_channel_names_instrument_pv_and_the_valid_channels():
    config = inst(
        driver="tpg",
        pvs=[
            {"name": "VAC:P1", "type": "float64", "channel": "pressure:3"},
            {"name": "VAC:P2", "type": "float64"},
            {"name": "VAC:OK", "type": "float64", "channel": "pressure:2"},
        ],
    )
    problems = check_instrument(config)
    assert problems == [
        (
            ("pvs", 0, "channel"),
            "PV VAC:P1: the tpg driver has no channel 'pressure:3'; channels: pressure:{1,2}, status:{1,2}, pressure_unit",
        ),
        (
            ("pvs", 1, "name"),
            "PV VAC:P2: no 'channel' given and no tpg channel has this name; channels: pressure:{1,2}, status:{1,2}, pressure_unit",
        ),
    ]
    with pytest.raises(ConfigError) as info:
        create_driver(config, simulations={})
    assert str(info.value).splitlines()[0] == "instrument 'dev': 2 problems"
    assert info.value.problems[0].startswith("instrument dev: pvs[0].channel: PV VAC:P1: the tpg driver has no channel")


@pytest.mark.parametrize(
    ("pv", "key", "message"),
    [
        ({"type": "float64", "channel": "temperature:A", "writable": True}, "writable", "channel 'temperature:A' is read-only"),
        ({"type": "bool", "channel": "temperature:A"}, "type", "gives float64 values, not bool"),
        ({"type": "int", "channel": "setpoint:1"}, "type", "gives float64 values, not int"),
        ({"type": "float64", "channel": "setpoint:1", "writable": True, "drive": [0, 2000]}, "drive", "exceed what 'setpoint:1' takes, \\[0, 1500\\]"),
        ({"type": "enum", "states": ["off", "low"], "channel": "heater_range:1", "writable": True}, "states", "needs 4 states, not 2"),
        ({"type": "float64", "channel": "setpoint:1", "read": "SETP? 1"}, "read", "'read' is only for the scpi driver"),
    ],
)
def test_bindings_are_checked(pv, key, message):
    problems = check_instrument(inst(driver="lakeshore336", pvs=[{"name": "X:Y", **pv}]))
    assert len(problems) == 1
    (path, text), = problems
    assert path == ("pvs", 0, key) and text.startswith("PV X:Y: ")
    assert re.search(message, text)


def test_good_bindings_pass():
    config = inst(
        driver="lakeshore336",
        pvs=[
            {"name": "T:A", "type": "float64", "channel": "temperature:A"},
            {"name": "T:SP", "type": "float64", "channel": "setpoint:1", "writable": True, "drive": [0, 10]},
            {"name": "T:RANGE", "type": "enum", "states": ["off", "low", "med", "high"], "channel": "heater_range:1", "writable": True},
        ],
        options={"check_identity": False, "baud_rate": 9600},
    )
    assert check_instrument(config) == []


def test_options_are_checked():
    problems = check_instrument(inst(driver="keithley2400", options={"nplc": 1, "check_identity": "yes", "baud_rate": 9600.5}))
    assert [p for p, _ in problems] == [("options", "nplc"), ("options", "check_identity"), ("options", "baud_rate")]
    assert problems[0][1].startswith("unknown option for the keithley2400 driver; accepted: baud_rate, check_identity")


def test_simulation_must_speak_the_drivers_protocol():
    config = inst(driver="keithley2400", simulation="cryo")
    assert check_instrument(config, simulations=SIMULATIONS) == [
        (("simulation",), "simulation 'cryo' cannot host the keithley2400 driver; it speaks lakeshore336, lakeshore372, tpg")
    ]
    assert check_instrument(inst(driver="lakeshore372", simulation="cryo"), simulations=SIMULATIONS) == []
    assert check_instrument(inst(driver="lakeshore336", simulation="cryo"), simulations=SIMULATIONS) == []
    assert check_instrument(inst(driver="tpg", simulation="ice"), simulations=SIMULATIONS) == [
        (("simulation",), "unknown simulation 'ice'; declared: ['cryo']")
    ]
    plant = create_plant("cryo", SimulationConfig(model="cryostat"))
    with pytest.raises(ConfigError, match="cannot host the keithley2400 driver"):
        create_driver(config, simulations={"cryo": plant})


def test_pyvisa_sim_file_is_checked(tmp_path):
    missing = inst(driver="tpg", visa_library="@sim", sim_file="nowhere.yaml")
    problems = check_instrument(missing, base_dir=tmp_path)
    assert problems == [(("sim_file",), f"pyvisa-sim file {str(tmp_path / 'nowhere.yaml')!r} not found")]
    stray = inst(driver="tpg", sim_file="tpg.yaml")
    assert check_instrument(stray) == [(("sim_file",), "'sim_file' applies only with 'visa_library: \"@sim\"'")]


async def test_a_simulated_instrument_can_be_made_to_stop_answering(sim_file):
    config = inst(driver="lakeshore336", visa_library="@sim", sim_file=str(sim_file("lakeshore336")), timeout_s=30)
    driver = create_driver(config, simulations={})
    await driver.connect()
    try:
        injector = fault_injector(driver)
        injector.stop_answering(wait_s=0)  # the demo leaves wait_s out and waits the 30 s
        with pytest.raises(DriverTimeout, match="dev: no answer to 'KRDG\\? A'"):
            await driver.read(["temperature:A", "temperature:B"])
        with pytest.raises(DriverTimeout):
            await driver.connect()  # a reconnect fails too, at the identity query
        injector.resume()
        await driver.connect()
        assert await driver.read(["temperature:A"]) == {"temperature:A": 4.123}
    finally:
        await driver.close()
