"""The delay between attempts to reach something that went away: one rule for every layer.

Theory of operation. A :class:`Backoff` doubles its delay from ``min_s`` up to ``max_s``
with each failed attempt and starts again from ``min_s`` after a success
(:meth:`Backoff.reset`). It counts the attempts since the last success
(:attr:`Backoff.attempt`), so a status line can say "attempt 3, next in 2 s". It only
computes delays -- the caller sleeps, or schedules its next try -- so the same rule serves
an asyncio task (an instrument link, a client's reconnect loop) and a worker thread (the
historian's reconnect), and it is deterministic: no jitter, no clock.

Used by :mod:`labctl.ioc.links` (instruments), :mod:`labctl.server.historian.ingest`
(the archive database) and :mod:`labctl.clients.link` (the TUI's and GUI's connection).
"""

from __future__ import annotations

from dataclasses import dataclass

#: The exponent stops growing here: ``min_s * 2**64`` exceeds any sensible ``max_s``.
_MAX_DOUBLINGS = 64


@dataclass
class Backoff:
    """Delays between attempts: doubling from ``min_s`` up to ``max_s``, reset on success."""

    min_s: float = 0.5
    """The first delay, seconds."""
    max_s: float = 30.0
    """The longest delay, seconds."""
    attempt: int = 0
    """Failed attempts since the last success (or since the start)."""

    def __post_init__(self) -> None:
        if not self.min_s > 0:
            raise ValueError(f"backoff: min_s must be positive, got {self.min_s!r}")
        if not self.max_s >= self.min_s:
            raise ValueError(f"backoff: max_s ({self.max_s!r}) must be at least min_s ({self.min_s!r})")

    @property
    def delay_s(self) -> float:
        """The delay :meth:`next` returns next (without counting an attempt)."""
        return min(self.max_s, self.min_s * 2.0 ** min(self.attempt, _MAX_DOUBLINGS))

    def next(self) -> float:
        """Count a failed attempt and return the delay before the next one."""
        delay = self.delay_s
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Start again from ``min_s`` (after a success)."""
        self.attempt = 0
