"""Channel Access conformance: EPICS base's own tools against labctl, expecting what an IOC answers.

One row per behaviour. The expected values are what an EPICS 7.0.8.1 soft IOC answers the
same tool invocation with records equivalent to the PVs below (ao/longout/mbbo/bo/stringout/
lso/waveform, same metadata; :data:`IOC_DB` lists them), recorded from ``caget``/``caput``
output. Where labctl deliberately answers otherwise, the row says so and the README lists
it (refusing what an IOC would store or clip). The tools come from
``scripts/install-epics-base.sh`` (see :mod:`tests.protocol.ca.epics_tools`).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

import pytest
from labctl.ioc.types import SYSTEM, Severity, Status

from tests.protocol.ca.epics_tools import EpicsTools, Run, fields
from tests.protocol.ca.support import pyepics, serve, serve_server, site_yaml

WRITE_ALL = "rules:\n  - {users: ['*'], hosts: ['*'], roles: [operator]}"

PVS = """
pvs:
  - name: TEST:TEMP
    type: float64
    description: mixing chamber temperature
    unit: K
    precision: 4
    display: [0, 300]
    drive: [0, 250]
    alarm: {lolo: 1, low: 5, high: 200, hihi: 250}
    writable: true
    initial: 10.0
  - {name: TEST:COUNT, type: int, unit: counts, display: [0, 1000], drive: [0, 500], alarm: {high: 400}, writable: true, initial: 7}
  - {name: TEST:LONG, type: int, writable: true, initial: 3}
  - {name: TEST:MODE, type: enum, states: [OFF, ON, AUTO], writable: true, initial: ON}
  - {name: TEST:ENABLED, type: bool, writable: true, initial: false}
  - {name: TEST:STR, type: string, writable: true, initial: abc}
  - {name: TEST:NUMSTR, type: string, writable: true, initial: "12.5"}
  - {name: TEST:EMPTY, type: string, writable: true, initial: ""}
  - {name: TEST:LABEL, type: string, length: 60, writable: true, initial: hello}
  - name: TEST:WF
    type: "float64[]"
    unit: counts
    precision: 2
    display: [0, 100]
    length: 8
    writable: true
    initial: [0, 1, 2, 3, 4, 5, 6, 7]
  - {name: TEST:RO, type: float64, unit: mbar, initial: 1.0e-6}
"""

#: The soft IOC's records the expected values were taken from (``softIoc -d``; TEST:LABEL
#: and TEST:WF then set with ``caput``).
IOC_DB = """
record(ao, "TEST:TEMP") {field(EGU, "K") field(PREC, "4") field(HOPR, "300") field(LOPR, "0") field(DRVH, "250")
    field(DRVL, "0") field(LOLO, "1") field(LOW, "5") field(HIGH, "200") field(HIHI, "250") field(LLSV, "MAJOR")
    field(LSV, "MINOR") field(HSV, "MINOR") field(HHSV, "MAJOR") field(VAL, "10") field(PINI, "YES")}
record(longout, "TEST:COUNT") {field(EGU, "counts") field(HOPR, "1000") field(DRVH, "500") field(HIGH, "400")
    field(HSV, "MINOR") field(VAL, "7") field(PINI, "YES")}
