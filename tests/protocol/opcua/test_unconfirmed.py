"""A write the instrument took whose read-back failed, over OPC UA: Uncertain, not Bad; audited as unconfirmed.

The server answers UncertainNoCommunicationLastUsableValue (see
:mod:`labctl.server.opcua.refusals`) with the error as data in the operation's
DiagnosticInfo; labctl's client library raises ``WriteUnconfirmed`` with the PV, the
value sent and the read-back's error. A generic client (asyncua) sees the Uncertain code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from labctl.clients.errors import PutRefused, WriteUnconfirmed
from labctl.clients.session import connect as session_connect
from labctl.ioc.access import WRITE_UNCONFIRMED, AuditRecord
from labctl.ioc.build import build_database
from labctl.ioc.errors import DriverTimeout
from labctl.ioc.types import Severity, Status
from labctl.server.opcua import OpcUaService

from .conftest import INSTRUMENT, PASSWORDS, Host, make_site, ns


class ReadBackFails:
    """An instrument that takes writes and answers none (the database reads back), whose read-back can fail once."""

    def __init__(self, name: str, values: dict[str, Any]) -> None:
        self.name = name
        self.values = dict(values)
        self.fail_next_read: Exception | None = None

    def channels(self) -> Sequence[str]:
        return list(self.values)

    async def connect(self) -> None:
        return None

    async def read(self, channels: Sequence[str]) -> dict[str, Any]:
        if self.fail_next_read is not None:
            error, self.fail_next_read = self.fail_next_read, None
            raise error
        return {c: self.values[c] for c in channels}

    async def write(self, channel: str, value: Any) -> Any:
        self.values[channel] = value
        return None

    async def close(self) -> None:
        return None

    def bind_push(self, push: Any) -> None:
        return None


@pytest.fixture
async def unconfirming(tmp_path: Path) -> AsyncIterator[tuple[OpcUaService, ReadBackFails, Any, list[AuditRecord]]]:
    site = make_site(tmp_path, instruments=INSTRUMENT.replace("scan_s: 0.1", "scan_s: 3600"))
    db = build_database(site)
    inst = ReadBackFails("ctl", {"temperature": 4.0, "setpoint": 1.0})
    link = db.attach(inst, timeout_s=1.0)
    audit: list[AuditRecord] = []
    db.add_audit_sink(audit.append)
    host = Host(site, db, tmp_path / "state", tmp_path)
    host.state_dir.mkdir(parents=True, exist_ok=True)
    service = OpcUaService(host)  # type: ignore[arg-type]
    await service.start()
    await db.start()
    await link.wait_connected(5.0)
    try:
        yield service, inst, db, audit
    finally:
        await db.stop()
        await service.stop()


async def test_a_generic_client_gets_uncertain_and_the_audit_says_unconfirmed(unconfirming, connect_to):
    service, inst, db, audit = unconfirming
    client = await connect_to(service.url, "operator")
    idx = await ns(client)
    node = client.get_node(ua.NodeId("CTL:SETP", idx))
    inst.fail_next_read = DriverTimeout("ctl", "read setpoint: no answer within 1.5 s")
    params = ua.WriteParameters()
    wv = ua.WriteValue()
    wv.NodeId, wv.AttributeId = node.nodeid, ua.AttributeIds.Value
    wv.Value = ua.DataValue(ua.Variant(2.5, ua.VariantType.Double))
    params.NodesToWrite.append(wv)
    (status,) = await client.uaclient.write(params)
    assert status.value == ua.StatusCodes.UncertainNoCommunicationLastUsableValue
    assert status.is_uncertain() and not status.is_bad()
    assert inst.values["setpoint"] == 2.5  # the instrument holds it
    (record,) = [a for a in audit if a.target == "CTL:SETP"]
    assert (record.action, record.accepted, record.outcome, record.new, record.user, record.protocol) == (
        WRITE_UNCONFIRMED, True, "written-unconfirmed", 2.5, "operator", "opcua"
    )
    # The PV does not show the value before the write as if it were good.
    r = db.read("CTL:SETP")
    assert (r.severity, r.status) == (Severity.INVALID, Status.TIMEOUT)
    dv = await node.read_data_value(raise_on_bad_status=False)
    assert dv.StatusCode.is_bad()


async def test_the_client_library_raises_write_unconfirmed_with_its_data(unconfirming):
    service, inst, db, audit = unconfirming
    s = await session_connect(service.url, "operator", PASSWORDS["operator"], "None")
    try:
        inst.fail_next_read = DriverTimeout("ctl", "read setpoint: no answer within 1.5 s")
        with pytest.raises(WriteUnconfirmed) as e:
            await s.put("CTL:SETP", 3.5)
        err = e.value
        assert not isinstance(err, PutRefused)
        assert (err.kind, err.pv, err.value, err.error, err.action, err.target) == (
            "unconfirmed", "CTL:SETP", 3.5, "WrittenUnconfirmed", "write", "CTL:SETP"
        )
        assert err.status == "UncertainNoCommunicationLastUsableValue" and err.cause
        assert "written, not confirmed" in str(err)
        # The next write confirms: Good again, and the PV reads the new value.
        await s.put("CTL:SETP", 4.5)
        assert db.read("CTL:SETP").value == 4.5 and db.read("CTL:SETP").valid
        assert [a.outcome for a in audit if a.target == "CTL:SETP"] == ["written-unconfirmed", "accepted"]
    finally:
        await s.close()
