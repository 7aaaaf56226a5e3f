"""Where a write's time goes: per-stage timestamps of each write to one PV, inside a labctl server.

:func:`install` wraps, in the benchmark's server process only, the functions a write of
``pv`` passes through and records ``time.perf_counter()`` at each step:

==============  =================================================================================
``entered``     :meth:`Database.write` called (the protocol adapter has decoded the request)
``checked``     roles, lock, coercion, interlocks passed; the driver's ``write`` is called
``io_queued``   an instrument I/O handed to the link's I/O thread (once per command: the
                write, then its read-back query)
``io_started``  the I/O thread starts it (the wait between is the hand-over: the thread
                needs the GIL while the event loop runs)
``io_done``     the I/O thread has the instrument's answer
``io_back``     the event loop resumes the write with it
``posted``      the read-back is posted (monitors queued)
``durable``     the audit record is on disk (journal fsync)
``returned``    :meth:`Database.write` returns (the adapter then answers the client)
==============  =================================================================================

:func:`summary` gives, per step, the median and 99th percentile of the time since the step
before, over the writes recorded; the client measures the whole round trip, so the rest
(decoding, the reply, the monitor's way back) is the difference. Nothing here changes
what the server does: the wrappers only read the clock.

A *probe* thread measures the same waits without a write: every 5 ms it hands the
event loop a callback (``call_soon_threadsafe``, as an I/O thread's answer comes back) and
records how long it waited to run (``loop wait``), and how late the thread itself woke
(``thread wake``: the operating system's share of a hand-over). Thousands of samples a
second make its percentiles steadier than those of a few hundred writes.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

STEPS = ("entered", "checked", "io_queued", "io_started", "io_done", "io_back", "posted", "durable", "returned")

_current: ContextVar[list[tuple[str, float]] | None] = ContextVar("labctl_bench_write_steps", default=None)
_writes: list[list[tuple[str, float]]] = []


def _mark(step: str) -> None:
    steps = _current.get()
    if steps is not None:
        steps.append((step, time.perf_counter()))


_probe: dict[str, list[float]] = {"loop wait": [], "thread wake": []}
PROBE_PERIOD_S = 0.005


def _start_probe(loop: asyncio.AbstractEventLoop) -> None:
    def ran(t0: float) -> None:
        _probe["loop wait"].append(time.perf_counter() - t0)

    def run() -> None:
        tick = threading.Event()
        while not loop.is_closed():
            t = time.perf_counter()
            tick.wait(PROBE_PERIOD_S)
            t0 = time.perf_counter()
            _probe["thread wake"].append(t0 - t - PROBE_PERIOD_S)
            try:
                loop.call_soon_threadsafe(ran, t0)
            except RuntimeError:  # the loop closed meanwhile
                return
            for xs in _probe.values():
                del xs[:-100_000]

    threading.Thread(target=run, name="bench-loop-probe", daemon=True).start()


def install(server: Any, pv: str) -> None:
    """Record the steps of every write of ``pv`` on ``server`` (a :class:`labctl.server.app.Server`)."""
    _start_probe(asyncio.get_running_loop())
    db = server.db
    write, audit_durable, post, check_write = db.write, db.audit_durable, db.post, db.check_write

    async def traced_write(name: str, value: Any, identity: Any) -> Any:
        if name != pv:
            return await write(name, value, identity)
        steps: list[tuple[str, float]] = [("entered", time.perf_counter())]
        token = _current.set(steps)
        try:
            return await write(name, value, identity)
        finally:
            steps.append(("returned", time.perf_counter()))
            _current.reset(token)
            _writes.append(steps)
            del _writes[:-5000]

    def traced_check_write(*args: Any, **kw: Any) -> Any:
        out = check_write(*args, **kw)
        _mark("checked")
        return out

    def traced_post(name: str, *args: Any, **kw: Any) -> Any:
        out = post(name, *args, **kw)
        if name == pv:
            _mark("posted")
        return out

    async def traced_audit_durable(record: Any) -> None:
        await audit_durable(record)
        _mark("durable")

    db.write, db.check_write, db.post, db.audit_durable = traced_write, traced_check_write, traced_post, traced_audit_durable
    for link in db._links.values():  # the transports of the instruments' drivers
        transport = getattr(link.driver, "transport", None)
        while transport is not None and not hasattr(transport, "_run"):  # a wrapper (fault injection)
            transport = getattr(transport, "inner", None)
        if transport is not None:
            transport._run = _traced_run(transport._run)


def _traced_run(run: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(run)
    async def traced(what: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        steps = _current.get()
        if steps is None:
            return await run(what, fn, *args, **kw)

        def in_thread(*a: Any) -> Any:
            steps.append(("io_started", time.perf_counter()))
            try:
                return fn(*a)
            finally:
                steps.append(("io_done", time.perf_counter()))

        steps.append(("io_queued", time.perf_counter()))
        try:
            return await run(what, in_thread, *args, **kw)
        finally:
            steps.append(("io_back", time.perf_counter()))

    return traced


def reset() -> None:
    """Forget the writes recorded so far."""
    _writes.clear()
    for xs in _probe.values():
        xs.clear()


def summary() -> dict[str, Any]:
    """Per step: n, median and p99 (ms) of the time since the step before, over the writes recorded."""
    gaps: dict[str, list[float]] = {}
    totals = []
    for steps in _writes:
        for (_, t0), (step, t1) in zip(steps, steps[1:], strict=False):
            gaps.setdefault(step, []).append(t1 - t0)
        totals.append(steps[-1][1] - steps[0][1])
    out: dict[str, Any] = {"writes": len(_writes)}
    for step, xs in [*gaps.items(), ("core total", totals), *((k, list(v)) for k, v in _probe.items())]:
        xs.sort()
        if xs:
            out[step] = {
                "n": len(xs),
                "p50_ms": 1e3 * xs[len(xs) // 2],
                "p99_ms": 1e3 * xs[min(len(xs) - 1, int(len(xs) * 0.99))],
                "sum_ms": 1e3 * sum(xs),
            }
    return out
