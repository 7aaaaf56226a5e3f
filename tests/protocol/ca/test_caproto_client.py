"""Channel Access over the wire with caproto's asyncio client (in the test's own loop).

caproto's client lets a test choose the user and host names it reports and does not
enforce access rights itself, so these tests also reach the server's refusals.
"""

from __future__ import annotations

import asyncio

import pytest
from caproto import AccessRights, ChannelType, SubscriptionType
from labctl.ioc.types import Severity, Status

from tests.helpers import wait_for
from tests.protocol.ca.support import Recorder, client, connect, serve, site_yaml

ALICE_WRITES = "rules:\n  - {users: [alice], hosts: [lab-pc], roles: [operator]}"


async def test_dbe_log_subscription_gets_only_archive_worthy_changes(ports, caproto_env):
    """TEST:TEMP has MDEL 0.01, ADEL 0.5, HIGH 200, HIHI 250."""
    async with serve(site_yaml(*ports)) as s, client(s.port, caproto_env) as ctx:
        pv = await connect(ctx, "TEST:TEMP")
        rec = Recorder()
        rec.add(pv, "log", SubscriptionType.DBE_LOG)
        rec.add(pv, "value", SubscriptionType.DBE_VALUE)
        rec.add(pv, "alarm", SubscriptionType.DBE_ALARM)
        rec.add(pv, "any", SubscriptionType.DBE_VALUE | SubscriptionType.DBE_LOG | SubscriptionType.DBE_ALARM)
        await rec.until(lambda: all(rec.got.values()))  # every subscription's first (current) value
        for value in [10.005, 10.02, 10.3, 10.6, 10.61, 11.2, 250.5, 250.6, 11.3, 11.4]:
            update = s.db.post("TEST:TEMP", value)
            if update is not None:  # wait until the update is through before the next one
                await rec.until(lambda value=value: rec.got["any"][-1][0] == value)
        values = {key: [v for v, _, _ in got] for key, got in rec.got.items()}
        assert values["log"] == [10.0, 10.6, 11.2, 250.5, 11.3]  # 0.5 apart, plus the alarm changes
        assert values["value"] == [10.0, 10.02, 10.3, 10.6, 11.2, 250.5, 250.6, 11.3, 11.4]
        assert rec.got["alarm"] == [(10.0, 0, 0), (250.5, Severity.MAJOR, Status.HIHI), (11.3, 0, 0)]
        assert values["any"] == values["value"]
        await rec.close()


async def test_write_refused_by_the_rules_reaches_the_core_and_its_audit(ports, caproto_env):
    async with serve(site_yaml(*ports, access=ALICE_WRITES)) as s:
        async with client(s.port, caproto_env, user="mallory", host="lab-pc") as ctx:
            pv = await connect(ctx, "TEST:TEMP")
            assert pv.access_rights == AccessRights.READ
            response = await pv.write([20.0], wait=True)  # caproto does not check rights itself
            assert response.status.name == "ECA_NOWTACCESS"
        async with client(s.port, caproto_env, user="alice", host="elsewhere") as ctx:
            pv = await connect(ctx, "TEST:TEMP")
            assert pv.access_rights == AccessRights.READ
            response = await pv.write([21.0], wait=True)
            assert response.status.name == "ECA_NOWTACCESS"
        async with client(s.port, caproto_env, user="alice", host="LAB-PC") as ctx:  # host names fold case
            pv = await connect(ctx, "TEST:TEMP")
            assert pv.access_rights == AccessRights.READ | AccessRights.WRITE
            response = await pv.write([22.0], wait=True)
            assert response.status.name == "ECA_NORMAL"
        assert s.db.read("TEST:TEMP").value == 22.0
        assert [(a.user, a.host, a.protocol, a.new, a.accepted) for a in s.audit] == [
            ("mallory", "lab-pc", "ca", 20.0, False),
            ("alice", "elsewhere", "ca", 21.0, False),
            ("alice", "LAB-PC", "ca", 22.0, True),
        ]
        assert s.audit[0].reason == "user 'mallory' may not write resource 'soft'"


async def test_plain_put_refusal_is_audited_and_reported(ports, caproto_env):
    async with serve(site_yaml(*ports, access=ALICE_WRITES)) as s, client(s.port, caproto_env, user="eve") as ctx:
        pv = await connect(ctx, "TEST:TEMP")
        await pv.write([30.0], wait=False)  # WRITE without notify: an error message comes back
        await wait_for(lambda: s.audit, what="the refused write's audit record")
        assert (s.audit[0].user, s.audit[0].accepted) == ("eve", False)
        assert s.db.read("TEST:TEMP").value == 10.0


