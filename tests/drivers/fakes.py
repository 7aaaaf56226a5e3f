"""Test doubles with behaviour: a scripted instrument and a clock that moves on demand."""

from __future__ import annotations

from collections.abc import Sequence

from labctl.drivers.transport import Transport
from labctl.ioc.errors import DriverFault, DriverTimeout


class ScriptedTransport(Transport):
    """An instrument that follows a script of exchanges, as a real one would on the wire.

    Each script entry is ``(command, reply)``. A query gets its reply; an entry whose
    reply is None is a command the instrument does not answer, so a *query* of it
    times out (DriverTimeout), as a silent instrument would. A *write* of an entry that
    has a reply fails the test: on a wire that reply would be left unread. Any command
    other than the next one in the script fails the test, naming both. I/O before
    ``open`` is a DriverFault, like a closed link.

    Args:
        script: The exchanges, in order.
        instrument: The instrument name.
    """

    def __init__(self, script: Sequence[tuple[str, str | None]], instrument: str = "dut") -> None:
        super().__init__(instrument, timeout_s=1.0)
        self.script = list(script)
        self.position = 0
        self.opened = False
        self.sent: list[tuple[str, bool]] = []
        """Every command received, with whether it was sent raw (no termination)."""

    async def open(self) -> None:
        """Open the link."""
        self.opened = True

    async def close(self) -> None:
        """Close the link."""
        self.opened = False

    def _next(self, command: str, how: str) -> str | None:
        if not self.opened:
            raise DriverFault(self.instrument, f"{command!r}: the link is not open")
        if self.position >= len(self.script):
            raise AssertionError(f"the driver sent the {how} {command!r} after the end of the script")
        expected, reply = self.script[self.position]
        if command != expected:
            raise AssertionError(f"exchange {self.position}: the script expects {expected!r}, the driver sent {command!r}")
        self.position += 1
        return reply

    async def _query(self, command: str, raw: bool) -> str:
        self.sent.append((command, raw))
        reply = self._next(command, "query")
        if reply is None:
            raise DriverTimeout(self.instrument, f"no answer to {command!r} (the script has none)")
        return reply

    async def _write(self, command: str) -> None:
        self.sent.append((command, False))
        reply = self._next(command, "write")
        if reply is not None:
            raise AssertionError(f"the driver wrote {command!r} without reading the instrument's reply {reply!r}")

    def assert_done(self) -> None:
        """Fail if part of the script was not played."""
        rest = self.script[self.position :]
        assert not rest, f"the driver stopped before these exchanges: {rest}"


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        assert seconds >= 0
        self.now += seconds
