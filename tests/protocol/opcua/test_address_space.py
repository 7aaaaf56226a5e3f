"""The address space as an asyncua client sees it: names, paths, types, metadata, values, quality, alarm states."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from asyncua import Server as UaServer
from asyncua import ua
from asyncua.server.internal_server import InternalServer
from asyncua.ua.ua_binary import struct_to_binary
from labctl.clients.values import alarm_of, quality
from labctl.ioc.pv import PVInfo
from labctl.ioc.types import PVType, Reading, Severity, Status
from labctl.server.app import Server
from labctl.server.opcua.address_space import MAX_CHILDREN, build, folder_layout
from labctl.server.opcua.builders import Builder
from labctl.server.opcua.units import eu_information, unit_id
from labctl.server.opcua.values import ALARM_STATE_TYPE, QUALITY, alarm_state, alarm_state_name, status_code

from .conftest import NAMESPACE, SITE, make_site, ns, pv_node

EXPECTED_TYPES = {
    "LAB:TEMP": (ua.ObjectIds.Double, ua.ValueRank.Scalar, ua.ObjectIds.AnalogItemType),
    "LAB:COUNT": (ua.ObjectIds.Int64, ua.ValueRank.Scalar, ua.ObjectIds.AnalogItemType),
    "LAB:VALVE": (ua.ObjectIds.Boolean, ua.ValueRank.Scalar, ua.ObjectIds.BaseDataVariableType),
    "LAB:MODE": (ua.ObjectIds.UInt32, ua.ValueRank.Scalar, ua.ObjectIds.MultiStateDiscreteType),
    "LAB:NOTE": (ua.ObjectIds.String, ua.ValueRank.Scalar, ua.ObjectIds.BaseDataVariableType),
    "LAB:WAVE": (ua.ObjectIds.Double, ua.ValueRank.OneDimension, ua.ObjectIds.AnalogItemType),
    "LAB:PRES": (ua.ObjectIds.Double, ua.ValueRank.Scalar, ua.ObjectIds.BaseAnalogType),
}


async def test_namespace_and_stable_node_ids(server, connect):
    client = await connect()
    idx = await client.get_namespace_index(NAMESPACE)
    assert (await client.get_namespace_array())[idx] == NAMESPACE
    for name in server.db.names():
        node = client.get_node(ua.NodeId(name, idx))
        assert (await node.read_node_class()) == ua.NodeClass.Variable, name
        assert node.nodeid.to_string() == f"ns={idx};s={name}"


async def test_browse_path_objects_site_folder_pv(connect):
    client = await connect()
    idx = await ns(client)
    temp = await client.nodes.objects.get_child([f"{idx}:{SITE}", f"{idx}:soft", f"{idx}:LAB:TEMP"])
    assert temp.nodeid == ua.NodeId("LAB:TEMP", idx)
    double = await client.nodes.objects.get_child([f"{idx}:{SITE}", f"{idx}:derived", f"{idx}:LAB:DOUBLE"])
    assert double.nodeid == ua.NodeId("LAB:DOUBLE", idx)
    names = {(await c.read_browse_name()).Name for c in await client.get_node(ua.NodeId(f"/{SITE}", idx)).get_children()}
    assert names == {"soft", "derived", "Session", "Control"}  # no Resources: the site has no lockable resource


async def test_instrument_pvs_browse_by_pv_name_under_their_instrument(instrument_server, connect_to):
    service, _, _ = instrument_server
    client = await connect_to(service.url)
    idx = await ns(client)
    node = await client.nodes.objects.get_child([f"{idx}:{SITE}", f"{idx}:ctl", f"{idx}:CTL:TEMP"])
    assert node.nodeid == ua.NodeId("CTL:TEMP", idx)
    assert (await node.read_browse_name()) == ua.QualifiedName("CTL:TEMP", idx)
    assert (await node.read_display_name()).Text == "CTL:TEMP", "a tag browser lists the PV name, not the driver channel"
    children = await client.get_node(ua.NodeId(f"/{SITE}/ctl", idx)).get_children_descriptions()
    assert sorted((c.BrowseName.Name, c.DisplayName.Text) for c in children) == [("CTL:SETP", "CTL:SETP"), ("CTL:TEMP", "CTL:TEMP")]
    assert await node.read_value() == 4.0
    assert (await node.read_attribute(ua.AttributeIds.MinimumSamplingInterval)).Value.Value == pytest.approx(100.0)


async def test_data_type_value_rank_and_type_definition(connect):
    client = await connect()
    for name, (dtype, rank, typedef) in EXPECTED_TYPES.items():
        node = await pv_node(client, name)
        assert (await node.read_data_type()) == ua.NodeId(dtype), name
        assert (await node.read_value_rank()) == rank, name
        assert (await node.read_type_definition()) == ua.NodeId(typedef), name


async def test_array_dimensions(connect):
    client = await connect()
    wave = await pv_node(client, "LAB:WAVE")
    assert (await wave.read_array_dimensions()) == [3]
    assert (await wave.read_value()) == [1.0, 2.0, 3.0]


async def test_analog_metadata_engineering_units_and_eurange(connect):
    client = await connect()
    temp = await pv_node(client, "LAB:TEMP")
    eu = await (await temp.get_child("0:EngineeringUnits")).read_value()
    assert eu.NamespaceUri == "http://www.opcfoundation.org/UA/units/un/cefact"
    assert eu.UnitId == unit_id("KEL") == 4932940
    assert eu.DisplayName.Text == "K"
    assert eu.Description.Text == "kelvin"
    rng = await (await temp.get_child("0:EURange")).read_value()
    assert (rng.Low, rng.High) == (0.0, 300.0)
    assert (await temp.read_description()).Text == "sample temperature"
    # drive limits stand in for a missing display range
    count_range = await (await (await pv_node(client, "LAB:COUNT")).get_child("0:EURange")).read_value()
    assert (count_range.Low, count_range.High) == (0.0, 1000.0)
    # a unit with no UNECE code keeps its symbol
    flow_eu = await (await (await pv_node(client, "LAB:FLOW")).get_child("0:EngineeringUnits")).read_value()
    assert (flow_eu.UnitId, flow_eu.DisplayName.Text) == (-1, "sccm")


async def test_enum_strings(connect):
    client = await connect()
    mode = await pv_node(client, "LAB:MODE")
    states = await (await mode.get_child("0:EnumStrings")).read_value()
    assert [s.Text for s in states] == ["OFF", "LOW", "HIGH"]
    assert await mode.read_value() == 1


@pytest.mark.parametrize(
    ("symbol", "code"),
    [("K", "KEL"), ("mbar", "MBR"), ("Pa", "PAL"), ("V", "VLT"), ("A", "AMP"), ("W", "WTT"), ("Ohm", "OHM"), ("T", "D33"),
     ("%", "P1"), ("s", "SEC"), ("Hz", "HTZ"), ("mA", "4K"), ("Torr", "UA")],
)
def test_unece_codes(symbol, code):
    eu = eu_information(symbol)
    assert eu.UnitId == unit_id(code)
    assert eu.DisplayName.Text == symbol


async def test_values_and_source_timestamps(server, connect):
    client = await connect()
    expected = {"LAB:TEMP": 4.2, "LAB:COUNT": 7, "LAB:VALVE": False, "LAB:MODE": 1, "LAB:NOTE": "hello", "LAB:WAVE": [1.0, 2.0, 3.0]}
    for name, value in expected.items():
        dv = await (await pv_node(client, name)).read_data_value()
        assert dv.Value.Value == value, name
        assert dv.StatusCode.is_good()
        assert dv.SourceTimestamp.timestamp() == pytest.approx(server.db.read(name).timestamp, abs=1e-5)
        assert dv.ServerTimestamp is not None


async def test_undefined_pv_reads_bad_waiting_for_initial_data(connect):
    client = await connect()
    dv = await (await pv_node(client, "LAB:FRESH")).read_data_value(raise_on_bad_status=False)
    assert dv.StatusCode.value == ua.StatusCodes.BadWaitingForInitialData
    assert dv.Value.Value is None


async def test_lost_instrument_reads_bad_communication_error(server, connect):
    client = await connect()
    node = await pv_node(client, "LAB:PRES")
    server.db.invalidate(["LAB:PRES"], Status.COMM)
    dv = await node.read_data_value(raise_on_bad_status=False)
    assert dv.StatusCode.value == ua.StatusCodes.BadCommunicationError
    assert dv.Value.Value is None, "an INVALID value must not look like a good one"
    server.db.invalidate(["LAB:PRES"], Status.TIMEOUT)
    assert (await node.read_data_value(raise_on_bad_status=False)).StatusCode.value == ua.StatusCodes.BadTimeout
    server.db.post("LAB:PRES", 2.0e-6)
    dv = await node.read_data_value()
    assert (dv.StatusCode.value, dv.Value.Value) == (ua.StatusCodes.Good, 2.0e-6)


async def test_derived_pv_of_invalid_input_is_bad(server, connect):
    client = await connect()
    server.db.invalidate(["LAB:TEMP"], Status.COMM)
    dv = await (await pv_node(client, "LAB:DOUBLE")).read_data_value(raise_on_bad_status=False)
    assert dv.StatusCode.is_bad()


async def test_alarms_read_good_with_the_alarm_in_the_alarm_state(server, connect):
    client = await connect()
    idx = await ns(client)
    node = await pv_node(client, "LAB:TEMP")
    alarm = await node.get_child(f"{idx}:AlarmState")
    assert alarm.nodeid == ua.NodeId("LAB:TEMP.AlarmState", idx)
    assert (await alarm.read_data_type()) == ua.NodeId(ALARM_STATE_TYPE, idx)
    assert await alarm.read_value() == 0
    server.db.post("LAB:TEMP", 150.0)  # above high: MINOR HIGH
    dv = await node.read_data_value()
    assert (dv.StatusCode.value, dv.Value.Value) == (ua.StatusCodes.Good, 150.0), "an alarm is no quality problem: no limit bits"
    assert await alarm.read_value() == alarm_state(Severity.MINOR, Status.HIGH) == 104
    server.db.post("LAB:TEMP", 250.0)  # above hihi: MAJOR HIHI
    dv = await node.read_data_value()
    assert (dv.StatusCode.value, dv.Value.Value) == (ua.StatusCodes.Good, 250.0), "an alarming value is still a value"
    state = await alarm.read_data_value()
    assert state.Value.Value == 203 and state.SourceTimestamp == dv.SourceTimestamp
    server.db.invalidate(["LAB:TEMP"], Status.COMM)
    assert (await node.read_data_value(raise_on_bad_status=False)).StatusCode.value == ua.StatusCodes.BadCommunicationError
    assert await alarm.read_value() == 309


async def test_alarm_state_is_an_enumeration_a_generic_client_can_name(connect):
    client = await connect()
    idx = await ns(client)
    dtype = client.get_node(ua.NodeId(ALARM_STATE_TYPE, idx))
    assert (await dtype.read_node_class()) == ua.NodeClass.DataType
    assert (await dtype.read_browse_name()).Name == "EpicsAlarmState"
    values = {v.Value: v.DisplayName.Text for v in await (await dtype.get_child("0:EnumValues")).read_value()}
    assert (values[0], values[104], values[203], values[309]) == ("NO_ALARM", "MINOR HIGH", "MAJOR HIHI", "INVALID COMM")
    definition = (await dtype.read_attribute(ua.AttributeIds.DataTypeDefinition)).Value.Value
    assert {f.Value: f.Name for f in definition.Fields} == values


@pytest.mark.parametrize(
    ("status", "code"),
    [(Status.COMM, "BadCommunicationError"), (Status.TIMEOUT, "BadTimeout"), (Status.UDF, "BadWaitingForInitialData"),
     (Status.DISABLE, "BadOutOfService"), (Status.READ, "BadDeviceFailure"), (Status.HWLIMIT, "BadSensorFailure"),
     (Status.LINK, "BadNoCommunication"), (Status.CALC, "BadDataUnavailable"), (Status.SOFT, "Bad")],
)  # fmt: skip
def test_invalid_reads_bad_with_its_reason(status, code):
    assert status_code(Reading(None, 0.0, Severity.INVALID, status)).value == getattr(ua.StatusCodes, code)


def test_quality_table_round_trips_through_the_client_library():
    for severity, status in itertools.product(Severity, Status):
        code = status_code(Reading(1.0, 0.0, severity, status)).value
        if severity is Severity.INVALID:
            assert quality(code) == (Severity.INVALID, status if (severity, status) in QUALITY else Status.READ), status
        else:
            assert code == ua.StatusCodes.Good, (severity, status)
        state = alarm_state(severity, status)
        assert alarm_of(state) == (severity, status)
        assert alarm_state_name(state) == ("NO_ALARM" if state == 0 else f"{severity.name} {status.name}")


def test_folders_hold_at_most_max_children():
    infos = [PVInfo(f"BIG:G{g}:PV{i:03d}", PVType.FLOAT64, "soft", initial=0.0) for g in range(3) for i in range(150)]
    infos += [PVInfo(f"FLAT{i:04d}", PVType.FLOAT64, "soft", initial=0.0) for i in range(230)]
    root = folder_layout(SITE, infos)
    seen = []

    def walk(folder):
        assert len(folder.children) + len(folder.pvs) <= MAX_CHILDREN, folder.path
        seen.extend(info.name for _, info in folder.pvs)
        for child in folder.children:
            walk(child)

    walk(root)
    assert sorted(seen) == sorted(i.name for i in infos)


async def test_big_site_is_browsable_in_small_folders(tmp_path, connect_to):
    pvs = "pvs:\n" + "".join(f'  - {{name: "BIG:G{g}:PV{i:03d}", type: int, initial: {i}}}\n' for g in range(2) for i in range(120))
    srv = Server(make_site(tmp_path, pvs=pvs))
    await srv.start()
    try:
        client = await connect_to(srv.service("opcua").url)
        idx = await ns(client)
        node = await client.nodes.objects.get_child([f"{idx}:{SITE}", f"{idx}:soft", f"{idx}:BIG", f"{idx}:G1"])
        children = await node.get_children()
        assert 0 < len(children) <= MAX_CHILDREN
        total = 0
        for child in children:
            total += len(await child.get_children()) if await child.read_node_class() == ua.NodeClass.Object else 1
        assert total == 120
        assert await client.get_node(ua.NodeId("BIG:G1:PV119", idx)).read_value() == 119
    finally:
        await srv.stop()


async def test_restart_keeps_node_ids_namespace_and_certificate(tmp_path, connect_to):
    site = make_site(tmp_path)
    seen = []
    for _ in range(2):
        srv = Server(site)
        await srv.start()
        try:
            client = await connect_to(srv.service("opcua").url)
            idx = await ns(client)
            endpoints = await client.get_endpoints()
            cert = {e.ServerCertificate for e in endpoints}
            assert len(cert) == 1
            ids = sorted(n.nodeid.to_string() for n in [client.get_node(ua.NodeId(name, idx)) for name in srv.db.names()])
            for nid in ids:
                await client.get_node(nid).read_browse_name()  # every one exists
            seen.append((idx, ids, cert.pop()))
            await client.disconnect()
        finally:
            await srv.stop()
    assert seen[0] == seen[1]
    assert (tmp_path / "state" / "pki" / "server_key.pem").stat().st_mode & 0o077 == 0


async def test_site_edits_keep_the_node_ids_of_unchanged_pvs(tmp_path, connect_to):
    """NodeIds come from names only: adding a PV in front changes no other PV's NodeId."""
    first = make_site(tmp_path, pvs='pvs:\n  - {name: "B", type: int, initial: 1}\n')
    second = make_site(tmp_path, pvs='pvs:\n  - {name: "A", type: int, initial: 0}\n  - {name: "B", type: int, initial: 1}\n')
    nodeids = []
    for site in (first, second):
        srv = Server(site)
        await srv.start()
        try:
            client = await connect_to(srv.service("opcua").url)
            idx = await ns(client)
            node = await client.nodes.objects.get_child([f"{idx}:{SITE}", f"{idx}:soft", f"{idx}:B"])
            nodeids.append(node.nodeid.to_string())
            await client.disconnect()
        finally:
            await srv.stop()
    assert nodeids[0] == nodeids[1]


