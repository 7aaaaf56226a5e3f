"""The async client API: ``from labctl.aio import connect``.

``await connect(url, user=..., password=...)`` returns a :class:`Session`; use it as an
async context manager (``async with await connect(...) as s: await s.get("CRYO:MXC:TEMP")``).
The blocking equivalent is :func:`labctl.connect`.
"""

from labctl.clients.monitor import Monitor
from labctl.clients.session import Session, connect

__all__ = ["Monitor", "Session", "connect"]
