"""The generic SCPI driver, configured from site-file YAML."""

from __future__ import annotations

import math

import pytest
from labctl.drivers.registry import check_instrument, create_driver
from labctl.drivers.scpi import ParseSpecError, ScpiDriver, build_channel, build_parser
from labctl.ioc.config.instruments import InstrumentConfig
from labctl.ioc.errors import ConfigError, DriverFault, WrongType
from labctl.ioc.types import PVType
from labctl.server.site import parse_site

SITE = """
site: bench
instruments:
  - name: psu
    driver: scpi
    resource: "TCPIP0::127.0.0.1::5025::SOCKET"
    visa_library: "@sim"
    sim_file: {sim_file}
    options: {{idn: SIM-PSU, error_query: ":SYST:ERR?"}}
    pvs:
      - {{name: "PSU:VOLT", type: float64, unit: V, writable: true, read: ":VOLT?", write: ":VOLT {{value:.3f}}"}}
      - {{name: "PSU:CURR", type: float64, unit: A, writable: true, read: ":CURR?", write: ":CURR {{value:g}}"}}
      - name: "PSU:OUT"
        type: bool
        writable: true
        read: ":OUTP?"
        write: ":OUTP {{value}}"
        parse: 'map:{{"ON": 1, "OFF": 0}}'
      - name: "PSU:MODE"
        type: enum
        states: [CV, CC]
        writable: true
        read: ":SYST:MODE?"
        write: ":SYST:MODE {{value}}"
        parse: 'map:{{"CV": 0, "CC": 1}}'
      - {{name: "PSU:MEAS:V", type: float64, read: ":MEAS:VOLT?"}}
      - {{name: "PSU:READ:V", type: float64, read: ":READ?", parse: "csv:0"}}
      - {{name: "PSU:READ:I", type: float64, read: ":READ?", parse: "csv:1"}}
      - {{name: "PSU:READ:STAT", type: int, read: ":READ?", parse: "csv:-1"}}
      - {{name: "PSU:TEMP", type: float64, unit: C, read: ":STAT?", parse: 'regex:T=([-+.0-9]+)C'}}
      - {{name: "PSU:REG", type: string, read: ":STAT?", parse: 'regex:MODE=(\\w+)'}}
      - {{name: "PSU:TRACE", type: "float64[]", read: ":TRAC:DATA?"}}
      - {{name: "PSU:REMOTE", type: bool, read: ":SYST:REM?", parse: bool}}
      - {{name: "PSU:IDN", type: string, read: "*IDN?", channel: identity}}
"""


def instrument(sim_file, site: str = SITE) -> InstrumentConfig:
    return parse_site(site.format(sim_file=sim_file("scpi"))).instruments[0]


def one_pv(pv: dict, **inst) -> InstrumentConfig:
    return InstrumentConfig.model_validate(
        {"name": "dev", "driver": "scpi", "resource": "TCPIP0::127.0.0.1::5025::SOCKET", **inst, "pvs": [pv]}
    )


async def test_reads_every_pv_in_its_own_shape(sim_file):
    driver = create_driver(instrument(sim_file), simulations={})
    await driver.connect()
    try:
        values = await driver.read(driver.channels())
    finally:
        await driver.close()
    assert values == {
        "PSU:VOLT": 5.0,
        "PSU:CURR": 0.5,
        "PSU:OUT": False,
        "PSU:MODE": 0,
        "PSU:MEAS:V": 4.9987,
        "PSU:READ:V": 4.9987,
        "PSU:READ:I": 0.12503,
        "PSU:READ:STAT": 0,
        "PSU:TEMP": 23.5,
        "PSU:REG": "CV",
        "PSU:TRACE": (1.0, 2.5, 4.0, 5.5),
        "PSU:REMOTE": True,
        "identity": "LABCTL,SIM-PSU-1,0001,1.0",
    }


async def test_writes_format_and_read_back(sim_file):
    driver = create_driver(instrument(sim_file), simulations={})
    await driver.connect()
    try:
        assert await driver.write("PSU:VOLT", 12.25) == 12.25
        assert await driver.write("PSU:CURR", 1) == 1.0
        assert await driver.write("PSU:OUT", True) is True  # sent as ":OUTP ON"
        assert await driver.write("PSU:MODE", 1) == 1  # sent as ":SYST:MODE CC"
        with pytest.raises(WrongType, match="not one of the values"):
            await driver.write("PSU:MODE", 2)
        assert await driver.read(["PSU:OUT", "PSU:MODE", "PSU:VOLT"]) == {"PSU:OUT": True, "PSU:MODE": 1, "PSU:VOLT": 12.25}
    finally:
        await driver.close()


