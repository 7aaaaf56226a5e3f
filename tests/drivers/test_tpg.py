"""Pfeiffer TPG: the ACK/ENQ hand-shake, status codes, the PRX join."""

from __future__ import annotations

import math

import pytest
from labctl.drivers.tpg import ACK, ENQ, NAK, TPG
from labctl.drivers.values import NoReading
from labctl.ioc.errors import DriverFault
from labctl.ioc.types import Status

GAUGE = "ASRL4::INSTR"
FAULTY_GAUGE = "ASRL5::INSTR"


# ---- against pyvisa-sim -------------------------------------------------------------


async def test_reads_every_channel(sim_driver):
    async with sim_driver(TPG, GAUGE) as tpg:
        assert tpg.identity == "LABCTL-SIM-362 1.0"
        assert await tpg.read(tpg.channels()) == {
            "pressure:1": 2.3e-08,
            "pressure:2": 4.5e-07,
            "status:1": 0,
            "status:2": 0,
            "pressure_unit": 0,
        }
        assert await tpg.read(["pressure:2"]) == {"pressure:2": 4.5e-07}


async def test_over_range_and_sensor_off(sim_driver):
    async with sim_driver(TPG, FAULTY_GAUGE) as tpg:
        values = await tpg.read(["pressure:1", "pressure:2", "status:1", "status:2"])
    assert values["pressure:1"] == math.inf and values["status:1"] == 2
    assert values["pressure:2"] == NoReading(Status.DISABLE, "sensor off") and values["status:2"] == 4


async def test_unknown_mnemonic_is_refused_at_once(sim_driver):
    async with sim_driver(TPG, GAUGE, timeout_s=30) as tpg:
        with pytest.raises(DriverFault, match="the gauge refused 'XYZ' \\(NAK\\)"):
            await tpg._ask("XYZ")
        assert await tpg.read(["status:1"]) == {"status:1": 0}


# ---- exact conversations ------------------------------------------------------------


async def test_one_reading_is_mnemonic_ack_then_bare_enq(expected_protocol):
    async with expected_protocol(TPG, [("PR1", ACK), (ENQ, "0,1.2340E-03")]) as tpg:
        assert await tpg.read(["pressure:1", "status:1"]) == {"pressure:1": 1.234e-3, "status:1": 0}
        assert tpg.transport.sent == [("PR1", False), (ENQ, True)]


async def test_both_gauges_in_one_batch_ask_prx_once(expected_protocol):
    async with expected_protocol(TPG, [("PRX", ACK), (ENQ, "0,1.0000E-03,1,5.0000E-09")]) as tpg:
        assert await tpg.read(["pressure:1", "pressure:2", "status:2"]) == {
            "pressure:1": 1e-3,
            "pressure:2": 5e-9,
            "status:2": 1,
        }


async def test_connect_asks_the_firmware_number(expected_protocol):
    async with expected_protocol(TPG, [("PNR", ACK), (ENQ, "BG5120-5")], connect=True) as tpg:
        assert tpg.identity == "BG5120-5"


@pytest.mark.parametrize(
    ("reply", "pressure"),
    [
        ("0,1.2340E-03", 1.234e-3),  # OK
        ("1,5.0000E-09", 5e-9),  # underrange: the lower limit, an upper bound on the truth
        ("2,1.0000E+03", math.inf),  # overrange: never lower than the truth
        ("3,0.0000E+00", NoReading(Status.READ, "sensor error")),  # no measurement: a fault
        ("4,0.0000E+00", NoReading(Status.DISABLE, "sensor off")),  # switched off, not broken
        ("5,2.0000E-02", NoReading(Status.READ, "no sensor")),
        ("6,0.0000E+00", NoReading(Status.READ, "identification error")),
    ],
)
async def test_status_codes(expected_protocol, reply, pressure):
    async with expected_protocol(TPG, [("PR2", ACK), (ENQ, reply)]) as tpg:
        values = await tpg.read(["pressure:2", "status:2"])
    assert values == {"pressure:2": pressure, "status:2": int(reply[0])}


@pytest.mark.parametrize(
    ("ack", "data", "message"),
    [
        (NAK, None, "the gauge refused 'PR1' \\(NAK\\)"),
        ("junk", None, "expected ACK after 'PR1', got 'junk'"),
        (ACK, "7,1.0E-03", "unknown status code 7"),
        (ACK, "0;1.0E-03", "expected <status>,<value>"),
        (ACK, "0,lots", "expected a number"),
    ],
)
async def test_bad_replies_are_faults(expected_protocol, ack, data, message):
    script = [("PR1", ack)] + ([(ENQ, data)] if data is not None else [])
    async with expected_protocol(TPG, script) as tpg:
        with pytest.raises(DriverFault, match=message):
            await tpg.read(["pressure:1"])


async def test_malformed_prx_is_a_fault(expected_protocol):
    async with expected_protocol(TPG, [("PRX", ACK), (ENQ, "0,1.0E-03")]) as tpg:
        with pytest.raises(DriverFault, match="'PRX' answered '0,1.0E-03'"):
            await tpg.read(["pressure:1", "pressure:2"])