record(longout, "TEST:LONG") {field(VAL, "3") field(PINI, "YES")}
record(mbbo, "TEST:MODE") {field(ZRST, "OFF") field(ONST, "ON") field(TWST, "AUTO") field(VAL, "1") field(PINI, "YES")}
record(bo, "TEST:ENABLED") {field(ZNAM, "false") field(ONAM, "true") field(VAL, "0") field(PINI, "YES")}
record(stringout, "TEST:STR") {field(VAL, "abc") field(PINI, "YES")}
record(stringout, "TEST:NUMSTR") {field(VAL, "12.5") field(PINI, "YES")}
record(stringout, "TEST:EMPTY") {field(PINI, "YES")}
record(lso, "TEST:LABEL") {field(SIZV, "61") field(PINI, "YES")}
record(waveform, "TEST:WF") {field(FTVL, "DOUBLE") field(NELM, "8") field(PREC, "2") field(EGU, "counts") field(HOPR, "100")}
"""

NO_ALARM = {"Status": "NO_ALARM", "Severity": "NO_ALARM"}
TEMP_LIMITS = {"Lo disp limit": "0", "Hi disp limit": "300", "Lo alarm limit": "1", "Lo warn limit": "5",
               "Hi warn limit": "200", "Hi alarm limit": "250"}  # fmt: skip
NAN_ALARM_LIMITS = {"Lo alarm limit": "nan", "Lo warn limit": "nan", "Hi warn limit": "nan", "Hi alarm limit": "nan"}
#: What caget prints when the server answers a read ECA_GETFAIL (the value cannot be converted).
READ_FAILED = "Channel read request failed"
#: Failed reads make caget wait for its whole CA timeout: keep it short where one is expected.
FAIL_WAIT_S = 2.0


@dataclass(frozen=True)
class Get:
    """``caget args... pv`` and what an IOC answers (``caget -d`` fields, or the whole terse output)."""

    pv: str
    args: tuple[str, ...]
    expect: dict[str, str] = field(default_factory=dict)
    out: str | None = None
    """The whole stdout, stripped (for -t and plain formats)."""
    fails: bool = False
    """The IOC answers ECA_GETFAIL: caget reports the failed read and goes on (never aborts)."""


def get(pv: str, dbr: str, **expect: str) -> Get:
    return Get(pv, ("-d", dbr), {k.replace("_", " "): v for k, v in expect.items()})


GETS: dict[str, Get] = {
    # ---- a float64 PV (ao) in every DBR class ----
    "double as DBR_STRING: formatted with PREC": get("TEST:TEMP", "DBR_STRING", Value="10.0000"),
    "double as DBR_STS_FLOAT": Get("TEST:TEMP", ("-d", "DBR_STS_FLOAT"), {"Value": "10", **NO_ALARM}),
    "double as DBR_TIME_DOUBLE": Get("TEST:TEMP", ("-d", "DBR_TIME_DOUBLE"), {"Value": "10", **NO_ALARM}),
    "double as DBR_GR_DOUBLE": Get(
        "TEST:TEMP", ("-d", "DBR_GR_DOUBLE"), {"Units": "K", "Precision": "4", **TEMP_LIMITS}
    ),
    "double as DBR_CTRL_DOUBLE: drive limits are the control limits": Get(
        "TEST:TEMP",
        ("-d", "DBR_CTRL_DOUBLE"),
        {"Value": "10", **TEMP_LIMITS, "Lo ctrl limit": "0", "Hi ctrl limit": "250"},
    ),
    "double as DBR_CTRL_LONG": Get("TEST:TEMP", ("-d", "DBR_CTRL_LONG"), {"Value": "10", "Units": "K", **TEMP_LIMITS}),
    "double as DBR_CTRL_STRING: DBR_STS_STRING's layout": Get(
        "TEST:TEMP", ("-d", "DBR_CTRL_STRING"), {"Value": "10.0000", **NO_ALARM}
    ),
    "double as DBR_GR_STRING": Get("TEST:TEMP", ("-d", "DBR_GR_STRING"), {"Value": "10.0000", **NO_ALARM}),
    "double as DBR_CTRL_ENUM: no states": get(
        "TEST:TEMP", "DBR_CTRL_ENUM", Value="Enum Index Overflow (10)", Enums="( 0)"
    ),
    "double as DBR_STSACK_STRING: the value as text": Get(
        "TEST:TEMP",
        ("-d", "DBR_STSACK_STRING"),
        {"Value": "10.0000", "Ack transient?": "NO", "Ack severity": "NO_ALARM", **NO_ALARM},  # (IOC: ACKT YES)
    ),
    "double as DBR_CLASS_NAME: the record type": get("TEST:TEMP", "DBR_CLASS_NAME", Class_Name="ao"),
    # ---- an int PV (longout) ----
    "long as DBR_CTRL_DOUBLE: unset alarm limits are NaN": Get(
        "TEST:COUNT",
        ("-d", "DBR_CTRL_DOUBLE"),
        {
            "Value": "7",
            "Units": "counts",
            "Precision": "0",
            "Hi disp limit": "1000",
            "Lo alarm limit": "nan",
            "Lo warn limit": "nan",
            "Hi warn limit": "400",
            "Hi alarm limit": "nan",
            "Hi ctrl limit": "500",
        },
    ),  # fmt: skip
    "long as DBR_CTRL_LONG: unset alarm limits are 0": Get(
        "TEST:COUNT",
        ("-d", "DBR_CTRL_LONG"),
        {"Value": "7", "Lo alarm limit": "0", "Hi warn limit": "400", "Hi alarm limit": "0", "Hi ctrl limit": "500"},
    ),
    "long as DBR_STRING": get("TEST:COUNT", "DBR_STRING", Value="7"),
    "long as DBR_TIME_SHORT": Get("TEST:LONG", ("-d", "DBR_TIME_SHORT"), {"Value": "3", **NO_ALARM}),
    # ---- an enum PV (mbbo) and a bool PV (bo) ----
    "enum as DBR_STRING: the state name": get("TEST:MODE", "DBR_STRING", Value="ON"),
    "enum as DBR_CTRL_ENUM: its states": get("TEST:MODE", "DBR_CTRL_ENUM", Value="ON", Enums="( 3)"),
    "enum as DBR_TIME_DOUBLE: the index": get("TEST:MODE", "DBR_TIME_DOUBLE", Value="1"),
    "enum as DBR_CTRL_DOUBLE: no alarm limits (NaN)": Get(
        "TEST:MODE",
        ("-d", "DBR_CTRL_DOUBLE"),
        {"Value": "1", "Precision": "0", "Hi disp limit": "0", **NAN_ALARM_LIMITS},
    ),
    "enum as DBR_CTRL_STRING": Get("TEST:MODE", ("-d", "DBR_CTRL_STRING"), {"Value": "ON", **NO_ALARM}),
    "bool as DBR_CTRL_ENUM: false/true": get("TEST:ENABLED", "DBR_CTRL_ENUM", Value="false", Enums="( 2)"),
    "bool as DBR_LONG": get("TEST:ENABLED", "DBR_LONG", Value="0"),
    "bool as DBR_CLASS_NAME": get("TEST:ENABLED", "DBR_CLASS_NAME", Class_Name="bo"),
    # ---- a string PV (stringout) ----
    "string as DBR_CTRL_STRING: no garbage before the value": Get(
        "TEST:STR", ("-d", "DBR_CTRL_STRING"), {"Value": "abc", **NO_ALARM}
    ),
    "string as DBR_GR_STRING": Get("TEST:STR", ("-d", "DBR_GR_STRING"), {"Value": "abc", **NO_ALARM}),
    "string as DBR_TIME_STRING": Get("TEST:STR", ("-d", "DBR_TIME_STRING"), {"Value": "abc", **NO_ALARM}),
    "string as DBR_STSACK_STRING": get("TEST:STR", "DBR_STSACK_STRING", Value="abc"),
    "numeric text as DBR_DOUBLE: the number": get("TEST:NUMSTR", "DBR_DOUBLE", Value="12.5"),
    "numeric text as DBR_LONG: truncated": get("TEST:NUMSTR", "DBR_LONG", Value="12"),
    "numeric text as DBR_CHAR": get("TEST:NUMSTR", "DBR_CHAR", Value="12"),
    "numeric text as DBR_CTRL_DOUBLE: no limits, NaN alarm limits": Get(
        "TEST:NUMSTR", ("-d", "DBR_CTRL_DOUBLE"), {"Value": "12.5", "Hi disp limit": "0", **NAN_ALARM_LIMITS}
    ),
    "empty text as DBR_DOUBLE: 0": get("TEST:EMPTY", "DBR_DOUBLE", Value="0"),
    "text as DBR_TIME_DOUBLE: the read fails (ECA_GETFAIL), caget goes on": Get(
        "TEST:STR", ("-d", "DBR_TIME_DOUBLE"), fails=True
    ),
    "numeric text as DBR_CTRL_ENUM: fails (no enum index)": Get("TEST:NUMSTR", ("-d", "DBR_CTRL_ENUM"), fails=True),
    "text as DBR_STS_LONG: fails": Get("TEST:STR", ("-d", "DBR_STS_LONG"), fails=True),
    # ---- a long string (lso) ----
    "long string: DBR_STRING holds its first 39 characters": Get("TEST:LABEL", ("-t",), out="hello"),
    "long string: the record type is lso": Get("TEST:LABEL.RTYP", ("-t",), out="lso"),
    "long string: .VAL$ is the whole text as a char array": Get("TEST:LABEL.VAL$", ("-t", "-S"), out="hello"),
    # ---- an array (waveform) ----
    "array as DBR_STRING: each element with PREC": Get(
        "TEST:WF", ("-d", "DBR_STRING"), {"Element count": "8", "Value": "0.00 1.00 2.00 3.00 4.00 5.00 6.00 7.00"}
    ),
    "array as DBR_CTRL_DOUBLE": Get(
        "TEST:WF",
        ("-d", "DBR_CTRL_DOUBLE"),
        {
            "Value": "0 1 2 3 4 5 6 7",
            "Units": "counts",
            "Precision": "2",
            "Hi disp limit": "100",
            "Hi ctrl limit": "100",
            **NAN_ALARM_LIMITS,
        },
    ),  # fmt: skip
    "array as DBR_TIME_LONG": get("TEST:WF", "DBR_TIME_LONG", Value="0 1 2 3 4 5 6 7"),
    "array as DBR_GR_CHAR": get("TEST:WF", "DBR_GR_CHAR", Value="0 1 2 3 4 5 6 7", Units="counts"),
    "array, its element counts": Get("TEST:WF.NELM", ("-t",), out="8"),
}


def check_get(row: Get, run: Run) -> None:
    assert run.returncode == 0, run
    assert "Internal Failure" not in run.output and "invalid" not in run.output, run
    if row.fails:
        assert READ_FAILED in run.output, run
        return
    assert "CA.Client.Exception" not in run.output, run
    if row.out is not None:
        assert run.stdout.strip() == row.out, run
    got = fields(run.stdout)
    for key, value in row.expect.items():
        assert got.get(key) == value, f"{key}: expected {value!r}, got {got.get(key)!r}\n{run}"


@pytest.mark.parametrize("row", GETS.values(), ids=GETS.keys())
async def test_caget(ports, epics_tools, row: Get):
    async with serve(site_yaml(*ports, pvs=PVS)) as s:
        tools: EpicsTools = epics_tools(s.port)
        run = await tools.caget(*row.args, row.pv, wait_s=FAIL_WAIT_S if row.fails else 5.0)
        check_get(row, run)


#: Every DBR type caget can ask for (DBR_STRING .. DBR_CTRL_DOUBLE, DBR_STSACK_STRING, DBR_CLASS_NAME).
ALL_DBR_TYPES = [*range(35), 37, 38]
SWEEP_PVS = ("TEST:TEMP", "TEST:COUNT", "TEST:MODE", "TEST:ENABLED", "TEST:STR", "TEST:NUMSTR", "TEST:EMPTY",
             "TEST:LABEL", "TEST:WF", "TEST:LABEL.VAL$", "TEST:TEMP.DESC", "TEST:TEMP.HIHI", "TEST:MODE.SEVR")  # fmt: skip


async def test_caget_every_dbr_type_of_every_pv_kind_is_answered(ports, epics_tools):
    """No DBR type makes caget fail or abort: a value, or (text that is no number) a failed read."""
    async with serve(site_yaml(*ports, pvs=PVS)) as s:
        tools: EpicsTools = epics_tools(s.port)
        limit = asyncio.Semaphore(8)

        async def one(dbr: int) -> tuple[int, Run]:
            async with limit:
                return dbr, await tools.caget("-d", str(dbr), *SWEEP_PVS, wait_s=FAIL_WAIT_S)

        runs = await asyncio.gather(*(one(t) for t in ALL_DBR_TYPES))
        for dbr, run in runs:
            assert run.returncode == 0, run
            assert "Internal Failure" not in run.output and "Aborted" not in run.output, run
            assert "invalid" not in run.output, run  # (ECA_BADTYPE: "The data type specifed is invalid")
            answered = run.stdout.count("Request type:")
            failed = run.output.count(READ_FAILED)
            assert answered == len(SWEEP_PVS), run
            text_pvs = {"TEST:STR", "TEST:TEMP.DESC", "TEST:LABEL"}  # text that is no number
            numeric = dbr not in (0, 7, 14, 21, 28, 37, 38)  # (not a string type, STSACK or CLASS_NAME)
            enum = dbr in (3, 10, 17, 24, 31)
            expected = (len(text_pvs) + enum) if numeric else 0  # + "12.5" is no enum index
            assert failed == expected, f"DBR type {dbr}: {failed} failed reads, expected {expected}\n{run}"


# ---- caput -c: each conversion ------------------------------------------------------------------


@dataclass(frozen=True)
class Put:
    """``caput -c options... pv values...`` and what the PV then holds, as on an IOC (or the refusal)."""

    pv: str
    values: tuple[str, ...]
    expect: object = None
    """The value the core holds afterwards; None: the put is refused (ECA_PUTFAIL) and audited."""
    reason: str = ""
    """Words of the refusal's reason (in its audit record)."""
    options: tuple[str, ...] = ()
    ioc: str = ""
    """Where an IOC answers otherwise, on purpose: what it does (the README lists these)."""


