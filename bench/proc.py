"""The orchestrator's half of the worker protocol (see :mod:`bench.wire`): start, drive, stop.

:class:`Worker` starts ``python -m <module> <args>`` with its own environment, waits for
its ``ready`` event, sends requests and awaits their answers and events with timeouts
(never fixed sleeps), and reads the kernel's accounting of the process: CPU seconds
(``/proc/<pid>/stat``) and resident memory (``/proc/<pid>/status``). :meth:`Worker.close`
asks it to stop, then terminates and finally kills it if it does not, so a run never
leaves processes behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class WorkerError(RuntimeError):
    """A worker failed, answered an error, or did not answer in time."""


class Worker:
    """A benchmark process driven over JSON lines."""

    def __init__(self, name: str, module: str, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.module = module
        self.args = [str(a) for a in args]
        self.env = {**os.environ, **(env or {})}
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: dict[str, Any] = {}
        self.started_at = 0.0
        self._ids = 0
        self._answers: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: dict[str, deque[dict[str, Any]]] = defaultdict(deque)
        self._event_signal = asyncio.Event()
        self._stderr: deque[str] = deque(maxlen=60)
        self._readers: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int:
        """The process id."""
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 120.0) -> dict[str, Any]:
        """Start the process and return its ``ready`` event."""
        self.started_at = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self.module,
            *self.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
            cwd=str(ROOT),
            limit=2**24,
        )
        self._readers = [
            asyncio.create_task(self._read_stdout(), name=f"{self.name} stdout"),
            asyncio.create_task(self._read_stderr(), name=f"{self.name} stderr"),
        ]
        self.ready = await self.event("ready", timeout)
        return self.ready

    async def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                self._stderr.append(line.decode(errors="replace").rstrip())
                continue
            if "event" in msg:
                self._events[msg["event"]].append(msg)
                self._event_signal.set()
            else:
                fut = self._answers.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        self._event_signal.set()
        for fut in self._answers.values():
            if not fut.done():
                fut.set_exception(WorkerError(f"{self.name} exited: {self.tail()}"))

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while True:
            line = await self.proc.stderr.readline()
            if not line:
                break
            self._stderr.append(line.decode(errors="replace").rstrip())

    def tail(self) -> str:
        """The last lines the worker wrote to stderr."""
        return "\n".join(self._stderr) or "(no output)"

    def _send(self, obj: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())

    async def call(self, op: str, timeout: float = 60.0, **kwargs: Any) -> dict[str, Any]:
        """Send a request and await its answer (raises WorkerError if it failed)."""
        if self.proc is None or self.proc.returncode is not None:
            raise WorkerError(f"{self.name} is not running: {self.tail()}")
        self._ids += 1
        rid = self._ids
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._answers[rid] = fut
        self._send({"id": rid, "op": op, **kwargs})
        try:
            async with asyncio.timeout(timeout):
                answer = await fut
        except TimeoutError:
            raise WorkerError(f"{self.name}: no answer to {op!r} within {timeout} s; stderr:\n{self.tail()}") from None
        finally:
            self._answers.pop(rid, None)
        if not answer.get("ok"):
            raise WorkerError(f"{self.name}: {op} failed: {answer.get('error')}\n{answer.get('trace', '')}")
        return answer

    async def event(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        """The next ``name`` event (waiting for it up to ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            queue = self._events[name]
            if queue:
                return queue.popleft()
            if self.proc is not None and self.proc.returncode is not None:
                raise WorkerError(f"{self.name} exited ({self.proc.returncode}) before {name!r}:\n{self.tail()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerError(f"{self.name}: no {name!r} event within {timeout} s; stderr:\n{self.tail()}")
            self._event_signal.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 1.0)):
                    await self._event_signal.wait()

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far (its threads included)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def memory(self) -> dict[str, int]:
        """Resident memory now and at its peak, in bytes (``VmRSS``, ``VmHWM``)."""
        out = {}
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
        except OSError:
            pass
        return {"rss": out.get("VmRSS", 0), "peak_rss": out.get("VmHWM", 0)}

    async def close(self, timeout: float = 20.0) -> int | None:
        """Ask the worker to stop; terminate (then kill) it if it does not exit in time."""
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(Exception):
                self._send({"id": 0, "op": "stop"})
                assert proc.stdin is not None
                proc.stdin.close()
            for sig, wait in ((None, timeout), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                if sig is not None and proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(sig)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await proc.wait()
                if proc.returncode is not None:
                    break
        for task in self._readers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                async with asyncio.timeout(5):
                    await task
        return proc.returncode


@contextlib.asynccontextmanager
async def running(*workers: Worker, timeout: float = 300.0) -> AsyncIterator[list[Worker]]:
    """Start workers (concurrently), yield them, and close them all however the block ends."""
    try:
        await asyncio.gather(*(w.start(timeout) for w in workers))
        yield list(workers)
    finally:
        await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)
