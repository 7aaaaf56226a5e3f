"""The namespace harness itself: what a crashed run left is removed, and a namespace routes only its subnet.

(A module of its own: the site tests' module holds the harness's lock while its network lives.)
"""

from __future__ import annotations

import signal

from tests.site.netns import BRIDGE, GATEWAY, ONE_WORKER, SiteNetwork, _ip, require_netns

pytestmark = ONE_WORKER


def _namespaces() -> set[str]:
    return {line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()}


def _links() -> set[str]:
    return {line.split(":", 2)[1].strip().split("@", 1)[0] for line in _ip("-o", "link", "show").stdout.splitlines()}


def test_a_crashed_runs_network_is_removed_and_namespaces_route_only_their_subnet():
    require_netns()
    crashed = SiteNetwork(["x", "y"]).create()
    orphan = crashed.spawn("x", ["sleep", "60"])
    crashed._release_lock()  # as if the run died here: its namespaces, links and processes stay behind
    assert {"lbsite-x", "lbsite-y"} <= _namespaces() and {BRIDGE, "lbs0h", "lbs1h"} <= _links()

    net = SiteNetwork(["z"]).create()
    try:
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert "lbsite-x" not in _namespaces() and "lbsite-y" not in _namespaces()
        assert "lbs1h" not in _links()
        routes = [r.strip() for r in _ip("-n", "lbsite-z", "route", "show").stdout.splitlines()]
        assert routes == [f"10.213.0.0/24 dev lbs0n proto kernel scope link src {net['z'].address}"], routes
        assert not any(r.startswith("default") for r in routes)
        # the test reaches the namespace over the bridge (an answer, here a refusal, comes back)
        probe = net.run("z", ["python3", "-c", f"import socket; socket.create_connection(('{GATEWAY}', 9), timeout=5)"])
        assert "ConnectionRefusedError" in probe.stderr, probe.stderr
    finally:
        net.destroy()
    assert "lbsite-z" not in _namespaces() and BRIDGE not in _links()