async def test_fields_and_alarm_acknowledgement_cannot_be_written(ports, caproto_env):
    async with serve(site_yaml(*ports, access=ALICE_WRITES)) as s, client(s.port, caproto_env) as ctx:
        desc = await connect(ctx, "TEST:TEMP.DESC")
        assert desc.access_rights == AccessRights.READ
        response = await desc.write(["renamed"], wait=True)
        assert response.status.name == "ECA_NOWTACCESS"
        temp = await connect(ctx, "TEST:TEMP")
        response = await temp.write([1], data_type=ChannelType.PUT_ACKS, wait=True)
        assert response.status.name == "ECA_PUTFAIL"
        assert [(a.target, a.accepted) for a in s.audit] == [("TEST:TEMP.DESC", False), ("TEST:TEMP", False)]
        assert s.audit[0].reason == "the PV is read-only"
        assert "acknowledgement" in s.audit[1].reason
        assert (await desc.read()).data[0] == b"mixing chamber temperature"


@pytest.mark.parametrize(
    ("pv", "data", "data_type", "expected"),
    [
        ("TEST:TEMP", ["12.5"], ChannelType.STRING, 12.5),  # text is parsed, as an IOC does
        ("TEST:COUNT", ["0x10"], ChannelType.STRING, 16),
        ("TEST:COUNT", [12.0], ChannelType.DOUBLE, 12),
        ("TEST:COUNT", [20.7], ChannelType.DOUBLE, 20),  # truncated toward zero, as an IOC's C conversion
        ("TEST:ENABLED", [1.0], ChannelType.DOUBLE, True),  # caput's DBR_DOUBLE to a bool: the state index
        ("TEST:MODE", [2.0], ChannelType.DOUBLE, 2),
        ("TEST:MODE", ["2"], ChannelType.STRING, 2),
        ("TEST:MODE", ["AUTO"], ChannelType.STRING, 2),  # a state by name
        ("TEST:MODE", ["0"], ChannelType.STRING, 0),  # ...or by its index as text
        ("TEST:ENABLED", ["true"], ChannelType.STRING, True),
        ("TEST:ENABLED", [1], ChannelType.LONG, True),
        ("TEST:LABEL", [42], ChannelType.LONG, "42"),  # a number to a string PV is its text
        ("TEST:SPECTRUM", [1, 2, 3, 4, 5, 6, 7, 8], ChannelType.LONG, (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)),
        ("TEST:SPECTRUM", [9.0, 8.0], ChannelType.DOUBLE, (9.0, 8.0)),  # fewer: the PV holds that many (NORD)
        ("TEST:SPECTRUM", [9.0, 8.0], ChannelType.DOUBLE, (9.0, 8.0)),  # fewer: the PV holds that many (NORD)
    ],
)
async def test_values_are_converted_like_an_ioc_does(ports, caproto_env, pv, data, data_type, expected):
    async with serve(site_yaml(*ports, access=ALICE_WRITES)) as s, client(s.port, caproto_env) as ctx:
        channel = await connect(ctx, pv)
        response = await channel.write(data, data_type=data_type, wait=True)
        assert response.status.name == "ECA_NORMAL"
        assert s.db.read(pv).value == expected


@pytest.mark.parametrize(
    ("pv", "data", "data_type", "reason"),
    [
        ("TEST:TEMP", ["warm"], ChannelType.STRING, "expected a number"),
        ("TEST:MODE", ["TURBO"], ChannelType.STRING, "not one of the states"),
        ("TEST:MODE", [7], ChannelType.LONG, "outside 0..2"),
        ("TEST:SPECTRUM", [1.0] * 9, ChannelType.DOUBLE, "at most 8 allowed"),
        ("TEST:COUNT", [501], ChannelType.LONG, "outside the drive limits"),
    ],
)
async def test_bad_values_fail_the_put_and_are_audited(ports, caproto_env, pv, data, data_type, reason):
    async with serve(site_yaml(*ports, access=ALICE_WRITES)) as s, client(s.port, caproto_env) as ctx:
        before = s.db.read(pv).value
        channel = await connect(ctx, pv)
        response = await channel.write(data, data_type=data_type, wait=True)
        assert response.status.name == "ECA_PUTFAIL"
        assert s.db.read(pv).value == before
        (record,) = s.audit
        assert not record.accepted and reason in record.reason


