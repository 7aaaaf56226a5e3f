"""``labctl`` control commands against a real server: locks, jobs, audit, alarms, interlocks.

One whole server (with its historian, so ``audit`` lists from it) runs for the module.
Most commands run ``server.cli.main`` in a worker thread, as the tests of the PV commands
do; ``lock``, which holds its lease until interrupted, runs as a real subprocess that is
sent SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import signal
import sys
import time

import pytest
from labctl.clients.cli.arguments import parse_duration, parse_param, parse_since
from labctl.ioc.types import Identity
from labctl.server.cli import main

from tests.helpers import wait_for
from tests.protocol.opcua.control_support import (  # noqa: F401 -- fixtures
    USERS,
    module_loop_leak_check,
    module_server,
    open_session_fixture,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

BODY = """
resources:
  - {name: cryostat}
  - {name: laser}
pvs:
  - {name: "CRYO:SP", type: float64, writable: true, initial: 0.1, drive: [0, 1], resource: cryostat}
  - {name: "LAB:PRES", type: float64, unit: mbar, writable: true, initial: 1.0e-6, alarm: {high: 1.0e-3, hihi: 1.0e-2, latch: true}}
  - {name: "LAB:MODE", type: enum, states: ["IDLE", "PUMP", "VENT"], writable: true, initial: "IDLE"}
  - {name: "LAB:FLOW", type: float64, unit: "l/s", initial: 1.0, alarm: {high: 10, hihi: 20}}
procedures:
  measure:
    description: "set and read back"
    resources: [cryostat]
    params:
      sp: {type: float64, min: 0, max: 1, description: "the set point"}
      note: {type: string, default: "none"}
    steps:
      - set: {pv: "CRYO:SP", value: "=sp"}
      - read: {pvs: ["CRYO:SP"], label: "sp={sp}"}
interlocks:
  - {name: vacuum, description: "chamber vented", pv: "LAB:PRES", trip: 0.1, reset: manual}
"""

served = module_server(BODY, historian=True)
ROOT = Identity("root", frozenset({"admin"}), "test")


@pytest.fixture
def labctl(served, monkeypatch, capsys):
    """``await labctl(*args, user=None)`` -> (exit status, stdout, stderr)."""
    for name in ("LABCTL_URL", "LABCTL_USER", "LABCTL_PASSWORD", "LABCTL_LEASE"):
        monkeypatch.delenv(name, raising=False)

    async def run(*args: str, user: str | None = None):
        argv = [args[0], "--url", served.url, *args[1:]]
        if user is not None:
            argv += ["--user", user]
            monkeypatch.setenv("LABCTL_PASSWORD", USERS[user][1])
        try:
            code = await asyncio.to_thread(main, argv)
        except SystemExit as e:  # argparse refuses the command line
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


async def test_durations_params_and_times():
    assert [parse_duration(t) for t in ("30s", "10m", "2h", "1d", "1h30m", "90", "0.5s", "1.5m")] == [
        30.0, 600.0, 7200.0, 86400.0, 5400.0, 90.0, 0.5, 90.0,
    ]  # fmt: skip
    for bad in ("", "ten", "10x", "-5", "0", "5m soon"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)
    assert parse_param("sp=0.5") == ("sp", "0.5") and parse_param("note=a=b") == ("note", "a=b")
    with pytest.raises(argparse.ArgumentTypeError, match="expected NAME=VALUE"):
        parse_param("sp")
    assert abs(parse_since("1h") - (time.time() - 3600)) < 60
    assert parse_since("2024-05-01T12:00:00+00:00") == 1714564800.0


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


async def refusal(labctl, *args: str, user: str | None = None) -> dict:
    """Run a command the server must refuse: one line without --json, one error object with it (returned)."""
    code, out, err = await labctl(*args, user=user)
    assert (code, out) == (1, "") and err.count("\n") == 1 and err.startswith(f"labctl {args[0]}: "), err
    code, out, err = await labctl(*args, "--json", user=user)
    assert (code, out) == (1, ""), "results only on standard output"
    return error_of(err)


def error_of(err: str) -> dict:
    """The one JSON error object a failing command prints with --json."""
    assert err.count("\n") == 1, err
    obj = strict(err)
    assert set(obj) >= {"kind", "error", "action", "target", "fields", "message"} and isinstance(obj["fields"], dict)
    return obj


async def test_lock_holds_and_renews_until_interrupted_then_releases(served):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABCTL_") or k == "LABCTL_CLIENT_PKI"} | {"LABCTL_PASSWORD": USERS["alice"][1]}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "labctl", "lock", "laser", "--for", "1.5s", "--url", served.url, "--user", "alice",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line.startswith("locked laser until ") and line.endswith(", renewed every 0.5s; Ctrl-C releases it\n"), line
        await wait_for(lambda: len(served.records("lock.renew", target="laser")) >= 2, timeout=10, what="renewals")
        assert served.control.arbiter.holder("laser").user == "alice"
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert out.decode().splitlines()[-1] == "released laser"
    assert served.control.arbiter.holder("laser") is None
    assert served.records("lock.release", target="laser", new="alice")


async def test_lock_in_one_terminal_put_in_another_with_its_token(served, labctl, monkeypatch):
    """The README's shell workflow: `labctl lock` holds the lock and prints its token; `labctl put --lease` (or LABCTL_LEASE) writes under it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABCTL_") or k == "LABCTL_CLIENT_PKI"} | {"LABCTL_PASSWORD": USERS["alice"][1]}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "labctl", "lock", "cryostat", "--for", "10m", "--url", served.url, "--user", "alice",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert (await asyncio.wait_for(proc.stdout.readline(), 60)).decode().startswith("locked cryostat until ")
        token_line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode().split()
        holder = served.control.arbiter.holder("cryostat")
        assert token_line[:2] == ["token", holder.token + ":"]
        code, _, err = await labctl("put", "CRYO:SP", "0.3", user="alice")  # another session of alice: refused
        assert code != 0, err
        assert served.db.read("CRYO:SP").value != 0.3
        code, out, err = await labctl("put", "CRYO:SP", "0.3", "--lease", holder.token, user="alice")
        assert code == 0, err
        assert served.db.read("CRYO:SP").value == 0.3
        monkeypatch.setenv("LABCTL_LEASE", holder.token)
        code, out, err = await labctl("put", "CRYO:SP", "0.4", user="alice")
        assert code == 0, err
        assert served.db.read("CRYO:SP").value == 0.4
        code, _, _ = await labctl("put", "CRYO:SP", "0.5", user="bob")  # another user with the token: refused
        assert code != 0 and served.db.read("CRYO:SP").value == 0.4
        monkeypatch.delenv("LABCTL_LEASE")
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert served.control.arbiter.holder("cryostat") is None


