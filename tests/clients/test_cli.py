"""``labctl ls/get/put/monitor`` against a real server.

Most commands run ``server.cli.main`` in a worker thread (it starts its own event loop,
as the console command does), so the server keeps serving on the test's loop. The
streaming ``monitor`` and the exit status of the installed entry point run as real
subprocesses.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import math
import os
import sys

import pytest
from labctl.clients.cli.arguments import UsageError, parse_value
from labctl.clients.values import Metadata
from labctl.ioc.types import PVType
from labctl.server.cli import main

from .conftest import PASSWORDS


def _no_constant(name: str) -> None:
    raise AssertionError(f"not strict JSON: {name}")


def strict(text: str):
    """Parse JSON refusing NaN and Infinity (Python's json module accepts them by default)."""
    return json.loads(text, parse_constant=_no_constant)


def utc(text: str) -> dt.datetime:
    """An ISO 8601 time that says its zone, UTC."""
    when = dt.datetime.fromisoformat(text)
    assert when.tzinfo is not None and when.utcoffset() == dt.timedelta(0), text
    return when


@pytest.fixture
def labctl(url, monkeypatch, capsys):
    """``await labctl(*args, user=None)`` -> (exit status, stdout, stderr)."""
    monkeypatch.delenv("LABCTL_URL", raising=False)
    monkeypatch.delenv("LABCTL_USER", raising=False)
    monkeypatch.delenv("LABCTL_PASSWORD", raising=False)

    async def run(*args: str, user: str | None = None, password: str | None = None):
        argv = [args[0], "--url", url, *args[1:]]
        if user is not None:
            argv += ["--user", user]
            monkeypatch.setenv("LABCTL_PASSWORD", password if password is not None else PASSWORDS[user])
        try:
            code = await asyncio.to_thread(main, argv)
        except SystemExit as e:  # argparse refuses the command line
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


async def test_ls_table_and_json(labctl):
    code, out, err = await labctl("ls", "B:*")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "TYPE", "UNIT", "ACCESS", "DESCRIPTION"]
    assert lines[1].split() == ["B:TEMP", "float64", "K", "r", "bench", "temperature"]
    code, out, _ = await labctl("ls", "B:T*", "--json", user="operator")
    (entry,) = strict(out)
    assert entry | {"path": None} == {
        "name": "B:TEMP", "type": "float64", "unit": "K", "description": "bench temperature", "display": [0.0, 300.0],
        "states": [], "writable": True, "user_writable": True, "path": None,
    }
    assert entry["path"] == "bench/soft/B:TEMP"


async def test_get_table_and_json(server, labctl):
    server.db.post("B:TEMP", 150.0)
    code, out, err = await labctl("get", "B:TEMP", "B:MODE", "B:WAVE", "B:NEW")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["NAME", "VALUE", "UNIT", "SEVERITY", "STATUS", "TIME"]
    assert rows[1][:5] == ["B:TEMP", "150.000", "K", "MINOR", "HIGH"]  # precision 3, the default
    assert rows[2][:4] == ["B:MODE", "OFF", "NO_ALARM", "NO_ALARM"]
    assert rows[3][:4] == ["B:WAVE", "[1.000,", "2.000]", "(2)"]
    assert rows[4][:4] == ["B:NEW", "(invalid)", "INVALID", "UDF"]
    code, out, _ = await labctl("get", "B:MODE", "B:NEW", "--json")
    mode, new = strict(out)
    assert (mode["value"], mode["state"], mode["severity"]) == (0, "OFF", "NO_ALARM")
    assert (new["value"], new["severity"], new["status"]) == (None, "INVALID", "UDF")
    assert abs(utc(mode["timestamp"]).timestamp() - server.db.read("B:MODE").timestamp) < 1e-3


async def test_tables_show_the_precision_and_json_every_digit(server, labctl):
    server.db.post("B:TEMP", 0.0146309)  # B:TEMP has precision 3 (the default); B:WAVE too
    server.db.post("B:WAVE", (0.0146309, 2.5e-9))
    code, out, err = await labctl("get", "B:TEMP", "B:WAVE")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()]
    assert rows[1][:3] == ["B:TEMP", "0.015", "K"]
    assert rows[2][:3] == ["B:WAVE", "[0.015,", "2.500e-09]"]  # too small for 3 decimals: exponent form
    code, out, err = await labctl("get", "B:TEMP", "B:WAVE", "--json")
    temp, wave = strict(out)
    assert temp["value"] == 0.0146309 and wave["value"] == [0.0146309, 2.5e-9]


