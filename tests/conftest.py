"""Suite-wide settings: EPICS networking pinned to loopback, Qt offscreen, task-leak check."""

from __future__ import annotations

import asyncio
import os
import tempfile

# Set before any EPICS client library (libca reads its environment once per process)
# or Qt is imported, so every test talks to loopback only and never opens a window.
os.environ.update(
    {
        "EPICS_CA_ADDR_LIST": "127.0.0.1",
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
        "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
        "QT_QPA_PLATFORM": "offscreen",
        # the client certificate every labctl client of the run keeps (never the user's own)
        "LABCTL_CLIENT_PKI": tempfile.mkdtemp(prefix="labctl-client-pki-"),
    }
)

import pytest  # noqa: E402

pytest_plugins = ["tests.pg.fixtures"]


@pytest.fixture(autouse=True)
async def no_leaked_tasks():
    """Fail a test that leaves asyncio tasks running after it ends."""
    before = set(asyncio.all_tasks())
    yield
    current = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() if t not in before and t is not current and not t.done()]
    if leaked:
        for t in leaked:
            t.cancel()
        await asyncio.gather(*leaked, return_exceptions=True)
        pytest.fail(f"test leaked {len(leaked)} task(s): {[t.get_name() for t in leaked]}")