async def test_new_values_reach_reads_at_once(server, connect):
    client = await connect()
    node = await pv_node(client, "LAB:COUNT")
    server.db.post("LAB:COUNT", 42)
    assert await node.read_value() == 42


# ---- bulk-built nodes --------------------------------------------------------------------------------


async def _address_space(infos: list[PVInfo], **kw) -> tuple[InternalServer, int]:
    ua_server = UaServer()
    await ua_server.init()
    idx = await ua_server.register_namespace(NAMESPACE)
    build(ua_server.iserver, idx, SITE, infos, **kw)
    return ua_server.iserver, idx


def _as_seen(iserver: InternalServer, idx: int) -> dict[str, object]:
    """Every node of the site's namespace as a client would get it: encoded attributes and references."""
    aspace = iserver.aspace
    seen: dict[str, object] = {}
    for nodeid in (n for n in aspace.keys() if n.NamespaceIndex == idx):
        attrs = {}
        for attr in aspace[nodeid].attributes:
            dv = aspace.read_attribute_value(nodeid, attr)
            if attr == ua.AttributeIds.Value:  # the time the node was made
                dv = dataclasses.replace(dv, SourceTimestamp=None, ServerTimestamp=None)
            attrs[ua.AttributeIds(attr).name] = struct_to_binary(dv)
        refs = [struct_to_binary(r) for r in aspace[nodeid].references]
        seen[nodeid.to_string()] = (attrs, refs)
    objects = aspace[ua.NodeId(ua.ObjectIds.ObjectsFolder)].references
    seen["Objects"] = [struct_to_binary(r) for r in objects if r.NodeId.NamespaceIndex == idx]
    return seen


