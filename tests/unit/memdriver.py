"""An in-memory instrument for core tests: it has state and behaviour, and can stop answering.

Reads return the instrument's current values; writes change them (setpoints echo back);
``stop_answering()`` makes every call hang like a dead link until the database's
timeout fires; ``resume()`` brings it back. ``reads`` counts batched read calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from labctl.ioc.errors import DriverFault


class MemoryInstrument:
    def __init__(self, name: str, values: dict[str, Any]) -> None:
        self.name = name
        self.values = dict(values)
        self.reads = 0
        self.batches: list[tuple[str, ...]] = []
        self.connects = 0
        self._alive = asyncio.Event()
        self._alive.set()
        self._push = None
        self.read_done = asyncio.Event()
        self.refuse: set[str] = set()

    def channels(self) -> Sequence[str]:
        return list(self.values)

    def stop_answering(self) -> None:
        self._alive.clear()

    def resume(self) -> None:
        self._alive.set()

    async def _answer(self) -> None:
        await self._alive.wait()

    async def connect(self) -> None:
        await self._answer()
        self.connects += 1

    async def read(self, channels: Sequence[str]) -> dict[str, Any]:
        await self._answer()
        self.reads += 1
        self.batches.append(tuple(channels))
        self.read_done.set()
        return {c: self.values[c] for c in channels}

    async def write(self, channel: str, value: Any) -> Any:
        await self._answer()
        if channel in self.refuse:
            raise DriverFault(self.name, f"instrument refused {channel}={value!r}")
        self.values[channel] = value
        return self.values[channel]

    async def close(self) -> None:
        pass

    def bind_push(self, push) -> None:
        self._push = push

    def push(self, channel: str, value: Any, ts: float | None = None) -> None:
        self.values[channel] = value
        self._push(channel, value, ts)