NOTE = "a note longer than the forty characters of DBR_STRING"
PUTS: dict[str, Put] = {
    "text to a float": Put("TEST:TEMP", ("12.5",), 12.5),
    "text with blanks to a float": Put("TEST:TEMP", (" 7 ",), 7.0),
    "text with a decimal to an int: truncated toward zero": Put("TEST:LONG", ("20.7",), 20),
    "negative text with a decimal to an int: truncated toward zero": Put("TEST:LONG", ("-20.7",), -20),
    "text to an int": Put("TEST:LONG", ("21",), 21),
    "a number to a bool (caput sends DBR_STRING '1')": Put("TEST:ENABLED", ("1",), True),
    "a number to a bool with -n (DBR_DOUBLE)": Put("TEST:ENABLED", ("1",), True, options=("-n",)),
    "a decimal to a bool: truncated": Put("TEST:ENABLED", ("1.7",), True, options=("-n",)),
    "a state name to a bool": Put("TEST:ENABLED", ("true",), True),
    "a state name to an enum (DBR_STRING)": Put("TEST:MODE", ("AUTO",), 2),
    "an index to an enum (caput sends DBR_DOUBLE)": Put("TEST:MODE", ("2",), 2),
    "an index to an enum with -n": Put("TEST:MODE", ("0",), 0, options=("-n",)),
    "a decimal index to an enum: truncated": Put("TEST:MODE", ("2.9",), 2, options=("-n",)),
    "fewer elements into an array: it holds that many (NORD)": Put(
        "TEST:WF", ("3", "9", "8", "7"), (9.0, 8.0, 7.0), options=("-a",)
    ),
    "no elements into an array": Put("TEST:WF", ("0",), (), options=("-a",)),
    "a whole array": Put("TEST:WF", ("8", *"12345678"), tuple(float(c) for c in "12345678"), options=("-a",)),
    "39 characters into a string of the default length": Put("TEST:STR", ("x" * 39,), "x" * 39),
    "a long string through .VAL$": Put("TEST:LABEL.VAL$", (NOTE,), NOTE, options=("-S",)),
    "text that is no number: refused (as an IOC)": Put("TEST:TEMP", ("warm",), None, "expected a number"),
    "an int beyond DBR_LONG: refused (as an IOC)": Put("TEST:LONG", ("3000000000",), None, "does not fit DBR_LONG"),
    "an index beyond the states: refused": Put("TEST:MODE", ("7",), None, "outside 0..2", ioc="stores 7, an invalid state"),
    "2 to a bool: refused": Put("TEST:ENABLED", ("2",), None, "outside 0..1", options=("-n",), ioc="stores 2 (Illegal_Value)"),
    "empty text to a number: refused": Put("TEST:LONG", ("",), None, "empty text", ioc="writes 0"),
    "a number with units: refused": Put("TEST:TEMP", ("5 V",), None, "expected a number", ioc="writes 5"),
    "exponent text to an int: the whole number": Put("TEST:LONG", ("1e3",), 1000, ioc="writes 1 (the leading digits)"),
    "beyond the drive limits: refused": Put("TEST:TEMP", ("260",), None, "outside the drive limits", ioc="clips to DRVH"),
    "more than 39 characters into a string of the default length: refused (as an IOC)": Put(
        "TEST:STR.VAL$", ("y" * 40,), None, "at most 39", options=("-S",)
    ),
}  # fmt: skip


