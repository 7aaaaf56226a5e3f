"""A write the instrument took whose read-back failed, over Channel Access: ECA_IOINPROGRESS, not ECA_PUTFAIL.

See :mod:`labctl.server.ca.context`: the put-callback's status has the success bit set
(libca reports no failure) but is not ECA_NORMAL; the PV reads INVALID until read again;
the audit records ``write.unconfirmed``. Tried with caproto's client and with pyepics (libca).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from labctl.ioc.access import WRITE_UNCONFIRMED
from labctl.ioc.errors import DriverFault, DriverTimeout
from labctl.ioc.types import Severity, Status

from tests.helpers import wait_for
from tests.protocol.ca.support import client, connect, pyepics, serve, site_yaml

WRITE_ALL = "rules:\n  - {users: ['*'], hosts: ['*'], roles: [operator]}"
ECA_IOINPROGRESS = 347  # as libca hands it to a put callback (code << 3 | severity)

INSTRUMENT = """
instruments:
  - name: gate
    driver: test
    resource: TEST::GATE
    scan_s: 3600
    pvs:
      - {name: GATE:SETPOINT, type: float64, unit: V, writable: true, drive: [-5, 5]}
"""


class ReadBackFails:
    """Takes writes without a read-back; the read after the next write fails once."""

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


async def test_caproto_put_is_answered_ioinprogress_and_audited_unconfirmed(ports, caproto_env):
    driver = ReadBackFails("gate", {"GATE:SETPOINT": 0.0})
    async with (
        serve(site_yaml(*ports, access=WRITE_ALL, extra=INSTRUMENT), drivers=[driver]) as s,
        client(s.port, caproto_env) as ctx,
    ):
        await s.db.link("gate").wait_connected(5)
        pv = await connect(ctx, "GATE:SETPOINT")
        driver.fail_next_read = DriverFault("gate", "garbled answer")
        response = await pv.write([2.5], wait=True)
        assert response.status.name == "ECA_IOINPROGRESS"
        assert response.status.success == 1  # not a failure: the value was sent
        assert driver.values["GATE:SETPOINT"] == 2.5
        (record,) = s.audit
        assert (record.action, record.accepted, record.outcome, record.new, record.protocol) == (
            WRITE_UNCONFIRMED, True, "written-unconfirmed", 2.5, "ca"
        )
        reading = await pv.read(data_type="time")
        assert (reading.metadata.severity, reading.metadata.status) == (Severity.INVALID, Status.READ)
        # A plain put (no callback) gets the sentence as a CA error message; still audited once.
        driver.fail_next_read = DriverTimeout("gate", "no answer")
        await pv.write([3.0], wait=False)
        await wait_for(lambda: len(s.audit) == 2, what="the second write's audit record")
        assert s.audit[1].outcome == "written-unconfirmed" and driver.values["GATE:SETPOINT"] == 3.0
        # Confirmed again: ECA_NORMAL, valid.
        response = await pv.write([1.5], wait=True)
        assert response.status.name == "ECA_NORMAL"
        assert s.db.read("GATE:SETPOINT").valid and s.audit[-1].outcome == "accepted"


async def test_pyepics_put_callback_gets_ioinprogress(ports):
    driver = ReadBackFails("gate", {"GATE:SETPOINT": 0.0})
    async with (
        serve(site_yaml(*ports, access=WRITE_ALL, extra=INSTRUMENT), drivers=[driver]) as s,
        pyepics(s.port) as ca,
    ):
        await s.db.link("gate").wait_connected(5)
        await ca.call("connect", pv="GATE:SETPOINT")
        driver.fail_next_read = DriverTimeout("gate", "no answer")
        await ca.call("put_callback", pv="GATE:SETPOINT", value=2.5, tag="unconfirmed")
        done = await ca.event(lambda e: e["event"] == "put_done")
        assert (done["tag"], done["status"]) == ("unconfirmed", ECA_IOINPROGRESS)
        got = await ca.call("get", pv="GATE:SETPOINT", form="time")
        assert (got["severity"], got["status"]) == (Severity.INVALID, Status.TIMEOUT)
        assert [a.outcome for a in s.audit] == ["written-unconfirmed"]