async def test_write_refused_by_the_instrument_then_the_link_recovers(sim_file):
    driver = create_driver(instrument(sim_file), simulations={})
    await driver.connect()
    try:
        # 99 V is beyond the simulated supply's range: it queues a SCPI error (and, being
        # pyvisa-sim, an ERROR reply). The write fails; the next read is in step again.
        with pytest.raises(DriverFault, match="':VOLT 99.000'"):
            await driver.write("PSU:VOLT", 99)
        assert await driver.read(["PSU:VOLT", "PSU:TEMP"]) == {"PSU:VOLT": 5.0, "PSU:TEMP": 23.5}
    finally:
        await driver.close()


async def test_identity_is_checked(sim_file):
    site = SITE.replace("idn: SIM-PSU", "idn: DMM-7510")
    driver = create_driver(instrument(sim_file, site), simulations={})
    try:
        with pytest.raises(DriverFault, match="not a scpi \\(expected 'DMM-7510'"):
            await driver.connect()
    finally:
        await driver.close()


async def test_check_null_skips_the_identity_query(expected_protocol):
    inst = one_pv({"name": "X", "type": "float64", "read": "X?"}, options={"check": None})
    channels, problems = ScpiDriver.bind_config(inst)
    assert problems == []
    async with expected_protocol(ScpiDriver, [("X?", "1.5")], connect=True, channels=channels, options=inst.options) as d:
        assert await d.read(["X"]) == {"X": 1.5}


async def test_exact_conversation_with_error_queue(expected_protocol):
    inst = one_pv(
        {"name": "SRC:ON", "type": "bool", "writable": True, "read": "OUTP?", "write": "OUTP {value}"},
        options={"error_query": "SYST:ERR?", "idn": "ACME"},
    )
    channels, _ = ScpiDriver.bind_config(inst)
    script = [("*IDN?", "ACME,PS1,1,1"), ("OUTP 1", None), ("SYST:ERR?", "+0,No error"), ("OUTP?", "1")]
    async with expected_protocol(ScpiDriver, script, connect=True, channels=channels, options=inst.options) as d:
        assert await d.write("SRC:ON", True) is True


@pytest.mark.parametrize(
    ("spec", "pv_type", "reply", "value"),
    [
        (None, PVType.FLOAT64, " +1.5E+00 ", 1.5),
        (None, PVType.INT, "+7", 7),
        (None, PVType.ENUM, "2", 2),
        (None, PVType.BOOL, "off", False),
        (None, PVType.STRING, '"hello"', "hello"),
        (None, PVType.FLOAT64_ARRAY, "1,2,3", (1.0, 2.0, 3.0)),
        ("float", PVType.FLOAT64, "nan", math.nan),
        ("int", PVType.ENUM, "3", 3),
        ("bool", PVType.BOOL, "ON", True),
        ("str", PVType.STRING, " x ", "x"),
        ("csv:2", PVType.FLOAT64, "1,2,3.5", 3.5),
        ("csv:-1", PVType.INT, "1,2,3", 3),
        ("csv", PVType.FLOAT64_ARRAY, "4,5", (4.0, 5.0)),
        (r"regex:V=(\S+)", PVType.FLOAT64, "I=1 V=2.5E-3 OK", 2.5e-3),
        ("regex:state (\\w+)", PVType.STRING, "state RUN", "RUN"),
        ('map:{"ON": true, "OFF": false}', PVType.BOOL, "ON", True),
        ('map:{"LOW": 0, "HIGH": 1}', PVType.ENUM, " HIGH ", 1),
        ('map:{"A": 1.5}', PVType.FLOAT64, "A", 1.5),
        ('map:{"1": "one"}', PVType.STRING, "1", "one"),
    ],
)
def test_parse_specs(spec, pv_type, reply, value):
    parse, _ = build_parser(spec, pv_type)
    result = parse(reply)
    assert type(result) is type(value)
    assert result == value or (isinstance(value, float) and math.isnan(value) and math.isnan(result))