async def test_a_broken_lock_is_noticed_by_its_holder_at_once(served):
    """`labctl lock` holding for 10 minutes (renewing every 3m20s) learns of an admin's break at once and says so."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABCTL_") or k == "LABCTL_CLIENT_PKI"} | {"LABCTL_PASSWORD": USERS["alice"][1]}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "labctl", "lock", "laser", "--for", "10m", "--url", served.url, "--user", "alice",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line.startswith("locked laser until "), line
        served.control.break_lock("laser", ROOT, "test")
        out, err = await asyncio.wait_for(proc.communicate(), 30)  # long before the next renewal
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1
    assert "lost the lock of laser" in err.decode()


async def test_locks_lock_refused_and_unlock(served, labctl, open_session):
    alice = await open_session(served.url, "alice")
    lease = await alice.lock("cryostat", duration_s=300)
    code, out, err = await labctl("locks", user="bob")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["RESOURCE", "OWNER", "CLIENT", "EXPIRES", "QUEUE"]
    assert rows[1][:3] == ["cryostat", "alice", served.control.arbiter.holder("cryostat").client]
    assert rows[2] == ["laser", "-"]
    code, out, _ = await labctl("locks", "--json")
    first = strict(out)[0]
    assert first | {"client": None, "expires_at": None} == {
        "resource": "cryostat", "lockable": True, "owner": "alice", "client": None, "expires_at": None, "queue": [],
    }  # fmt: skip
    assert abs(utc(first["expires_at"]).timestamp() - lease.expires_at) < 1e-3
    assert strict(out)[1]["expires_at"] is None  # laser: nobody holds it

    held = await refusal(labctl, "lock", "cryostat", user="bob")
    assert held["kind"] == "conflict" and held["fields"].get("owner", "alice") == "alice"
    code, _, err = await labctl("lock", "cryostat", "--wait", "--wait-timeout", "0.3s", user="bob")
    assert code == 1 and "cryostat: lock not granted within 0.3 s; request withdrawn" in err
    assert served.control.arbiter.queue("cryostat") == []
    code, _, err = await labctl("lock", "nowhere", user="bob")
    assert code == 1 and err.count("\n") == 1
    assert (await refusal(labctl, "lock", "nowhere", user="bob"))["kind"] == "not_found"

    code, out, err = await labctl("unlock", "cryostat", user="alice")  # no token: alice's own lease
    assert (code, out) == (0, "released cryostat\n"), err
    assert (await refusal(labctl, "unlock", "cryostat", user="alice"))["kind"] == "conflict"
    code, _, err = await labctl("lock", "cryostat", "--for", "soon", user="alice")
    assert code == 2 and "expected a duration like 30s, 10m, 2h or 1h30m, got 'soon'" in err


async def test_submit_jobs_job_and_cancel(served, labctl):
    code, out, err = await labctl("submit", "measure", "--param", "sp=0.4", "--priority", "3", user="bob")
    assert code == 0, err
    job_id = int(out.split()[1])
    assert out == f"job {job_id} queued (measure, priority 3)\n"
    await wait_for(lambda: served.control.jobs.get(job_id).state.final, what="job done")
    code, out, _ = await labctl("jobs", "--mine", user="bob")
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["ID", "PROCEDURE", "OWNER", "STATE", "PRIORITY", "SUBMITTED", "ERROR"]
    assert rows[1][:5] == [str(job_id), "measure", "bob", "done", "3"]
    code, out, _ = await labctl("job", str(job_id), user="bob")
    assert code == 0
    text = out.splitlines()
    assert text[0] == f"job:       {job_id} (measure)" and "params:    sp=0.4, note='none'" in text
    assert text[text.index("RESULTS") + 1].split() == ["TIME", "PV", "VALUE", "SEVERITY", "STATUS", "LABEL"]
    assert text[text.index("RESULTS") + 2].split()[2:] == ["CRYO:SP", "0.4", "NO_ALARM", "NO_ALARM", "sp=0.4"]
    assert any(line.endswith("set CRYO:SP = 0.4") for line in text[text.index("LOG") :])
    code, out, _ = await labctl("job", str(job_id), "--json", user="bob")
    detail = strict(out)
    assert [(r["pv"], r["value"], r["label"]) for r in detail["results"]] == [("CRYO:SP", 0.4, "sp=0.4")]
    assert all(utc(r["time"]) for r in detail["results"]) and all(utc(e["time"]) for e in detail["log"])
    assert utc(detail["submitted_at"]) <= utc(detail["started_at"]) <= utc(detail["ended_at"])
    code, out, _ = await labctl("jobs", "--json", user="bob")
    listed = {j["id"]: j for j in strict(out)}[job_id]
    assert listed["state"] == "done" and utc(listed["ended_at"])
    assert (await refusal(labctl, "job", str(job_id), user="alice"))["kind"] == "forbidden"

    # A job that waits (its resource is locked): only its owner or an admin cancels it.
    lease = served.control.request_lock("cryostat", ROOT, duration_s=300)
    code, out, _ = await labctl("submit", "measure", "--param", "sp=0.5", "--json", user="bob")
    queued = strict(out)["id"]
    assert (await refusal(labctl, "cancel", str(queued), user="alice"))["kind"] == "forbidden"
    code, out, _ = await labctl("cancel", str(queued), user="bob")
    assert (code, out) == (0, f"job {queued} cancelled\n")
    assert (await refusal(labctl, "submit", "measure", "--param", "sp=7", user="bob"))["kind"] == "invalid"
    served.control.release_lock("cryostat", lease.token, ROOT)


async def test_audit_from_the_historian_with_filters(served, labctl, open_session):
    since = time.time()
    bob = await open_session(served.url, "bob")
    lease = await bob.lock("cryostat", duration_s=60)
    await bob.put("CRYO:SP", 0.3)
    await bob.unlock("cryostat", lease.token)
    code, out, err = await labctl("audit", "--since", "1h", "--by", "bob", "--pv", "CRYO:SP", user="alice")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "ACTION", "USER", "VIA", "HOST", "TARGET", "DETAIL", "RESULT"]
    last = lines[-1].split()[2:]
    assert last[:5] + last[6:] == ["write", "bob", "opcua", "127.0.0.1", "CRYO:SP", "->", "0.3", "ok"]
    code, out, _ = await labctl("audit", "--since", "1h", "--by", "bob", "--json", user="alice")
    records = [r for r in strict(out) if utc(r["time"]).timestamp() >= since]
    assert {r["user"] for r in strict(out)} == {"bob"}
    assert [(r["action"], r["target"]) for r in records if r["action"] != "login"] == [
        ("lock.grant", "cryostat"), ("write", "CRYO:SP"), ("lock.release", "cryostat"),
    ]  # fmt: skip
    assert served.control.audit_store is not None  # listed from the historian
    assert (await refusal(labctl, "audit", "--since", "1h"))["kind"] == "forbidden"
    code, _, err = await labctl("audit", "--since", "1h", "--login", "alice")
    assert code == 2 and "unrecognized arguments: --login" in err


async def test_audit_names_enum_states(served, labctl, open_session):
    bob = await open_session(served.url, "bob")
    await bob.put("LAB:MODE", "VENT")
    await bob.put("LAB:MODE", "PUMP")
    code, out, err = await labctl("audit", "--since", "1h", "--by", "bob", "--pv", "LAB:MODE", user="alice")
    assert code == 0, err
    details = [line.split()[-4:-1] for line in out.splitlines()[1:]]
    assert details[-2:] == [["IDLE", "->", "VENT"], ["VENT", "->", "PUMP"]]
    code, out, _ = await labctl("audit", "--since", "1h", "--by", "bob", "--pv", "LAB:MODE", "--json", user="alice")
    writes = [r for r in strict(out) if r["target"] == "LAB:MODE"]
    assert [(r["old_state"], r["new_state"]) for r in writes[-2:]] == [("IDLE", "VENT"), ("VENT", "PUMP")]
    assert [(r["old"], r["new"]) for r in writes[-2:]] == [(0, 2), (2, 1)]  # the numbers stay, the names come beside them


async def test_procedures_lists_parameters(labctl):
    code, out, err = await labctl("procedures", user="vic")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["PROCEDURE/PARAM", "RESOURCES", "TYPE", "DEFAULT", "RANGE", "DESCRIPTION"]
    assert rows[1] == ["measure", "cryostat", "set", "and", "read", "back"]
    assert rows[2] == ["sp", "float64", "(required)", "[0,", "1]", "the", "set", "point"]
    assert rows[3] == ["note", "string", "none"]
    code, out, _ = await labctl("procedures", "--json")
    (measure,) = strict(out)
    assert (measure["name"], measure["description"], measure["resources"]) == ("measure", "set and read back", ["cryostat"])
    assert measure["params"]["sp"]["type"] == "float64" and measure["params"]["sp"]["description"] == "the set point"
    assert measure["params"]["note"]["default"] == "none"


async def test_alarms_ack_shelve_and_interlocks(served, labctl):
    served.db.post("LAB:PRES", 0.05)
    served.db.post("LAB:PRES", 1.0e-6)
    code, out, _ = await labctl("alarms", user="vic")
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["SOURCE", "SEVERITY", "NOW", "STATUS", "VALUE", "STATE", "SINCE", "GUIDANCE"]
    assert rows[1][:7] == ["LAB:PRES", "MAJOR", "NO_ALARM", "NO_ALARM", "1.000e-06", "mbar", "UNACKED"]

    assert (await refusal(labctl, "ack", "LAB:PRES", user="vic"))["kind"] == "forbidden"
    code, out, err = await labctl("ack", "LAB:PRES", "--comment", "vented on purpose", user="alice")
    assert (code, out) == (0, "acknowledged LAB:PRES\n"), err
    assert served.records("alarm.ack", user="alice", target="LAB:PRES")[0].reason == "vented on purpose"
    code, _, err = await labctl("alarms", user="vic")
    assert (code, err) == (0, "no alarms\n")

    served.db.post("LAB:PRES", 5.0e-3)
    code, out, err = await labctl("shelve", "LAB:PRES", "--for", "1h", "--reason", "pumping", user="erin")
    assert (code, out) == (0, "shelved LAB:PRES for 1h00m\n"), err
    code, out, _ = await labctl("alarms", "--json", user="vic")
    (alarm,) = strict(out)
    assert alarm["source"] == "LAB:PRES" and utc(alarm["shelved_until"]).timestamp() > time.time() + 3500
    assert utc(alarm["since"]).timestamp() > time.time() - 3600
    code, out, _ = await labctl("unshelve", "LAB:PRES", user="erin")
    assert code == 0
    served.db.post("LAB:PRES", 1.0e-6)

    code, out, _ = await labctl("interlocks")
    assert [line.split(maxsplit=2) for line in out.splitlines()] == [["NAME", "STATE", "REASON  DESCRIPTION"], ["vacuum", "OK", "chamber vented"]]
    code, out, _ = await labctl("interlocks", "--json")
    (vacuum,) = strict(out)
    assert vacuum["state"] == "OK" and (vacuum["since"] is None or utc(vacuum["since"]))
    not_tripped = await refusal(labctl, "reset-interlock", "vacuum", user="erin")
    assert not_tripped["kind"] == "conflict" and not_tripped["fields"].get("interlock", "vacuum") == "vacuum"
    unknown = await refusal(labctl, "reset-interlock", "nope", user="erin")
    assert unknown["kind"] in ("not_found", "invalid")  # "invalid" while the server sends only BadInvalidArgument


async def test_the_sync_session_mirrors_the_control_calls(served):
    """The blocking wrapper (its own loop thread), driven from a worker thread as a script would."""
    from labctl.clients.sync import connect

    def script() -> None:
        with connect(served.url, "bob", USERS["bob"][1], "None", timeout_s=10) as bob:
            with bob.hold_lock("laser", 30) as held:
                assert {lk.resource: lk.owner for lk in bob.locks()}["laser"] == "bob"
                assert bob.renew("laser", held.lease.token, 60).expires_at >= held.lease.expires_at
            assert {lk.resource: lk.owner for lk in bob.locks()}["laser"] == ""
            job_id = bob.submit("measure", {"sp": 0.6})
            assert job_id in [j.id for j in bob.jobs(mine=True)]
            assert [p.name for p in bob.procedures()] == ["measure"]
            assert [i.name for i in bob.interlocks()] == ["vacuum"]
            assert isinstance(bob.alarms(), list)
            assert any(r["action"] == "job.state" for r in bob.audit(time.time() - 60, user="bob"))

    await asyncio.to_thread(script)
    await wait_for(lambda: all(j.state.final for j in served.control.jobs.list("bob")), what="bob's jobs done")


async def test_alarms_never_active_and_interlock_states_by_name(served, labctl):
    code, out, err = await labctl("alarms", "--all", user="vic")
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["LAB:FLOW"][:7] == ["LAB:FLOW", "NO_ALARM", "NO_ALARM", "NO_ALARM", "1.000", "l/s", "acked"]
    assert rows["LAB:FLOW"][7] == "-", "never active: no SINCE"
    code, out, _ = await labctl("alarms", "--all", "--json", user="vic")
    flow = {a["source"]: a for a in strict(out)}["LAB:FLOW"]
    assert flow["since"] is None and flow["value"] == 1.0

    served.db.post("LAB:PRES", 0.5)  # vented: the vacuum interlock trips
    rule = served.control.interlocks.rules["vacuum"]
    await wait_for(lambda: rule.state == "TRIPPED", what="vacuum tripped")
    state_pv = next(a.source for a in served.control.alarms.table.all() if a.source.startswith("ILK:"))
    await wait_for(lambda: served.control.alarms.table.get(state_pv).active, what="interlock alarm")
    code, out, err = await labctl("alarms", user="vic")
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows[state_pv][4] == "TRIPPED"
    code, out, _ = await labctl("alarms", "--json", user="vic")
    alarm = {a["source"]: a for a in strict(out)}[state_pv]
    assert (alarm["state"], alarm["value"]) == ("TRIPPED", 3)
    code, out, _ = await labctl("interlocks", "--json")
    (vacuum,) = strict(out)
    assert vacuum["state"] == "TRIPPED" and utc(vacuum["since"])

    served.db.post("LAB:PRES", 1.0e-6)
    await wait_for(lambda: rule.state == "RESET_NEEDED", what="vacuum waits for a reset")
    code, _, err = await labctl("reset-interlock", "vacuum", user="erin")
    assert code == 0, err
    await wait_for(lambda: rule.state == "OK", what="vacuum reset")


async def test_an_admin_breaks_a_lock_from_the_command_line_and_others_may_not(served, labctl):
    lease = served.control.request_lock("cryostat", Identity("alice", frozenset({"operator"}), "test"), duration_s=300, client="alice-console")
    denied = await refusal(labctl, "unlock", "cryostat", "--break", user="bob")
    assert (denied["kind"], denied["action"], denied["fields"]["user"]) == ("forbidden", "lock.break", "bob")
    assert served.control.arbiter.holder("cryostat") == lease  # permission before state: nothing changed
    code, out, err = await labctl("unlock", "cryostat", "--break", "--json", user="root")
    assert code == 0, err
    assert strict(out) == {"resource": "cryostat", "broken": True, "owner": "alice"}
    assert served.control.arbiter.holder("cryostat") is None
    breaks = [a for a in served.control.audit_log if a.action == "lock.break" and a.target == "cryostat"]
    assert [(a.user, a.accepted) for a in breaks] == [("bob", False), ("bob", False), ("root", True)]  # refusal() asks twice
    assert (await refusal(labctl, "unlock", "cryostat", "--break", user="root"))["kind"] == "conflict"  # nobody holds it now