async def test_bulk_built_nodes_are_the_nodes_add_nodes_makes(tmp_path):
    """The address space made in bulk is, to a client, the one asyncua's AddNodes service makes."""
    infos = Server(make_site(tmp_path)).db.infos()
    infos += [
        PVInfo("CTL:TEMP", PVType.FLOAT64, "ctl", unit="K", instrument="ctl", channel="temperature", scan_s=0.1, drive=(0, 300), writable=True),
        PVInfo("CTL:SETP", PVType.FLOAT64, "ctl", instrument="ctl", channel="temperature", description="duplicate channel"),
        PVInfo("CTL:TRACE", PVType.FLOAT64_ARRAY, "ctl", instrument="ctl", channel="trace"),
    ]
    infos += [PVInfo(f"BIG:G{g}:PV{i:03d}", PVType.INT, "soft", unit="s", display=(0, 9)) for g in range(2) for i in range(120)]
    bulk, idx = await _address_space(infos)
    reference, ref_idx = await _address_space(infos, builder=Builder)
    assert idx == ref_idx
    expected = _as_seen(reference, ref_idx)
    got = _as_seen(bulk, idx)
    assert got.keys() == expected.keys()
    assert len(got) > len(infos) + 1
    for nodeid, nodes in expected.items():
        assert got[nodeid] == nodes, nodeid