def test_format_number_at_its_edges():
    from labctl.clients.values import format_number

    assert format_number(0.0146309, 4) == "0.0146"
    assert format_number(0.0084067, 4) == "0.0084"
    assert format_number(0.0, 4) == "0.0000"
    assert format_number(-0.00004, 4) == "-4.0000e-05"  # would read -0.0000
    assert format_number(0.00005, 4) == "0.0001"  # rounds to a digit that shows
    assert format_number(2.3e-8, 2) == "2.30e-08"
    assert format_number(1e15, 1) == "1.0e+15"
    assert format_number(12.5, 0) == "12"  # round half to even, as printf does
    assert format_number(math.nan, 3) == "nan" and format_number(math.inf, 3) == "inf"
    assert format_number(0.0146309, None) == "0.0146309"


async def test_json_is_strict_for_nan_and_infinity(server, labctl):
    server.db.post("B:TEMP", math.nan)
    server.db.post("B:WAVE", (1.0, math.inf, -math.inf, math.nan))
    code, out, err = await labctl("get", "B:TEMP", "B:WAVE", "--json")
    assert code == 0, err
    temp, wave = strict(out)
    assert temp["value"] is None and wave["value"] == [1.0, None, None, None]
    utc(temp["timestamp"])
    code, out, err = await labctl("put", "B:TEMP", "nan", "--json", user="operator")
    assert code in (0, 1), err  # accepted or refused: either way what it prints is strict JSON
    if code == 0:
        assert strict(out)["value"] is None
    else:
        assert out == "" and strict(err)["kind"] == "invalid"


async def test_put_writes_and_shows_the_result(server, labctl):
    code, out, err = await labctl("put", "B:TEMP", "12.5", user="operator")
    assert (code, out, err) == (0, "B:TEMP = 12.500 K\n", "")
    for name, text, stored in (("B:MODE", "HIGH", 2), ("B:ON", "on", True), ("B:WAVE", "[3, 4.5]", (3.0, 4.5)), ("B:NOTE", "two words", "two words")):
        code, out, err = await labctl("put", name, text, user="operator")
        assert code == 0, err
        assert server.db.read(name).value == stored
    code, out, _ = await labctl("put", "B:COUNT", "0x10", "--json", user="operator")
    assert json.loads(out)["value"] == 16


@pytest.mark.parametrize(
    ("args", "user", "code", "message"),
    [
        (("put", "B:TEMP", "400"), "operator", 1, "labctl put: B:TEMP: write refused (BadOutOfRange): 400.0 is outside the drive limits [0.0, 350.0]"),
        (("put", "B:TEMP", "1"), "viewer", 1, "labctl put: B:TEMP: write refused (BadUserAccessDenied): user 'viewer' may not write resource 'soft'"),
        (("put", "B:TEMP", "1"), None, 1, "labctl put: B:TEMP: write refused (BadUserAccessDenied): user 'anonymous' may not write resource 'soft'"),
        (("put", "B:TEMP", "warm"), "operator", 2, "labctl put: B:TEMP is float64: expected a number, got 'warm'"),
        (("put", "B:MODE", "MAX"), "operator", 2, "labctl put: B:MODE is enum: expected one of ['OFF', 'LOW', 'HIGH'] or a state index, got 'MAX'"),
        (("get", "B:NOPE"), None, 1, "labctl get: no PV named 'B:NOPE'"),
    ],
)
async def test_failures_exit_non_zero_with_one_line(labctl, args, user, code, message):
    got, out, err = await labctl(*args, user=user)
    assert (got, out) == (code, "")
    assert err.count("\n") == 1 and err.startswith(f"labctl {args[0]}: ")
    if code == 2:  # the command line's own errors: their text is ours
        assert err == message + "\n"