@pytest.mark.parametrize(
    ("spec", "pv_type", "reply"),
    [
        (None, PVType.FLOAT64, "ERROR"),
        ("csv:3", PVType.FLOAT64, "1,2"),
        (r"regex:V=(\S+)", PVType.FLOAT64, "nothing here"),
        ('map:{"ON": 1, "OFF": 0}', PVType.BOOL, "on"),
    ],
)
def test_replies_that_do_not_fit_raise_value_error(spec, pv_type, reply):
    parse, _ = build_parser(spec, pv_type)
    with pytest.raises(ValueError):
        parse(reply)


@pytest.mark.parametrize(
    ("pv", "key", "message"),
    [
        ({"type": "float64", "read": "X?", "parse": "hex"}, "parse", "unknown parse spec 'hex'"),
        ({"type": "float64", "read": "X?", "parse": "eval:1+1"}, "parse", "unknown parse spec 'eval:1\\+1'"),
        ({"type": "float64", "read": "X?", "parse": "regex:V=\\S+"}, "parse", "exactly one capture group, it has 0"),
        ({"type": "float64", "read": "X?", "parse": "regex:(a)(b)"}, "parse", "exactly one capture group, it has 2"),
        ({"type": "float64", "read": "X?", "parse": "regex:(unclosed"}, "parse", "does not compile"),
        ({"type": "float64", "read": "X?", "parse": "csv:first"}, "parse", "the index must be an integer"),
        ({"type": "float64", "read": "X?", "parse": "csv"}, "parse", "'csv' \\(all fields\\) is for float64\\[\\] PVs"),
        ({"type": "float64[]", "read": "X?", "parse": "csv:1"}, "parse", "takes 'csv' \\(all fields\\)"),
        ({"type": "bool", "read": "X?", "parse": "map:ON=1"}, "parse", "needs a JSON object"),
        ({"type": "bool", "read": "X?", "parse": "map:{}"}, "parse", "non-empty JSON object"),
        ({"type": "float64", "read": "X?", "parse": 'map:{"A": "x"}'}, "parse", "value for 'A' does not suit a float64 PV"),
        ({"type": "int", "read": "X?", "parse": 'map:{"A": 1, "B": 1}'}, "parse", "two replies to the same value"),
        ({"type": "bool", "read": "X?", "parse": "float"}, "parse", "gives values for float64 PVs, but the PV is bool"),
        ({"type": "float64", "writable": True, "write": "V {volts}"}, "write", "must use \\{value\\} and no other field"),
        ({"type": "float64", "writable": True, "write": "V {value.real}"}, "write", "must be a plain name"),
        ({"type": "float64", "writable": True, "write": "V {value:d}"}, "write", "cannot format a float64 value"),
        ({"type": "float64", "writable": True, "write": "V {value"}, "write", "write 'V \\{value'"),
        ({"type": "float64"}, "read", "needs 'read' \\(a query\\) and/or 'write'"),
        ({"type": "float64", "writable": True, "read": "X?"}, "write", "is writable but has no 'write' command"),
        ({"type": "float64", "write": "X {value}", "parse": "float"}, "read", "has 'parse' but no 'read' query"),
    ],
)
def test_bad_specs_name_the_pv_and_key(pv, key, message):
    inst = one_pv({"name": "DEV:X", **pv})
    problems = check_instrument(inst)
    assert len(problems) == 1
    (path, text), = problems
    assert path == ("pvs", 0, key)
    assert text.startswith("PV DEV:X: ")
    with pytest.raises(ParseSpecError, match=message):
        build_channel(inst.pvs[0])


def test_create_driver_lists_every_problem():
    inst = InstrumentConfig.model_validate(
        {
            "name": "dev",
            "driver": "scpi",
            "resource": "TCPIP0::127.0.0.1::5025::SOCKET",
            "options": {"idn": 3, "colour": "red"},
            "pvs": [
                {"name": "DEV:A", "type": "float64", "read": "A?", "parse": "hex"},
                {"name": "DEV:B", "type": "float64", "read": "B?"},
                {"name": "DEV:C", "type": "float64", "read": "C?", "channel": "DEV:B"},
            ],
        }
    )
    with pytest.raises(ConfigError) as info:
        create_driver(inst, simulations={})
    lines = info.value.problems
    assert any(line.startswith("instrument dev: options.colour: unknown option for the scpi driver") for line in lines)
    assert any(line.startswith("instrument dev: options.idn: expected a string, got 3") for line in lines)
    assert any("pvs[0].parse: PV DEV:A: unknown parse spec 'hex'" in line for line in lines)
    assert any("pvs[2].channel: PV DEV:C: channel 'DEV:B' is also PV DEV:B's, with other commands" in line for line in lines)
    assert len(lines) == 4
