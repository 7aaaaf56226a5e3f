"""Writes over OPC UA go through the core write path; refusals map to StatusCodes and are audited."""

from __future__ import annotations

import pytest
from asyncua import ua
from asyncua.ua.uaerrors import UaStatusCodeError
from labctl.ioc.errors import DriverFault, DriverTimeout, Interlocked, LockedBy, WrittenUnconfirmed
from labctl.ioc.types import Identity
from labctl.server.opcua.refusals import BY_KIND, SPECIFIC, status_of

from .conftest import SITE, ns, pv_node

WRITES = [
    ("LAB:TEMP", ua.Variant(12.5, ua.VariantType.Double), 12.5),
    ("LAB:COUNT", ua.Variant(99, ua.VariantType.Int64), 99),
    ("LAB:VALVE", ua.Variant(True, ua.VariantType.Boolean), True),
    ("LAB:MODE", ua.Variant(2, ua.VariantType.UInt32), 2),
    ("LAB:NOTE", ua.Variant("bye", ua.VariantType.String), "bye"),
    ("LAB:WAVE", ua.Variant([4.0, 5.0, 6.0], ua.VariantType.Double, is_array=True), (4.0, 5.0, 6.0)),
]


async def write(client, name: str, variant: ua.Variant) -> ua.StatusCode:
    """One Write of one node; the StatusCode the server returned for it."""
    node = await pv_node(client, name)
    params = ua.WriteParameters()
    wv = ua.WriteValue()
    wv.NodeId = node.nodeid
    wv.AttributeId = ua.AttributeIds.Value
    wv.Value = ua.DataValue(variant)
    params.NodesToWrite.append(wv)
    return (await client.uaclient.write(params))[0]


async def last_refusal(client) -> str:
    idx = await ns(client)
    return await client.get_node(ua.NodeId(f"/{SITE}/Session/LastWriteRefusal", idx)).read_value()


async def test_operator_writes_every_type(server, connect, audit):
    client = await connect("operator")
    for name, variant, expected in WRITES:
        status = await write(client, name, variant)
        assert status.is_good(), (name, status)
        assert server.db.read(name).value == expected, name
        got = await (await pv_node(client, name)).read_value()
        assert (tuple(got) if isinstance(got, list) else got) == expected, name
        record = audit.of("write")[-1]
        assert (record.target, record.user, record.protocol, record.host, record.accepted) == (name, "operator", "opcua", "127.0.0.1", True)


async def test_compatible_numbers_and_state_names_are_accepted(server, connect):
    client = await connect("operator")
    assert (await write(client, "LAB:TEMP", ua.Variant(3, ua.VariantType.Int32))).is_good()
    assert server.db.read("LAB:TEMP").value == 3.0
    assert (await write(client, "LAB:MODE", ua.Variant("HIGH", ua.VariantType.String))).is_good()
    assert server.db.read("LAB:MODE").value == 2


REFUSED = [
    # (user, PV, value, StatusCode, words of the reason)
    ("operator", "LAB:PRES", ua.Variant(1.0), ua.StatusCodes.BadNotWritable, "read-only"),
    ("operator", "LAB:DOUBLE", ua.Variant(1.0), ua.StatusCodes.BadNotWritable, "read-only"),
    ("viewer", "LAB:TEMP", ua.Variant(1.0), ua.StatusCodes.BadUserAccessDenied, "user 'viewer' may not write resource 'soft'"),
    ("tech", "LAB:TEMP", ua.Variant(1.0), ua.StatusCodes.BadUserAccessDenied, "user 'tech' may not write resource 'soft'"),
    (None, "LAB:TEMP", ua.Variant(1.0), ua.StatusCodes.BadUserAccessDenied, "user 'anonymous' may not write"),
    ("operator", "LAB:TEMP", ua.Variant(400.0), ua.StatusCodes.BadOutOfRange, "outside the drive limits [0.0, 350.0]"),
    ("operator", "LAB:TEMP", ua.Variant("warm"), ua.StatusCodes.BadTypeMismatch, "expected a number"),
    ("operator", "LAB:TEMP", ua.Variant(True), ua.StatusCodes.BadTypeMismatch, "expected a number"),
    ("operator", "LAB:COUNT", ua.Variant(1.5), ua.StatusCodes.BadTypeMismatch, "expected an integer"),
    ("operator", "LAB:MODE", ua.Variant(7, ua.VariantType.UInt32), ua.StatusCodes.BadOutOfRange, "outside 0..2"),  # Part 8
    ("operator", "LAB:NOTE", ua.Variant("x" * 30), ua.StatusCodes.BadTypeMismatch, "at most 20"),
    ("operator", "LAB:WAVE", ua.Variant([1.0, 2.0, 3.0, 4.0], ua.VariantType.Double, is_array=True), ua.StatusCodes.BadTypeMismatch, "at most 3"),
    ("operator", "LAB:TEMP", ua.Variant(float("nan")), ua.StatusCodes.BadTypeMismatch, "nan"),
]


