"""Transports: VISA in a worker thread, simulation objects, injected faults, the link lock."""

from __future__ import annotations

import asyncio
import threading

import pytest
from labctl.drivers.scpi import ScpiDriver
from labctl.drivers.transport import FaultyTransport, SimulationTransport, VisaTransport
from labctl.ioc.config.instruments import InstrumentConfig
from labctl.ioc.errors import DriverFault, DriverTimeout

PSU = "TCPIP0::127.0.0.1::5025::SOCKET"


def psu_transport(path, *, resource: str = PSU, timeout_s: float = 2.0) -> VisaTransport:
    return VisaTransport(
        "psu", resource, library="@sim", sim_file=path, timeout_s=timeout_s, write_termination="\n", read_termination="\n"
    )


class Echo:
    """A simulation that records what it hears and answers queries with their text."""

    def __init__(self) -> None:
        self.heard: list[str] = []

    def handle(self, command: str) -> str | None:
        self.heard.append(command)
        if command == "BAD":
            raise ValueError("BAD is not a command")
        if command == "SILENT?":
            return None
        return command.upper() if command.endswith("?") else None


# ---- VisaTransport ------------------------------------------------------------------


async def test_visa_round_trip_in_worker_thread(sim_file):
    transport = psu_transport(sim_file("scpi"))
    await transport.open()
    await transport.open()  # idempotent
    try:
        assert await transport.query("*IDN?") == "LABCTL,SIM-PSU-1,0001,1.0"
        await transport.write(":VOLT 3.5")
        assert await transport.query(":VOLT?") == "+3.50000E+00"
        # pyvisa-sim with `error:` set answers an unknown query at once instead of timing out
        assert await transport.query(":NOPE?") == "ERROR"
    finally:
        await transport.close()
    await transport.close()  # closing twice does nothing


async def test_visa_unknown_resource_is_a_fault_naming_instrument_and_resource(sim_file):
    transport = psu_transport(sim_file("scpi"), resource="GPIB0::29::INSTR")
    with pytest.raises(DriverFault) as info:
        await transport.open()
    message = str(info.value)
    assert message.startswith("psu: ") and "GPIB0::29::INSTR" in message
    await transport.close()


async def test_visa_io_before_open_is_a_fault(sim_file):
    transport = psu_transport(sim_file("scpi"))
    with pytest.raises(DriverFault, match="not open"):
        await transport.query("*IDN?")


async def test_visa_timeout_is_driver_timeout_and_the_link_recovers(sim_file):
    # *RST has no reply in the simulation, so querying it waits for the VISA timeout
    # (set shorter than timeout_s so the worker thread returns by itself).
    transport = psu_transport(sim_file("scpi"), timeout_s=0.25)
    assert transport.visa_timeout_ms < 250
    await transport.open()
    try:
        with pytest.raises(DriverTimeout) as info:
            await transport.query("*RST")
        assert str(info.value).startswith("psu: no answer to '*RST'")
        assert await transport.query(":VOLT?") == "+5.00000E+00"
    finally:
        await transport.close()


async def test_visa_wait_for_gives_up_when_the_worker_thread_hangs(sim_file):
    transport = psu_transport(sim_file("scpi"), timeout_s=0.05)
    await transport.open()
    gate = threading.Event()

    def hang(command: str, raw: bool) -> str:
        gate.wait(10)
        return "late"

    transport._query_blocking = hang  # a VISA library that ignores its own timeout
    try:
        with pytest.raises(DriverTimeout, match=r"no answer to ':VOLT\?' within 0.05 s"):
            await transport.query(":VOLT?")
    finally:
        gate.set()
        await transport.close()


