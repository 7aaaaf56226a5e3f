"""Client misbehaviour, logged one line per connection and rate-limited.

Theory of operation. A malformed message, a payload over the limit or a client that
exceeds one of its resource limits is the peer's fault, not the server's: it gets one
WARNING line naming the peer and the reason, never a traceback (STYLE.md section 8:
"you sent something wrong" is not a bug). :class:`PeerLog` keeps that to one line per
connection and reason (a connection that sends a thousand bad messages logs once) and
to at most ``burst`` lines per ``period_s`` for the whole server, so a flood of bad
connections cannot fill the disk; the lines it held back are counted and reported with
the next one it writes.

It is shared by the protocol adapters (Channel Access, OPC UA); each keeps its own
instance and logger. Time is passed in (``now``) for the tests and read from the
monotonic clock otherwise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable


class PeerLog:
    """One WARNING line per (connection, reason), at most ``burst`` per ``period_s`` overall."""

    def __init__(self, logger: logging.Logger, *, burst: int = 20, period_s: float = 10.0) -> None:
        self.logger = logger
        self.burst = burst
        self.period_s = period_s
        self.reported = 0
        """Lines written."""
        self.suppressed = 0
        """Lines held back by the rate limit since the last line written."""
        self._window_start = float("-inf")
        self._in_window = 0

    def report(self, kind: Hashable, seen: set[Hashable], peer: str, reason: str, now: float | None = None) -> bool:
        """Log ``reason`` for ``peer`` unless its connection reported ``kind`` already.

        ``seen`` is the set of kinds reported, which the caller keeps per connection.
        Returns whether a line was written.
        """
        if kind in seen:
            return False
        seen.add(kind)
        now = time.monotonic() if now is None else now
        if now - self._window_start >= self.period_s:
            self._window_start, self._in_window = now, 0
        if self._in_window >= self.burst:
            self.suppressed += 1
            return False
        self._in_window += 1
        self.reported += 1
        if self.suppressed:
            held, self.suppressed = self.suppressed, 0
            self.logger.warning("%s: %s (and %d similar line(s) held back)", peer, reason, held)
        else:
            self.logger.warning("%s: %s", peer, reason)
        return True