async def test_refusals_map_to_status_codes_and_are_audited(server, connect, audit):
    clients = {user: await connect(user) for user in {r[0] for r in REFUSED}}
    for user, name, variant, code, words in REFUSED:
        case = f"{user} writing {name}={variant.Value!r}"
        client = clients[user]
        before = server.db.read(name)
        status = await write(client, name, variant)
        assert status.value == code, (case, status.name)
        assert server.db.read(name) == before, f"{case}: a refused write changes nothing"
        record = audit.of("write")[-1]
        assert (record.target, record.accepted) == (name, False), case
        assert words in record.reason, case
        assert record.user == (user or "anonymous"), case
        text = await last_refusal(client)
        assert text.startswith(f"{name}: write refused: ") and words in text, (case, text)
    assert len(audit.of("write")) == len(REFUSED)


async def test_locked_resource_is_bad_locked_with_owner(server, connect, audit):
    class HeldByAlice:
        def check_write(self, identity: Identity, pv: str, resource: str, now: float) -> None:
            if identity.user != "alice":
                raise LockedBy(pv, resource, "alice", now + 600.0, job=42)

    server.db.locks = HeldByAlice()
    client = await connect("operator")
    status = await write(client, "LAB:TEMP", ua.Variant(1.0))
    assert status.value == ua.StatusCodes.BadLocked
    assert "locked by alice (job 42) until" in await last_refusal(client)
    assert "locked by alice" in audit.of("write")[0].reason


async def test_interlock_is_bad_invalid_state(server, connect):
    class HeaterInterlock:
        def check_write(self, identity: Identity, pv: str, resource: str, value: object) -> None:
            raise Interlocked(pv, "mxc_overheat", "mixing chamber above 0.1 K")

    server.db.interlocks = HeaterInterlock()
    client = await connect("operator")
    status = await write(client, "LAB:TEMP", ua.Variant(1.0))
    assert status.value == ua.StatusCodes.BadInvalidState
    assert "interlock 'mxc_overheat' is tripped: mixing chamber above 0.1 K" in await last_refusal(client)


@pytest.mark.parametrize(
    ("error", "code"),
    [(DriverFault("ctl", "link down"), ua.StatusCodes.BadCommunicationError), (DriverTimeout("ctl", "no answer"), ua.StatusCodes.BadTimeout)],
)
async def test_driver_failures(instrument_server, connect_to, error, code):
    service, inst, db = instrument_server
    client = await connect_to(service.url, "operator")
    idx = await ns(client)
    node = client.get_node(ua.NodeId("CTL:SETP", idx))
    await node.write_value(ua.DataValue(ua.Variant(2.5, ua.VariantType.Double)))
    assert inst.values["setpoint"] == 2.5 and db.read("CTL:SETP").value == 2.5
    inst.fail_writes = error
    with pytest.raises(UaStatusCodeError) as e:
        await node.write_value(ua.DataValue(ua.Variant(3.0, ua.VariantType.Double)))
    assert e.value.code == code
    text = await client.get_node(ua.NodeId(f"/{SITE}/Session/LastWriteRefusal", idx)).read_value()
    assert text == f"CTL:SETP: write failed: {error}"


async def test_refusal_text_is_per_session_and_cleared_by_success(connect):
    alice, bob = await connect("operator"), await connect("operator")
    await write(alice, "LAB:TEMP", ua.Variant(999.0))
    assert "outside the drive limits" in await last_refusal(alice)
    assert await last_refusal(bob) == ""
    assert (await write(alice, "LAB:TEMP", ua.Variant(1.0))).is_good()
    assert await last_refusal(alice) == ""