@pytest.mark.parametrize("row", PUTS.values(), ids=PUTS.keys())
async def test_caput(ports, epics_tools, row: Put):
    async with serve(site_yaml(*ports, access=WRITE_ALL, pvs=PVS)) as s:
        tools: EpicsTools = epics_tools(s.port)
        pv = row.pv.removesuffix(".VAL$")
        before = s.db.read(pv).value
        run = await tools.caput("-c", *row.options, row.pv, *row.values)
        assert "Internal Failure" not in run.output, run
        if row.expect is not None:
            assert run.returncode == 0 and "ERROR" not in run.output and "Exception" not in run.output, run
            assert s.db.read(pv).value == row.expect, run
            return
        # the put callback reports ECA_PUTFAIL (caput: "Channel write request failed"), as an IOC's refusal
        assert "Channel write request failed" in run.output, run
        assert s.db.read(pv).value == before
        (record,) = [r for r in s.audit if not r.accepted]
        assert record.target == pv and row.reason in record.reason, record


async def test_caput_callback_completes_after_the_write_and_caget_reads_it_back(ports, epics_tools):
    async with serve(site_yaml(*ports, access=WRITE_ALL, pvs=PVS)) as s:
        tools: EpicsTools = epics_tools(s.port)
        run = await tools.caput("-c", "-t", "TEST:TEMP", "123.25")
        assert run.stdout.strip() == "123.25", run  # caput -c reads the new value back after its callback
        assert (await tools.caget("-t", "TEST:TEMP")).stdout.strip() == "123.25"


