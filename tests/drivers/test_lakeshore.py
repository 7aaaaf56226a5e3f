"""Lake Shore 336 and 372: against pyvisa-sim, and exact conversations."""

from __future__ import annotations

import math

import pytest
from labctl.drivers.lakeshore import LakeShore336, LakeShore372
from labctl.ioc.errors import DriverFault, DriverTimeout, NotWritable, OutOfRange, WrongType

LS336 = "TCPIP0::127.0.0.1::7777::SOCKET"
LS372 = "GPIB0::13::INSTR"
IDN_336 = "LSCI,MODEL336,LSA1SIM/#######,2.9"


# ---- against pyvisa-sim -------------------------------------------------------------


async def test_336_reads_every_channel(sim_driver):
    async with sim_driver(LakeShore336, LS336) as ls:
        assert ls.identity == IDN_336
        values = await ls.read(ls.channels())
    assert set(values) == set(ls.channels())
    assert values["temperature:A"] == 4.123
    assert values["temperature:D"] == 295.312
    assert values["sensor:A"] == 1.62134
    assert values["setpoint:1"] == 4.2
    assert values["heater_range:1"] == 0 and isinstance(values["heater_range:1"], int)
    assert values["heater_output:1"] == 45.2
    assert all(isinstance(v, float) for k, v in values.items() if not k.startswith("heater_range"))


async def test_336_serial_link_with_lakeshore_settings(sim_driver):
    # USB/serial: 57600 baud, 7 data bits, odd parity.
    async with sim_driver(LakeShore336, "ASRL1::INSTR") as ls:
        assert await ls.read(["temperature:B"]) == {"temperature:B": 45.31}


async def test_336_writes_read_back(sim_driver):
    async with sim_driver(LakeShore336, LS336) as ls:
        assert await ls.write("setpoint:1", 4.5) == 4.5
        assert await ls.write("setpoint:2", 77) == 77.0
        assert await ls.write("heater_range:1", 3) == 3
        assert await ls.write("manual_output:3", 12.5) == 12.5
        assert await ls.write("manual_output:4", 5) == 5.0  # one-digit arguments too
        assert await ls.write("setpoint:3", 0) == 0.0
        assert await ls.read(["setpoint:1", "setpoint:2", "heater_range:1", "manual_output:3"]) == {
            "setpoint:1": 4.5,
            "setpoint:2": 77.0,
            "heater_range:1": 3,
            "manual_output:3": 12.5,
        }


async def test_a_write_and_its_read_back_are_one_turn_of_the_io_thread(sim_driver):
    async with sim_driver(LakeShore336, LS336) as ls:
        turns = []
        run = ls.transport._run

        async def counting(what, fn, *args, **kw):
            turns.append(what)
            return await run(what, fn, *args, **kw)

        ls.transport._run = counting
        assert await ls.write("setpoint:1", 4.5) == 4.5
        assert turns == ["'SETP 1,4.5' then 'SETP? 1'"], "command and read-back handed to the I/O thread once"


async def test_336_refuses_bad_values_before_any_io(sim_driver):
    async with sim_driver(LakeShore336, LS336) as ls:
        with pytest.raises(OutOfRange) as info:
            await ls.write("setpoint:1", 1600.0)
        assert info.value.pv == "dut.setpoint:1" and info.value.limit == (0.0, 1500.0)
        with pytest.raises(OutOfRange):
            await ls.write("setpoint:1", math.nan)
        with pytest.raises(WrongType, match="not one of the values"):
            await ls.write("heater_range:1", 4)
        with pytest.raises(WrongType, match="expected an integer"):
            await ls.write("heater_range:1", 1.5)
        with pytest.raises(WrongType, match="expected a number"):
            await ls.write("setpoint:1", "4.2")
        with pytest.raises(NotWritable):
            await ls.write("temperature:A", 4.0)
        with pytest.raises(ValueError, match="no channel 'temperature:E'"):
            await ls.read(["temperature:E"])
        # nothing was sent: the setpoint is still the simulation's default
        assert await ls.read(["setpoint:1", "heater_range:1"]) == {"setpoint:1": 4.2, "heater_range:1": 0}


async def test_372_reads_and_writes(sim_driver):
    async with sim_driver(LakeShore372, LS372) as ls:
        values = await ls.read(["temperature:6", "resistance:6", "temperature:1", "heater_output:0", "setpoint:0"])
        assert values == {
            "temperature:6": 0.01,
            "resistance:6": 28730.0,
            "temperature:1": 42.1,
            "heater_output:0": 0.0,
            "setpoint:0": 0.0,
        }
        assert await ls.write("setpoint:0", 0.015) == 0.015
        assert await ls.write("heater_range:0", 8) == 8
        assert await ls.write("heater_range:2", 1) == 1
        with pytest.raises(WrongType):
            await ls.write("heater_range:1", 2)  # the warm-up heater is on/off only
        assert "temperature:16" in ls.channels() and "heater_range:3" not in ls.channels()


