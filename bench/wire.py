"""The benchmark's worker protocol: JSON lines over a child process's stdin and stdout.

Every server and client of a benchmark runs in a process of its own (so no two share a
GIL) and is driven by the orchestrator over its standard streams, one JSON object per
line, as the Channel Access tests drive pyepics:

* the orchestrator sends requests ``{"id": n, "op": ..., ...}``;
* the worker answers each with ``{"id": n, "ok": true, ...}`` or ``{"id": n, "ok": false,
  "error": ...}``, and reports asynchronous results as ``{"event": ..., ...}`` lines
  (``ready`` once it serves or is connected, then measurement results).

This module is the worker's half: :class:`Requests` reads stdin on a thread and hands
each request to an asyncio loop, and :func:`emit` writes a line from any thread. The
orchestrator's half is :mod:`bench.proc`. Everything a worker prints for people goes to
stderr, which the orchestrator keeps for error messages.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

_out_lock = threading.Lock()

Handler = Callable[..., Awaitable[dict[str, Any] | None] | dict[str, Any] | None]


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def emit(obj: dict[str, Any]) -> None:
    """Write one JSON line to stdout (thread-safe)."""
    text = json.dumps(obj, default=_plain)
    with _out_lock:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def log(*parts: Any) -> None:
    """A line for people, on stderr."""
    print(*parts, file=sys.stderr, flush=True)


class Requests:
    """Reads requests from stdin on a thread and runs their handlers on ``loop``.

    A handler may be a plain function or a coroutine function; its keyword arguments are
    the request's fields. The ``stop`` request (or the end of stdin, when the orchestrator
    went away) sets :attr:`stopped`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, handlers: dict[str, Handler]) -> None:
        self.loop = loop
        self.handlers = handlers
        self.stopped = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._read, name="requests", daemon=True)

    def start(self) -> None:
        """Start reading stdin."""
        self._thread.start()

    def _read(self) -> None:
        for line in sys.stdin:
            if not line.strip():
                continue
            request = json.loads(line)
            self.loop.call_soon_threadsafe(self._dispatch, request)
        self.loop.call_soon_threadsafe(self.stopped.set)

    def _dispatch(self, request: dict[str, Any]) -> None:
        task = self.loop.create_task(self._run(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, request: dict[str, Any]) -> None:
        rid = request.pop("id", None)
        op = request.pop("op")
        if op == "stop":
            emit({"id": rid, "ok": True})
            self.stopped.set()
            return
        try:
            handler = self.handlers[op]
            result = handler(**request)
            if asyncio.iscoroutine(result):
                result = await result
        except Exception as e:  # reported to the orchestrator, which decides
            emit({"id": rid, "ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})
        else:
            emit({"id": rid, "ok": True, **(result or {})})


def pv_names(prefix: str, count: int) -> list[str]:
    """The benchmark's PV names: ``<prefix>00000`` ... (the same on every server)."""
    return [f"{prefix}{i:05d}" for i in range(count)]


def measurement_window(
    loop: asyncio.AbstractEventLoop, recorder: Callable[[], Any]
) -> Callable[[float, float, float], dict[str, Any]]:
    """A client's ``window t0 t1 grace`` request: count what arrives in ``[t0, t1]``.

    ``recorder()`` is the client's recorder (``latencies``, ``stamped``, ``total``, ``t0``,
    ``t1``); the ``result`` event, with the latency summary, follows at ``t1 + grace``.
    """
    from bench.stats import subsample, summary

    pending: set[asyncio.Task[None]] = set()

    async def report(t0: float, t1: float, grace: float) -> None:
        rec = recorder()
        rec.latencies = []
        rec.stamped = 0
        rec.t0, rec.t1 = t0, t1
        cpu0 = time.process_time()
        await asyncio.sleep(max(0.0, t1 + grace - time.time()))
        lat = list(rec.latencies)
        emit(
            {
                "event": "result",
                "count": len(lat),
                "rate": len(lat) / (t1 - t0),
                "stamped": rec.stamped,
                "total": rec.total,
                "latency": summary(lat),
                "sample_us": subsample(lat),
                "cpu_s": time.process_time() - cpu0,
            }
        )

    def window(t0: float, t1: float, grace: float) -> dict[str, Any]:
        task = loop.create_task(report(t0, t1, grace))
        pending.add(task)
        task.add_done_callback(pending.discard)
        return {}

    return window