async def test_array_element_counts_as_a_waveform(ports, epics_tools):
    """After 3 of 8 elements: NORD 3, a get of 8 is padded with zeros, a get of 'what it holds' gets 3."""
    async with serve(site_yaml(*ports, access=WRITE_ALL, pvs=PVS)) as s:
        tools: EpicsTools = epics_tools(s.port)
        assert (await tools.caput("-c", "-a", "TEST:WF", "3", "9", "9", "9")).returncode == 0
        assert (await tools.caget("TEST:WF")).stdout.split() == ["TEST:WF", "8", "9", "9", "9", "0", "0", "0", "0", "0"]
        assert (await tools.caget("-c", "TEST:WF")).stdout.split() == ["TEST:WF", "3", "9", "9", "9"]  # count 0
        assert (await tools.caget("-t", "TEST:WF.NORD")).stdout.strip() == "3"
        assert fields((await tools.cainfo("TEST:WF")).stdout)["Element count"] == "8"  # NELM
        async with pyepics(s.port) as ca:
            assert (await ca.call("get", pv="TEST:WF"))["value"] == [9.0, 9.0, 9.0]  # libca asks for what it holds


# ---- camonitor ----------------------------------------------------------------------------------


async def test_camonitor_gets_every_update_in_order(ports, epics_tools):
    async with serve(site_yaml(*ports, pvs=PVS)) as s:
        tools: EpicsTools = epics_tools(s.port)
        async with tools.camonitor("-g", "6", "TEST:TEMP", "TEST:MODE") as mon:
            first = {(await mon.line()).split()[0], (await mon.line()).split()[0]}
            assert first == {"TEST:TEMP", "TEST:MODE"}
            values = [10.5 + k for k in range(20)]
            for k, v in enumerate(values):
                s.db.post("TEST:TEMP", v)
                got = await mon.until(lambda line: line.startswith("TEST:TEMP"))
                assert got.split()[3] == f"{v:g}", mon.lines
                if k == 10:
                    s.db.post("TEST:MODE", 2)
                    assert (await mon.until(lambda line: line.startswith("TEST:MODE"))).split()[3] == "AUTO"