async def test_wrong_instrument_is_refused_on_connect(sim_driver):
    with pytest.raises(DriverFault, match=r"answered 'LSCI,MODEL372.*not a lakeshore336 \(expected 'MODEL336'"):
        async with sim_driver(LakeShore336, LS372, model="lakeshore372"):
            pass


async def test_unmatched_query_is_a_fault_not_a_hang(sim_driver):
    # A simulated controller that lacks input B: thanks to `error:` in the sim file it
    # answers ERROR at once, and the driver reports the bad reply (no VISA timeout).
    def drop_input_b(text: str) -> str:
        return text.replace('      - q: "KRDG? B"\n        r: "+045.310"\n', "")

    async with sim_driver(LakeShore336, LS336, edit=drop_input_b, timeout_s=30) as ls:
        with pytest.raises(DriverFault) as info:
            await ls.read(["temperature:A", "temperature:B"])
        assert str(info.value) == "dut: cannot read temperature:B: 'KRDG? B' answered 'ERROR' (expected a number)"
        assert await ls.read(["temperature:A"]) == {"temperature:A": 4.123}


# ---- exact conversations ------------------------------------------------------------


async def test_336_connect_asks_identity(expected_protocol):
    async with expected_protocol(LakeShore336, [("*IDN?", IDN_336)], connect=True) as ls:
        assert ls.identity == IDN_336


async def test_336_identity_check_can_be_switched_off(expected_protocol):
    async with expected_protocol(LakeShore336, [], connect=True, options={"check_identity": False}) as ls:
        assert ls.identity is None


async def test_336_batched_read_is_one_lock_and_one_query_each(expected_protocol):
    script = [("KRDG? A", "+295.312"), ("KRDG? D", "+001.501"), ("SETP? 2", "+080.000"), ("RANGE? 2", "1")]
    async with expected_protocol(LakeShore336, script) as ls:
        values = await ls.read(["temperature:A", "temperature:D", "setpoint:2", "heater_range:2"])
    assert values == {"temperature:A": 295.312, "temperature:D": 1.501, "setpoint:2": 80.0, "heater_range:2": 1}


async def test_336_setpoint_write_is_command_then_read_back(expected_protocol):
    async with expected_protocol(LakeShore336, [("SETP 1,4.2", None), ("SETP? 1", "+004.200")]) as ls:
        assert await ls.write("setpoint:1", 4.2) == 4.2


async def test_336_write_returns_what_the_instrument_holds(expected_protocol):
    # The controller ignores a setpoint it cannot take and says nothing; the read-back
    # is how the caller learns what is really set.
    async with expected_protocol(LakeShore336, [("SETP 2,1500", None), ("SETP? 2", "+1000.000")]) as ls:
        assert await ls.write("setpoint:2", 1500) == 1000.0


async def test_336_heater_range_and_manual_output(expected_protocol):
    script = [("RANGE 2,3", None), ("RANGE? 2", "3"), ("MOUT 4,55.5", None), ("MOUT? 4", "+55.500")]
    async with expected_protocol(LakeShore336, script) as ls:
        assert await ls.write("heater_range:2", 3) == 3
        assert await ls.write("manual_output:4", 55.5) == 55.5


async def test_372_commands(expected_protocol):
    script = [
        ("KRDG? 6", "+1.23400E-02"),
        ("RDGR? 6", "+2.43100E+04"),
        ("HTR?", "+1.2500E+01"),
        ("SETP 0,0.1", None),
        ("SETP? 0", "+1.00000E-01"),
        ("RANGE 0,5", None),
        ("RANGE? 0", "5"),
    ]
    async with expected_protocol(LakeShore372, script) as ls:
        assert await ls.read(["temperature:6", "resistance:6", "heater_output:0"]) == {
            "temperature:6": 0.01234,
            "resistance:6": 24310.0,
            "heater_output:0": 12.5,
        }
        assert await ls.write("setpoint:0", 0.1) == 0.1
        assert await ls.write("heater_range:0", 5) == 5


async def test_garbage_reply_names_channel_command_and_reply(expected_protocol):
    async with expected_protocol(LakeShore336, [("KRDG? C", "+4.2;junk")]) as ls:
        with pytest.raises(DriverFault) as info:
            await ls.read(["temperature:C"])
    assert str(info.value) == "dut: cannot read temperature:C: 'KRDG? C' answered '+4.2;junk' (expected a number)"


async def test_silent_instrument_is_a_timeout(expected_protocol):
    async with expected_protocol(LakeShore336, [("KRDG? A", None)]) as ls:
        with pytest.raises(DriverTimeout, match="KRDG\\? A"):
            await ls.read(["temperature:A"])