async def test_other_attributes_and_nodes_are_not_writable(connect):
    client = await connect("admin")
    node = await pv_node(client, "LAB:TEMP")
    with pytest.raises(UaStatusCodeError) as e:
        await node.write_attribute(ua.AttributeIds.DisplayName, ua.DataValue(ua.Variant(ua.LocalizedText("x"))))
    assert e.value.code == ua.StatusCodes.BadNotWritable
    server_name = client.get_node(ua.NodeId(ua.ObjectIds.Server_ServerStatus_BuildInfo_ProductName))
    with pytest.raises(UaStatusCodeError) as e:
        await server_name.write_value(ua.DataValue(ua.Variant("pwned")))
    assert e.value.code == ua.StatusCodes.BadUserAccessDenied
    eurange = await node.get_child("0:EURange")
    with pytest.raises(UaStatusCodeError):
        await eurange.write_value(ua.DataValue(ua.Variant(ua.Range(0, 1))))


async def test_index_range_writes_are_refused(connect):
    client = await connect("operator")
    node = await pv_node(client, "LAB:WAVE")
    params = ua.WriteParameters()
    wv = ua.WriteValue()
    wv.NodeId = node.nodeid
    wv.AttributeId = ua.AttributeIds.Value
    wv.IndexRange = "1"
    wv.Value = ua.DataValue(ua.Variant([9.0], ua.VariantType.Double, is_array=True))
    params.NodesToWrite.append(wv)
    (status,) = await client.uaclient.write(params)
    assert status.value == ua.StatusCodes.BadWriteNotSupported


async def test_one_request_many_nodes_one_status_each(server, connect):
    client = await connect("operator")
    idx = await ns(client)
    params = ua.WriteParameters()
    for name, value in (("LAB:TEMP", 5.0), ("LAB:PRES", 1.0), ("LAB:TEMP", 500.0), ("LAB:FLOW", 3.0)):
        wv = ua.WriteValue()
        wv.NodeId = ua.NodeId(name, idx)
        wv.AttributeId = ua.AttributeIds.Value
        wv.Value = ua.DataValue(ua.Variant(value, ua.VariantType.Double))
        params.NodesToWrite.append(wv)
    codes = [s.value for s in await client.uaclient.write(params)]
    assert codes == [ua.StatusCodes.Good, ua.StatusCodes.BadNotWritable, ua.StatusCodes.BadOutOfRange, ua.StatusCodes.Good]
    assert server.db.read("LAB:TEMP").value == 5.0 and server.db.read("LAB:FLOW").value == 3.0


USER_ACCESS = {
    # user: (LAB:TEMP, LAB:PRES, LAB:HEATER)
    None: (1, 1, 1),
    "viewer": (1, 1, 1),
    "operator": (3, 1, 3),
    "expert": (3, 1, 3),
    "admin": (3, 1, 3),
    "tech": (1, 1, 3),
}


async def test_user_access_level_reflects_roles(connect):
    for user, expected in USER_ACCESS.items():
        client = await connect(user)
        levels = []
        for name in ("LAB:TEMP", "LAB:PRES", "LAB:HEATER"):
            node = await pv_node(client, name)
            levels.append((await node.read_attribute(ua.AttributeIds.UserAccessLevel)).Value.Value)
            access = (await node.read_attribute(ua.AttributeIds.AccessLevel)).Value.Value
            assert access == (1 if name == "LAB:PRES" else 3), name
        assert tuple(levels) == expected, user


async def test_session_variables_say_who_you_are(connect):
    client = await connect("tech")
    idx = await ns(client)
    user = await client.get_node(ua.NodeId(f"/{SITE}/Session/User", idx)).read_value()
    roles = await client.get_node(ua.NodeId(f"/{SITE}/Session/Roles", idx)).read_value()
    assert (user, roles) == ("tech", ["cryo_tech"])


def test_refusal_table_prefers_the_most_specific_class():
    assert status_of(DriverTimeout("x", "y")) == ua.StatusCodes.BadTimeout
    assert status_of(DriverFault("x", "y")) == ua.StatusCodes.BadCommunicationError
    assert status_of(LockedBy("P", "r", "alice", None)) == ua.StatusCodes.BadLocked
    assert status_of(RuntimeError("bug")) == ua.StatusCodes.BadInternalError
    unconfirmed = WrittenUnconfirmed("x", "P", 1.0, DriverTimeout("x", "y"))
    assert status_of(unconfirmed) == ua.StatusCodes.UncertainNoCommunicationLastUsableValue  # sent: not Bad
    refusals = {cls: code for cls, code in SPECIFIC.items() if cls is not WrittenUnconfirmed}
    assert all(ua.StatusCode(code).is_bad() for code in [*refusals.values(), *BY_KIND.values()])