async def test_camonitor_shows_alarms(ports, epics_tools):
    async with serve(site_yaml(*ports, pvs=PVS)) as s:
        tools: EpicsTools = epics_tools(s.port)
        async with tools.camonitor("TEST:TEMP") as mon:
            await mon.line()
            s.db.post("TEST:TEMP", 240.0)  # above HIGH (200): MINOR/HIGH
            line = await mon.until(lambda line: "240" in line)
            assert line.split()[-2:] == ["HIGH", "MINOR"], line
            assert s.db.read("TEST:TEMP").severity is Severity.MINOR and s.db.read("TEST:TEMP").status is Status.HIGH


# ---- cainfo -------------------------------------------------------------------------------------

INFO = {
    "TEST:TEMP": ("DBF_DOUBLE", "1", "read, write"),
    "TEST:COUNT": ("DBF_LONG", "1", "read, write"),
    "TEST:MODE": ("DBF_ENUM", "1", "read, write"),
    "TEST:ENABLED": ("DBF_ENUM", "1", "read, write"),
    "TEST:STR": ("DBF_STRING", "1", "read, write"),
    "TEST:LABEL.VAL$": ("DBF_CHAR", "241", "read, write"),  # 60 characters in UTF-8, and the NUL
    "TEST:WF": ("DBF_DOUBLE", "8", "read, write"),
    "TEST:RO": ("DBF_DOUBLE", "1", "read, no write"),
}