@pytest.mark.parametrize(
    ("args", "user", "code", "kind", "error", "fields"),
    [
        (("put", "B:TEMP", "400"), "operator", 1, "invalid", None, {"pv": "B:TEMP"}),
        (("put", "B:TEMP", "1"), "viewer", 1, "forbidden", None, {"pv": "B:TEMP"}),
        (("put", "B:PRES", "1"), "operator", 1, "forbidden", None, {"pv": "B:PRES"}),
        (("put", "B:TEMP", "warm"), "operator", 2, "usage", "UsageError", {}),
        (("get", "B:NOPE"), None, 1, "not_found", None, {"name": "B:NOPE"}),
        (("put", "B:TEMP"), "operator", 2, "usage", "UsageError", {}),  # argparse: VALUE missing
        (("history", "B:TEMP", "--since", "soon"), None, 2, "usage", "UsageError", {}),
    ],
)
async def test_failures_with_json_are_one_error_object(labctl, args, user, code, kind, error, fields):
    got, out, err = await labctl(*args, "--json", user=user)
    assert (got, out) == (code, ""), "results only on standard output"
    assert err.count("\n") == 1
    obj = strict(err)
    assert set(obj) >= {"kind", "error", "action", "target", "fields", "message"}
    assert obj["kind"] == kind
    assert isinstance(obj["error"], str) and obj["error"]
    if error is not None:
        assert obj["error"] == error
    assert obj["fields"] | fields == obj["fields"], obj
    if obj["kind"] != "usage":
        assert obj["target"] == args[1]


async def test_wrong_password_is_one_line(labctl):
    code, out, err = await labctl("get", "B:TEMP", user="operator", password="nope")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "login refused for user 'operator'" in err
    code, out, err = await labctl("get", "B:TEMP", "--json", user="operator", password="nope")
    assert (code, out) == (1, "")
    assert strict(err)["kind"] == "connection"


async def test_no_password_and_no_terminal(labctl, monkeypatch, url):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # not a terminal: no prompt possible
    code = await asyncio.to_thread(main, ["get", "B:TEMP", "--url", url, "--user", "operator"])
    assert code == 2


def test_parse_value_by_type():
    meta = Metadata("X", PVType.FLOAT64_ARRAY)
    assert parse_value(meta, "1, 2,3") == [1.0, 2.0, 3.0]
    assert parse_value(meta, "[]") == []
    with pytest.raises(UsageError, match="numbers as"):
        parse_value(meta, "[1, 'a']")
    assert parse_value(Metadata("B", PVType.BOOL), "FALSE") is False
    assert parse_value(Metadata("E", PVType.ENUM, states=("A", "B")), "1") == 1


async def _labctl_process(url: str, *args: str, env: dict | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "labctl", *args, "--url", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


async def test_monitor_streams_changes_as_json_lines(server, url):
    proc = await _labctl_process(url, "monitor", "B:COUNT", "B:MODE", "--count", "14", "--json")
    try:
        first = [json.loads(await asyncio.wait_for(proc.stdout.readline(), 60)) for _ in range(2)]
        assert {f["name"] for f in first} == {"B:COUNT", "B:MODE"}, "current values first"
        for i in range(11):
            server.db.post("B:COUNT", 100 + i)
        server.db.post("B:MODE", 2)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    samples = [strict(line) for line in out.decode().splitlines()]
    assert all(utc(s["timestamp"]) for s in samples)
    assert [s["value"] for s in samples if s["name"] == "B:COUNT"] == [100 + i for i in range(11)]
    assert [(s["value"], s["state"]) for s in samples if s["name"] == "B:MODE"] == [(2, "HIGH")]


async def test_monitor_table_output(server, url):
    proc = await _labctl_process(url, "monitor", "B:TEMP", "--count", "2")
    try:
        first = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert first.split()[2:] == ["B:TEMP", "4.200", "K"]
        server.db.post("B:TEMP", 250.0)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert out.decode().split()[2:] == ["B:TEMP", "250.000", "K", "MAJOR", "HIHI"]


async def test_entry_point_exit_status_when_unreachable():
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    proc = await _labctl_process(f"opc.tcp://127.0.0.1:{port}", "get", "B:TEMP", "--security", "None")
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1 and out == b""
    lines = err.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"labctl get: cannot connect to opc.tcp://127.0.0.1:{port}")
    proc = await _labctl_process(f"opc.tcp://127.0.0.1:{port}", "get", "B:TEMP", "--security", "None", "--json")
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert (proc.returncode, out) == (1, b"")
    assert strict(err.decode())["kind"] == "connection"