async def test_visa_drains_a_stale_reply_after_a_reply_that_did_not_fit(sim_file):
    inst = InstrumentConfig.model_validate(
        {
            "name": "psu",
            "driver": "scpi",
            "resource": PSU,
            "visa_library": "@sim",
            "pvs": [{"name": "PSU:VOLT", "type": "float64", "read": ":VOLT?"}],
        }
    )
    transport = psu_transport(sim_file("scpi"))
    driver = ScpiDriver.from_config(inst, transport)
    await driver.connect()
    try:
        # An unknown command makes the simulated instrument queue the reply ERROR, which
        # the next query reads as its own answer: the driver sees a reply that does not
        # fit, says so, and the transport discards the stale answer before going on.
        await transport.write(":BOGUS 1")
        with pytest.raises(DriverFault, match=r"':VOLT\?' answered 'ERROR'"):
            await driver.read(["PSU:VOLT"])
        assert await driver.read(["PSU:VOLT"]) == {"PSU:VOLT": 5.0}
    finally:
        await driver.close()


def test_visa_sim_needs_a_definition_file():
    with pytest.raises(ValueError, match="pyvisa-sim definition"):
        VisaTransport("x", PSU, library="@sim")


# ---- SimulationTransport ------------------------------------------------------------


async def test_simulation_answers_and_refuses_clearly():
    echo = Echo()
    transport = SimulationTransport("sim", echo)
    with pytest.raises(DriverFault, match="not open"):
        await transport.query("A?")
    await transport.open()
    assert await transport.query("a?") == "A?"
    await transport.write("SET 1")
    with pytest.raises(DriverFault, match=r"sim: the simulation refused 'BAD': BAD is not a command"):
        await transport.write("BAD")
    with pytest.raises(DriverFault, match="no reply to 'SILENT\\?'"):
        await transport.query("SILENT?")
    with pytest.raises(DriverFault, match="replied 'X\\?' to the write 'x\\?'"):
        await transport.write("x?")
    assert echo.heard == ["a?", "SET 1", "BAD", "SILENT?", "x?"]


# ---- FaultyTransport ----------------------------------------------------------------


async def test_faulty_transport_stops_and_resumes():
    faulty = FaultyTransport(SimulationTransport("sim", Echo(), timeout_s=2.0))
    await faulty.open()
    assert await faulty.query("a?") == "A?"
    faulty.stop_answering(wait_s=0)
    assert not faulty.answering
    with pytest.raises(DriverTimeout, match="sim: no answer to 'a\\?' within 2 s"):
        await faulty.query("a?")
    with pytest.raises(DriverTimeout):
        await faulty.write("SET 1")
    assert faulty.refused == 2
    faulty.resume()
    assert await faulty.query("b?") == "B?"
    await faulty.close()


async def test_faulty_transport_waits_the_timeout_by_default():
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    faulty = FaultyTransport(SimulationTransport("sim", Echo(), timeout_s=1.5), sleep=record)
    await faulty.open()
    faulty.stop_answering()
    with pytest.raises(DriverTimeout):
        await faulty.query("a?")
    faulty.stop_answering(wait_s=0.2)
    with pytest.raises(DriverTimeout):
        await faulty.write("SET 1")
    # Like a dead instrument: the caller waits its timeout (or the wait asked for).
    assert waits == [1.5, 0.2]


def test_faulty_transport_rejects_negative_wait():
    faulty = FaultyTransport(SimulationTransport("sim", Echo()))
    with pytest.raises(ValueError):
        faulty.stop_answering(wait_s=-1)


# ---- the link lock ------------------------------------------------------------------


async def test_lock_keeps_a_holders_exchanges_together_and_is_reentrant():
    echo = Echo()
    transport = SimulationTransport("sim", echo)
    await transport.open()
    held = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with transport.locked():
            await transport.query("first?")
            async with transport.locked():  # re-entrant for the task holding it
                held.set()
                await release.wait()
            await transport.query("second?")

    task = asyncio.create_task(holder())
    await held.wait()
    other = asyncio.create_task(transport.query("other?"))
    for _ in range(5):
        await asyncio.sleep(0)  # let the other task run as far as it can
    assert not other.done()
    assert echo.heard == ["first?"]
    release.set()
    await task
    assert await other == "OTHER?"
    assert echo.heard == ["first?", "second?", "other?"]
