"""The load every server under test carries: N PVs updated at a total rate, round robin.

A :class:`Pacer` plays the instrument driver. Every ``tick`` it posts as many updates as
are due since it started (``rate x elapsed``), each with a new value (a running count, so
every update is a change) and its own timestamp taken just before the post: that
timestamp travels to the client (DBR_TIME, SourceTimestamp) and is where latency is
measured from. When the server's loop falls behind, at most ``max_burst_s`` worth of
updates is posted at once and the rest is *skipped*: the driver, like a scan in the
same loop, is slowed by an overloaded server, and the figures say by how much
(``posted`` against ``offered``) rather than hiding it in a backlog.

A round's updates are posted in chunks of :data:`CHUNK`, letting the event loop run
between chunks (``await asyncio.sleep(0)``), as a driver whose scan returns many
channels would: a round that catches up after a late tick (up to ``max_burst_s`` of the
rate, 500 updates at 10 000/s) would otherwise hold the loop for tens of milliseconds in
one callback, and every request of every client would wait behind it.

The same pacer drives every server -- labctl's ``Database.post``, caproto's
``ChannelData.write``, asyncua's ``write_attribute_value``, pythonSoftIOC's
``record.set`` -- so each does the same work.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

#: Seconds between posting rounds.
TICK_S = 0.005
#: Most updates posted in one round, in seconds of the rate.
MAX_BURST_S = 0.05
#: Updates posted between two turns of the event loop within a round.
CHUNK = 64


@dataclass
class PaceResult:
    """What a pacer did."""

    offered: int = 0
    """Updates due by the schedule."""
    posted: int = 0
    """Updates posted."""
    posted_in_window: int = 0
    """Updates posted with a timestamp inside the measurement window."""
    skipped: int = 0
    """Updates not posted because the loop fell behind."""
    max_round_s: float = 0.0
    """Longest posting round (the loop was blocked that long)."""
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "offered": self.offered,
            "posted": self.posted,
            "posted_in_window": self.posted_in_window,
            "skipped": self.skipped,
            "max_round_s": self.max_round_s,
            "seconds": self.seconds,
            "posted_rate": self.posted / self.seconds if self.seconds else 0.0,
        }


class Pacer:
    """Posts ``rate`` updates per second over ``count`` PVs until ``t_end`` (UNIX time)."""

    def __init__(self, count: int, rate: float, *, tick_s: float = TICK_S, max_burst_s: float = MAX_BURST_S) -> None:
        self.count = count
        self.rate = rate
        self.tick_s = tick_s
        self.max_burst = max(1, int(rate * max_burst_s))
        self.value = 0.0

    def _due(self, start: float, done: int, res: PaceResult) -> int:
        due = int((time.time() - start) * self.rate) - done
        if due > self.max_burst:
            res.skipped += due - self.max_burst
            due = self.max_burst
        return max(due, 0)

    async def run(
        self, post: Callable[[int, float, float], Awaitable[None] | None], t_end: float, t0: float, t1: float
    ) -> PaceResult:
        """Drive ``post(index, value, timestamp)``: a plain function, or a coroutine function (awaited one by one)."""
        is_async = asyncio.iscoroutinefunction(post)
        res = PaceResult()
        start = time.time()
        i, n, done = 0, self.count, 0
        while True:
            round_start = time.time()
            if round_start >= t_end:
                break
            due = self._due(start, done + res.skipped, res)
            chunk = 0
            for _ in range(due):
                self.value += 1.0
                ts = time.time()
                if is_async:
                    await post(i, self.value, ts)  # type: ignore[misc]
                else:
                    post(i, self.value, ts)
                if t0 <= ts <= t1:
                    res.posted_in_window += 1
                i += 1
                if i == n:
                    i = 0
                chunk += 1
                if chunk == CHUNK:
                    chunk = 0
                    await asyncio.sleep(0)
            done += due
            res.max_round_s = max(res.max_round_s, time.time() - round_start)
            await asyncio.sleep(self.tick_s)
        res.posted = done
        res.offered = done + res.skipped
        res.seconds = time.time() - start
        return res
