"""Channel Access test fixtures (the helpers they use are in ``support.py``)."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from tests.helpers import free_port, free_tcp_udp_port
from tests.protocol.ca.epics_tools import EpicsTools, find_tools


@pytest.fixture
def ports() -> tuple[int, int]:
    """A server port free for TCP and UDP, and a beacon port."""
    return free_tcp_udp_port(), free_port(socket.SOCK_DGRAM)


@pytest.fixture
def caproto_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Point caproto's clients in this process at a server port (they read the environment per search)."""

    def point(port: int) -> None:
        monkeypatch.setenv("EPICS_CA_SERVER_PORT", str(port))
        monkeypatch.setenv("EPICS_CA_ADDR_LIST", "127.0.0.1")
        monkeypatch.setenv("EPICS_CA_AUTO_ADDR_LIST", "NO")

    return point


@pytest.fixture
def epics_tools() -> Callable[[int], EpicsTools]:
    """EPICS base's caget/caput/camonitor/cainfo, pinned to a server port: ``epics_tools(port)``.

    Missing tools skip the test, naming ``bash scripts/install-epics-base.sh`` (under ``CI=true``
    they fail it).
    """
    bindir = find_tools()
    return lambda port: EpicsTools(bindir, port)
