"""A private network for site system tests: network namespaces joined by a bridge, one per server (and database).

Theory of operation. A site's servers run on several machines; on one machine each runs in
a network namespace of its own, so each has its own addresses and ports and reaches the
others only over a network, as across a lab. :class:`SiteNetwork` builds (as root, with
``ip``):

* a bridge ``lbsite0`` in the test's own (root) namespace, with :data:`GATEWAY`
  (``10.213.0.1/24``); the test itself talks to every node through it;
* per node a namespace ``lbsite-<name>`` with its loopback up and one end of a veth pair
  (``lbs<i>n``, inside) with ``10.213.0.<10+i>/24``, the other end (``lbs<i>h``) enslaved
  to the bridge. The namespaces have no default route: their traffic reaches the subnet
  and their own loopback, nothing else. The subnet exists only on this bridge.

:meth:`SiteNetwork.cut` and :meth:`SiteNetwork.restore` take a node's link down and up (a
network fault); :meth:`SiteNetwork.spawn` runs a command inside a node's namespace
(``ip netns exec``). :meth:`SiteNetwork.destroy` removes everything, and every run starts
by removing what an earlier run that crashed left behind (:func:`remove_leftovers`: every
namespace named ``lbsite-*``, with the processes still in it, and every link named
``lbsite0``/``lbs<i>h``/``lbs<i>n``). A lock file serialises two test runs on
one machine (the names and the subnet are fixed).

:func:`require_netns` skips a test that cannot build this (not root, no ``ip``, no
namespaces) with the reason -- or fails it under ``CI=true``, where nothing is skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.pg.availability import skip_or_fail

PREFIX = "lbsite"
BRIDGE = f"{PREFIX}0"
SUBNET = "10.213.0"
GATEWAY = f"{SUBNET}.1"
PREFIX_LEN = 24
LOCK_FILE = Path("/run/lock") / "labctl-site-netns.lock"
LOCK_TIMEOUT_S = 120.0
_IP_TIMEOUT_S = 10.0

ONE_WORKER = pytest.mark.xdist_group("site-netns")
"""Every module that builds the network marks its tests with this: under ``pytest -n N --dist
loadgroup`` they then run in one worker, one network after the other, rather than waiting for
the lock in two."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT_S, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def netns_available() -> tuple[bool, str]:
    """(True, "") when this process can build the network, else (False, why)."""
    if os.geteuid() != 0:
        return False, "network namespaces need root (run the site system tests as root, or in CI)"
    if shutil.which("ip") is None:
        return False, "no `ip` command (install iproute2)"
    probe = f"{PREFIX}-probe"
    res = _ip("netns", "add", probe, check=False)
    if res.returncode != 0:
        return False, f"cannot create a network namespace: {res.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return True, ""


def require_netns() -> None:
    """Skip (locally) or fail (``CI=true``) when the network cannot be built."""
    ok, why = netns_available()
    if not ok:
        skip_or_fail(why)


def remove_leftovers() -> list[str]:
    """Remove every namespace and link of this harness (an earlier run's, after a crash); what was removed."""
    removed = []
    names = [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]
    for ns in names:
        if ns.startswith(f"{PREFIX}-"):
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():  # a crashed run's servers and database
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
                    removed.append(f"process {pid} in {ns}")
            _ip("netns", "del", ns, check=False)
            removed.append(f"netns {ns}")
    for line in _ip("-o", "link", "show").stdout.splitlines():
        name = line.split(":", 2)[1].strip().split("@", 1)[0]
        if name == BRIDGE or (name.startswith("lbs") and name[3:-1].isdigit() and name[-1] in "hn"):
            _ip("link", "del", name, check=False)
            removed.append(f"link {name}")
    return removed