async def test_long_strings_and_utf8(ports, caproto_env):
    pvs = """
pvs:
  - {name: T:NOTE, type: string, length: 80, writable: true, initial: ""}
  - {name: T:BATH, type: float64, unit: "°C", initial: 20.0}
  - {name: T:GAS, type: enum, states: [He³, He⁴, N₂], initial: 0}
"""
    async with serve(site_yaml(*ports, access=ALICE_WRITES, pvs=pvs)) as s, client(s.port, caproto_env) as ctx:
        note = await connect(ctx, "T:NOTE")
        whole = await connect(ctx, "T:NOTE.VAL$")  # the long-string form: DBR_CHAR, all of it
        assert whole.channel.native_data_type == ChannelType.CHAR
        text = "a long note about a cooldown: 50 mK reached after 36 hours"  # 59 characters
        assert (await whole.write(text.encode() + b"\0", wait=True)).status.name == "ECA_NORMAL"
        assert s.db.read("T:NOTE").value == text
        assert bytes((await whole.read()).data).rstrip(b"\0").decode() == text
        assert (await note.read()).data[0] == text[:39].encode()  # DBR_STRING: 39 bytes and the NUL
        bath = await connect(ctx, "T:BATH")
        assert (await bath.read(data_type="control")).metadata.units.decode() == "°C"
        gas = await connect(ctx, "T:GAS")
        md = (await gas.read(data_type="control")).metadata
        assert [x.decode() for x in md.enum_strings] == ["He³", "He⁴", "N₂"]
        s.db.post("T:NOTE", "é" * 30)  # 60 bytes in UTF-8: cut at a character boundary
        await wait_for(lambda: s.service.channels["T:NOTE"].value == "é" * 30)
        assert (await note.read()).data[0].decode() == "é" * 19


async def test_many_states_and_wide_integers(ports, caproto_env):
    states = [f"S{k}" for k in range(20)]
    pvs = f"""
pvs:
  - {{name: T:STEP, type: enum, states: {states}, initial: S18}}
  - {{name: T:TICKS, type: int, initial: 5000000000}}
"""
    async with serve(site_yaml(*ports, pvs=pvs)) as s, client(s.port, caproto_env) as ctx:
        step = await connect(ctx, "T:STEP")
        assert (await step.read()).data[0] == 18
        assert (await step.read(data_type=ChannelType.STRING)).data[0] == b"S18"
        md = (await step.read(data_type="control")).metadata
        assert len(md.enum_strings) == 16  # what DBR_CTRL_ENUM can carry
        ticks = await connect(ctx, "T:TICKS")
        got = await ticks.read(data_type="time")
        assert got.data[0] == 2**31 - 1  # DBR_LONG cannot hold it: saturated and flagged
        assert (got.metadata.severity, got.metadata.status) == (Severity.INVALID, Status.HWLIMIT)
        assert s.db.read("T:TICKS").severity is Severity.NO_ALARM  # the core's reading is untouched


async def test_severity_fields_post_monitors(ports, caproto_env):
    async with serve(site_yaml(*ports)) as s, client(s.port, caproto_env) as ctx:
        sevr = await connect(ctx, "TEST:TEMP.SEVR")
        rec = Recorder()
        rec.add(sevr, "sevr", SubscriptionType.DBE_VALUE | SubscriptionType.DBE_ALARM)
        await rec.until(lambda: rec.got["sevr"])
        s.db.post("TEST:TEMP", 260.0)
        await rec.until(lambda: rec.got["sevr"][-1][0] == Severity.MAJOR)
        s.db.post("TEST:TEMP", 10.0)
        await rec.until(lambda: rec.got["sevr"][-1][0] == Severity.NO_ALARM)
        assert [v for v, _, _ in rec.got["sevr"]] == [0, 2, 0]
        await rec.close()


async def test_a_monitor_whose_value_cannot_be_converted_gets_a_failed_update_and_goes_on(ports, caproto_env):
    """As an IOC: a string PV monitored as DBR_DOUBLE gets ECA_GETFAIL while its text is no number."""
    pvs = "pvs:\n  - {name: T:TEXT, type: string, writable: true, initial: '12.5'}\n"
    async with serve(site_yaml(*ports, pvs=pvs)) as s, client(s.port, caproto_env) as ctx:
        pv = await connect(ctx, "T:TEXT")
        got: list[tuple[str, object]] = []
        changed = asyncio.Event()

        async def record(sub, response):
            ok = response.status.name == "ECA_NORMAL"
            got.append((response.status.name, response.data[0] if ok else None))
            changed.set()

        sub = pv.subscribe(data_type=ChannelType.TIME_DOUBLE)
        sub.add_callback(record)

        async def next_update():
            await asyncio.wait_for(changed.wait(), 10.0)
            changed.clear()
            return got[-1]

        assert await next_update() == ("ECA_NORMAL", 12.5)
        s.db.post("T:TEXT", "warm")
        assert await next_update() == ("ECA_GETFAIL", None)
        s.db.post("T:TEXT", "7")
        assert await next_update() == ("ECA_NORMAL", 7.0)
        await sub.clear()
