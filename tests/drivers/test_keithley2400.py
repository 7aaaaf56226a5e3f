"""Keithley 2400: against pyvisa-sim, and exact conversations."""

from __future__ import annotations

import pytest
from labctl.drivers.keithley2400 import Keithley2400
from labctl.drivers.values import NoReading
from labctl.ioc.errors import DriverFault, OutOfRange
from labctl.ioc.types import Status

K2400 = "GPIB0::24::INSTR"
IDN = "KEITHLEY INSTRUMENTS INC.,MODEL 2400,4123456,C32   Oct  4 2010 14:20:11/A02  /S/K"
NO_ERROR = '0,"No error"'


# ---- against pyvisa-sim -------------------------------------------------------------


async def test_reads_every_channel_with_output_off(sim_driver):
    async with sim_driver(Keithley2400, K2400) as smu:
        values = await smu.read(smu.channels())
    assert set(values) == set(smu.channels())
    assert values["output_enabled"] is False
    # no measurement while the output is off: the channels read "disabled", not a NaN
    assert values["voltage"] == values["current"] == NoReading(Status.DISABLE, "output off")
    assert values["voltage_setpoint"] == 1.0
    assert values["compliance_current"] == 0.000105
    assert values["source_mode"] == 0


async def test_measures_with_output_on_and_setpoints_round_trip(sim_driver):
    async with sim_driver(Keithley2400, K2400) as smu:
        assert await smu.write("output_enabled", True) is True
        assert await smu.read(["voltage", "current"]) == {"voltage": 1.000012, "current": 9.98765e-05}
        assert await smu.write("voltage_setpoint", -2.5) == -2.5
        assert await smu.write("current_setpoint", 0.01) == 0.01
        assert await smu.write("compliance_current", 0.5) == 0.5
        assert await smu.write("compliance_voltage", 20) == 20.0
        assert await smu.write("source_mode", 1) == 1
        assert await smu.write("output_enabled", False) is False
        assert await smu.read(["voltage_setpoint", "source_mode", "output_enabled"]) == {
            "voltage_setpoint": -2.5,
            "source_mode": 1,
            "output_enabled": False,
        }


async def test_refuses_values_beyond_the_instrument(sim_driver):
    async with sim_driver(Keithley2400, K2400) as smu:
        with pytest.raises(OutOfRange):
            await smu.write("voltage_setpoint", 250.0)
        with pytest.raises(OutOfRange):
            await smu.write("compliance_current", -0.1)


async def test_a_query_the_instrument_does_not_know_fails_at_once(sim_driver):
    def without_read(text: str) -> str:
        return text.replace('      - q: ":READ?"\n        r: "+1.000012E+00,+9.987650E-05"\n', "")

    async with sim_driver(Keithley2400, K2400, edit=without_read, timeout_s=30) as smu:
        await smu.write("output_enabled", True)
        with pytest.raises(DriverFault, match="cannot read voltage: ':READ\\?' answered 'ERROR'"):
            await smu.read(["voltage", "current"])
        # the stale error reply is drained and the link is in step again
        assert await smu.read(["output_enabled", "voltage_setpoint"]) == {"output_enabled": True, "voltage_setpoint": 1.0}


async def test_rejects_another_instrument(sim_driver):
    with pytest.raises(DriverFault, match="not a keithley2400"):
        async with sim_driver(Keithley2400, "GPIB0::5::INSTR", model="scpi"):
            pass


# ---- exact conversations ------------------------------------------------------------


async def test_connect_sets_the_reading_format(expected_protocol):
    script = [("*IDN?", IDN), ("*CLS", None), (":FORM:ELEM VOLT,CURR", None), (":SYST:ERR?", NO_ERROR)]
    async with expected_protocol(Keithley2400, script, connect=True) as smu:
        assert smu.identity == IDN


async def test_voltage_and_current_come_from_one_read(expected_protocol):
    script = [(":OUTP?", "1"), (":READ?", "+1.500000E+00,-2.000000E-03")]
    async with expected_protocol(Keithley2400, script) as smu:
        assert await smu.read(["voltage", "current", "output_enabled"]) == {
            "voltage": 1.5,
            "current": -0.002,
            "output_enabled": True,
        }


async def test_output_off_means_no_measurement_and_no_trigger(expected_protocol):
    # :READ? would switch the output on, so it is never sent while the output is off.
    async with expected_protocol(Keithley2400, [(":OUTP?", "0"), (":SOUR:VOLT:LEV?", "+5.000000E+00")]) as smu:
        values = await smu.read(["current", "voltage_setpoint"])
    assert values == {"current": NoReading(Status.DISABLE, "output off"), "voltage_setpoint": 5.0}


async def test_write_checks_the_error_queue_then_reads_back(expected_protocol):
    script = [(":SOUR:VOLT:LEV 2.5", None), (":SYST:ERR?", NO_ERROR), (":SOUR:VOLT:LEV?", "+2.500000E+00")]
    async with expected_protocol(Keithley2400, script) as smu:
        assert await smu.write("voltage_setpoint", 2.5) == 2.5


async def test_output_and_source_mode_commands(expected_protocol):
    script = [
        (":OUTP 1", None),
        (":SYST:ERR?", NO_ERROR),
        (":OUTP?", "1"),
        (":SOUR:FUNC CURR", None),
        (":SYST:ERR?", NO_ERROR),
        (":SOUR:FUNC?", "CURR"),
    ]
    async with expected_protocol(Keithley2400, script) as smu:
        assert await smu.write("output_enabled", True) is True
        assert await smu.write("source_mode", 1) == 1


async def test_refused_write_reports_every_queued_error(expected_protocol):
    script = [
        (":SENS:CURR:PROT 1", None),
        (":SYST:ERR?", '-221,"Settings conflict"'),
        (":SYST:ERR?", '-222,"Data out of range"'),
        (":SYST:ERR?", NO_ERROR),
    ]
    async with expected_protocol(Keithley2400, script) as smu:
        with pytest.raises(DriverFault) as info:
            await smu.write("compliance_current", 1.0)
    assert str(info.value) == (
        "dut: ':SENS:CURR:PROT 1' was refused: -221 \"Settings conflict\"; -222 \"Data out of range\""
    )


async def test_unreadable_output_state_is_a_fault(expected_protocol):
    async with expected_protocol(Keithley2400, [(":OUTP?", "maybe")]) as smu:
        with pytest.raises(DriverFault, match="':OUTP\\?' answered 'maybe'"):
            await smu.read(["voltage"])


async def test_unknown_source_function_reply_is_a_fault(expected_protocol):
    async with expected_protocol(Keithley2400, [(":SOUR:FUNC?", "RES")]) as smu:
        with pytest.raises(DriverFault, match="expected one of VOLT, CURR"):
            await smu.read(["source_mode"])