@dataclass(frozen=True)
class Node:
    """One namespace on the bridge."""

    name: str
    index: int

    @property
    def netns(self) -> str:
        """The namespace's name."""
        return f"{PREFIX}-{self.name}"

    @property
    def address(self) -> str:
        """Its address on the bridge's subnet."""
        return f"{SUBNET}.{10 + self.index}"

    @property
    def host_link(self) -> str:
        """The veth end on the bridge (root namespace)."""
        return f"lbs{self.index}h"

    @property
    def inner_link(self) -> str:
        """The veth end inside the namespace."""
        return f"lbs{self.index}n"

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


class SiteNetwork:
    """The bridge and one namespace per node name (see the module docstring)."""

    def __init__(self, names: Sequence[str]) -> None:
        if len(names) > 200:
            raise ValueError("at most 200 nodes on the subnet")
        self.nodes = {name: Node(name, i) for i, name in enumerate(names)}
        self._lock: int | None = None
        self.created = False

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def create(self) -> SiteNetwork:
        """Build the network (after removing an earlier run's leftovers); tear down what was built if a step fails."""
        self._take_lock()
        try:
            remove_leftovers()
            self.created = True
            _ip("link", "add", BRIDGE, "type", "bridge")
            _ip("addr", "add", f"{GATEWAY}/{PREFIX_LEN}", "dev", BRIDGE)
            _ip("link", "set", BRIDGE, "up")
            for node in self.nodes.values():
                _ip("netns", "add", node.netns)
                _ip("-n", node.netns, "link", "set", "lo", "up")
                _ip("link", "add", node.host_link, "type", "veth", "peer", "name", node.inner_link)
                _ip("link", "set", node.host_link, "master", BRIDGE)
                _ip("link", "set", node.host_link, "up")
                _ip("link", "set", node.inner_link, "netns", node.netns)
                _ip("-n", node.netns, "addr", "add", f"{node.address}/{PREFIX_LEN}", "dev", node.inner_link)
                _ip("-n", node.netns, "link", "set", node.inner_link, "up")
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        """Remove the namespaces, the veth pairs and the bridge (processes still inside are the caller's to end)."""
        try:
            if self.created:
                for node in self.nodes.values():
                    _ip("netns", "del", node.netns, check=False)
                    _ip("link", "del", node.host_link, check=False)
                _ip("link", "del", BRIDGE, check=False)
                self.created = False
        finally:
            self._release_lock()

    def cut(self, name: str) -> None:
        """Take the node's link to the bridge down (its connections stall, nothing reaches it)."""
        _ip("link", "set", self.nodes[name].host_link, "down")

    def restore(self, name: str) -> None:
        """Bring the node's link up again."""
        _ip("link", "set", self.nodes[name].host_link, "up")

    def spawn(self, name: str, argv: Sequence[str], **popen: object) -> subprocess.Popen[str]:
        """Start ``argv`` inside the node's namespace (``ip netns exec`` execs it: the process id is the command's)."""
        return subprocess.Popen(self.nodes[name].wrap(argv), text=True, **popen)  # type: ignore[call-overload]

    def run(
        self, name: str, argv: Sequence[str], timeout: float = 60.0, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the node's namespace to its end (with ``env`` as its environment, when given)."""
        return subprocess.run(
            self.nodes[name].wrap(argv), capture_output=True, text=True, timeout=timeout, check=False, env=env
        )  # fmt: skip

    def _take_lock(self) -> None:
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        taken = threading.Event()

        def take() -> None:  # blocks until the other run lets go: wait for that, not a poll
            fcntl.flock(fd, fcntl.LOCK_EX)
            taken.set()

        threading.Thread(target=take, name="site-network-lock", daemon=True).start()
        if not taken.wait(LOCK_TIMEOUT_S):
            raise RuntimeError(f"another run holds {LOCK_FILE} (its site network) for more than {LOCK_TIMEOUT_S:g} s")
        self._lock = fd

    def _release_lock(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock, fcntl.LOCK_UN)
            os.close(self._lock)
            self._lock = None