async def test_pv_node_and_property_as_read_and_browsed(connect):
    client = await connect()
    idx = await ns(client)
    temp = await pv_node(client, "LAB:TEMP")
    A = ua.AttributeIds
    attrs = [A.NodeId, A.NodeClass, A.BrowseName, A.DisplayName, A.Description, A.WriteMask, A.DataType, A.ValueRank,
             A.AccessLevel, A.MinimumSamplingInterval, A.Historizing]  # fmt: skip
    values = [dv.Value.Value for dv in await temp.read_attributes(attrs)]
    assert values == [
        ua.NodeId("LAB:TEMP", idx), ua.NodeClass.Variable, ua.QualifiedName("LAB:TEMP", idx), ua.LocalizedText("LAB:TEMP"),
        ua.LocalizedText("sample temperature"), 0, ua.NodeId(ua.ObjectIds.Double), ua.ValueRank.Scalar, 1 | 2, 0.0, False,
    ]  # fmt: skip
    refs = await temp.get_references(refs=ua.ObjectIds.References, direction=ua.BrowseDirection.Both)
    described = {(r.ReferenceTypeId.Identifier, r.IsForward, r.NodeId.to_string(), r.BrowseName.to_string()) for r in refs}
    assert described == {
        (ua.ObjectIds.Organizes, False, f"ns={idx};s=/{SITE}/soft", f"{idx}:soft"),
        (ua.ObjectIds.HasTypeDefinition, True, f"i={ua.ObjectIds.AnalogItemType}", "0:AnalogItemType"),
        (ua.ObjectIds.HasProperty, True, f"ns={idx};s=LAB:TEMP.EURange", "0:EURange"),
        (ua.ObjectIds.HasProperty, True, f"ns={idx};s=LAB:TEMP.EngineeringUnits", "0:EngineeringUnits"),
        (ua.ObjectIds.HasProperty, True, f"ns={idx};s=LAB:TEMP.ValuePrecision", "0:ValuePrecision"),  # Part 8: its PREC
        (ua.ObjectIds.HasComponent, True, f"ns={idx};s=LAB:TEMP.AlarmState", f"{idx}:AlarmState"),  # its SEVR and STAT
    }
    assert await client.get_node(ua.NodeId("LAB:TEMP.ValuePrecision", idx)).read_value() == 3.0  # the default precision
    forward = {r.NodeId: r for r in await client.get_node(ua.NodeId(f"/{SITE}/soft", idx)).get_references(refs=ua.ObjectIds.Organizes)}
    in_folder = forward[temp.nodeid]
    assert (in_folder.BrowseName, in_folder.DisplayName, in_folder.NodeClass, in_folder.TypeDefinition) == (
        ua.QualifiedName("LAB:TEMP", idx), ua.LocalizedText("LAB:TEMP"), ua.NodeClass.Variable, ua.NodeId(ua.ObjectIds.AnalogItemType))
    eurange = client.get_node(ua.NodeId("LAB:TEMP.EURange", idx))
    values = [dv.Value.Value for dv in await eurange.read_attributes([A.NodeId, A.BrowseName, A.DisplayName, A.DataType, A.AccessLevel, A.Value])]
    assert values == [eurange.nodeid, ua.QualifiedName("EURange", 0), ua.LocalizedText("EURange"), ua.NodeId(ua.ObjectIds.Range), 1, ua.Range(0.0, 300.0)]
    assert (await eurange.read_type_definition()) == ua.NodeId(ua.ObjectIds.PropertyType)
    assert (await eurange.get_parent()) == temp
