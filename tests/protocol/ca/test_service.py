"""The CA service inside a whole server: wiring, start/stop, and the arbiter's locks."""

from __future__ import annotations

from caproto import AccessRights
from labctl.server.app import Server
from labctl.server.ca import CAService
from labctl.server.ca.access import Client
from labctl.server.site import parse_site

from tests.helpers import wait_for
from tests.protocol.ca.support import client, connect, site_yaml

RESOURCES = """
resources:
  - {name: cryostat}
"""
PVS = """
pvs:
  - {name: CRYO:SETPOINT, type: float64, unit: K, writable: true, initial: 0.1, resource: cryostat}
"""
ALICE = "rules:\n  - {users: [alice], hosts: [lab-pc], roles: [operator]}"


async def test_the_server_runs_the_ca_service(ports, caproto_env, tmp_path):
    site = parse_site(site_yaml(*ports, access=ALICE, extra=RESOURCES, pvs=PVS, state_dir=str(tmp_path)))
    server = Server(site)
    service = server.service("ca")
    assert isinstance(service, CAService)
    async with server:
        assert f"ca://127.0.0.1:{ports[0]}" in server.endpoints()
        async with client(ports[0], caproto_env) as ctx:
            setpoint = await connect(ctx, "CRYO:SETPOINT")
            owner = await connect(ctx, "ARB:CRYOSTAT:OWNER")  # the arbiter's lock PVs are served too
            assert (await owner.read()).data[0] == b""
            # The resource is lockable and alice holds no lock: read-only, as the core would refuse.
            assert setpoint.access_rights == AccessRights.READ
            # Her session on another protocol takes the lock: it is that session's, not this connection's.
            other = service.rules.identity(Client("alice", "lab-pc"))
            lease = server.control.request_lock("cryostat", other, duration_s=60, client="opcua:session-elsewhere")
            assert await service.refresh_access_rights(["CRYO:SETPOINT"]) == 0
            assert setpoint.access_rights == AccessRights.READ
            server.control.release_lock("cryostat", lease.token, other)
            # She takes it on this connection: the connection's channels become writable.
            request = await connect(ctx, "ARB:CRYOSTAT:REQUEST")
            assert (await request.write(["60"], wait=True)).status.name == "ECA_NORMAL"
            await wait_for(
                lambda: setpoint.access_rights == AccessRights.READ | AccessRights.WRITE, what="write access"
            )
            assert (await setpoint.write([0.05], wait=True)).status.name == "ECA_NORMAL"
            assert server.db.read("CRYO:SETPOINT").value == 0.05
            assert (await owner.read()).data[0] == b"alice"
    assert service.context is None  # stopped with the server