@pytest.mark.parametrize(("pv", "expect"), INFO.items(), ids=INFO.keys())
async def test_cainfo(ports, epics_tools, pv, expect):
    async with serve(site_yaml(*ports, access=WRITE_ALL, pvs=PVS)) as s:
        run = await epics_tools(s.port).cainfo(pv)
        info = fields(run.stdout)
        assert (info["State"], info["Native data type"], info["Element count"], info["Access"]) == (
            "connected",
            *expect,
        ), run


# ---- built-in PVs carry metadata ----------------------------------------------------------------

SERVER = """
resources:
  - {name: cryostat, max_lease_s: 600}
interlocks:
  - name: mxc_warm
    description: mixing chamber too warm
    pv: "TEST:TEMP"
    warn: 230
    trip: 240
    resume: 220
    actions: {refuse_writes: [cryostat]}
"""


async def test_built_in_pvs_carry_units_precision_descriptions_and_states(ports, epics_tools, tmp_path):
    pvs = PVS.replace("    initial: 10.0", "    resource: cryostat\n    initial: 10.0")
    async with serve_server(site_yaml(*ports, pvs=pvs, extra=SERVER, state_dir=str(tmp_path))) as s:
        tools: EpicsTools = epics_tools(s.port)
        expires = fields((await tools.caget("-d", "DBR_CTRL_DOUBLE", "ARB:CRYOSTAT:EXPIRES")).stdout)
        assert (expires["Units"], expires["Precision"]) == ("s", "3")
        queue = fields((await tools.caget("-d", "DBR_CTRL_LONG", "ARB:CRYOSTAT:QUEUE")).stdout)
        assert (queue["Value"], queue["Units"]) == ("0", "req")
        for sev in ("MINOR", "MAJOR", "INVALID"):
            active = fields((await tools.caget("-d", "DBR_CTRL_LONG", f"ALARM:ACTIVE:{sev}")).stdout)
            assert active["Units"] == "alarms"
        highest = fields((await tools.caget("-d", "DBR_CTRL_ENUM", "ALARM:HIGHEST")).stdout)
        assert highest["Enums"] == "( 4)"
        state = await tools.caget("-d", "DBR_CTRL_ENUM", "ILK:MXC_WARM:STATE")
        assert fields(state.stdout)["Value"] == "OK" and "[ 3] TRIPPED" in state.stdout, state
        descriptions = await tools.caget(
            "-t", "ARB:CRYOSTAT:EXPIRES.DESC", "ARB:CRYOSTAT:QUEUE.DESC", "ILK:MXC_WARM:STATE.DESC"
        )
        assert descriptions.stdout.splitlines() == [
            "cryostat lock expiry (UNIX s, 0: free)",
            "cryostat lock requests waiting",
            "mixing chamber too warm",
        ], descriptions
        assert math.isfinite(float((await tools.caget("-t", "ARB:CRYOSTAT:EXPIRES")).stdout))


async def test_stsack_string_shows_the_alarm_waiting_for_acknowledgement(ports, epics_tools, tmp_path):
    """ACKS is the severity not yet acknowledged, ACKT whether the PV's alarms latch (labctl's ``latch``)."""
    pvs = PVS.replace(
        "alarm: {lolo: 1, low: 5, high: 200, hihi: 250}", "alarm: {lolo: 1, low: 5, high: 200, hihi: 250, latch: true}"
    )
    async with serve_server(site_yaml(*ports, pvs=pvs, state_dir=str(tmp_path))) as s:
        tools: EpicsTools = epics_tools(s.port)
        s.db.post("TEST:TEMP", 220.0)  # MINOR/HIGH
        s.db.post("TEST:TEMP", 10.0)  # back to normal: latched until acknowledged
        stsack = fields((await tools.caget("-d", "DBR_STSACK_STRING", "TEST:TEMP")).stdout)
        assert (stsack["Severity"], stsack["Ack transient?"], stsack["Ack severity"]) == ("NO_ALARM", "YES", "MINOR")
        s.control.alarms.acknowledge("TEST:TEMP", SYSTEM, "seen")
        stsack = fields((await tools.caget("-d", "DBR_STSACK_STRING", "TEST:TEMP")).stdout)
        assert stsack["Ack severity"] == "NO_ALARM"
