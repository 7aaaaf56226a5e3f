"""A Channel Access client for the benchmarks: libca through pyepics, in a process of its own.

Run as ``python -m bench.ca_client --prefix BENCH: --count N`` with ``EPICS_CA_*`` set for
the server under test (libca reads its environment once per process). It connects every
PV, subscribes to each with DBR_TIME_DOUBLE, and reports ``ready`` once every
subscription delivered its first value.

Measurement. The subscription callback is a raw ``ca_create_subscription`` callback (a
ctypes function over pyepics's libca) that reads only the DBR_TIME timestamp: pyepics's
own monitor path unpacks every value into a dictionary of keywords and would make the
client, not the server, the limit. Latency is the arrival time minus the reading's
timestamp (the time the driver posted it, carried in DBR_TIME, same host clock).
``window t0 t1 grace`` counts the updates that arrive in ``[t0, t1]`` (UNIX time) and
keeps their latencies; at ``t1 + grace`` it reports ``result``: count, rate and the
latency distribution (:func:`bench.stats.summary`), plus how many of the updates stamped
inside the window had arrived by then (``stamped``, to compare with what the server
posted: Channel Access may coalesce a PV's intermediate values under load).

``roundtrip pv n [deadline]`` writes ``n`` distinct setpoints (or as many as fit before
``deadline``) to ``pv`` with ``ca_put`` (no
callback) and times each until the PV's monitor shows the value written: the write
round trip as an operator panel sees it.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import threading
import time

import epics  # noqa: F401  (loads libca with this process's environment)
from epics import ca, dbr

from bench.stats import summary
from bench.wire import Requests, emit, log, measurement_window, pv_names

EPOCH = dbr.EPICS2UNIX_EPOCH
_P_TIME_DOUBLE = ctypes.POINTER(dbr.time_double)


class Recorder:
    """Counts updates and keeps the latencies of those arriving in the window."""

    def __init__(self) -> None:
        self.t0 = float("inf")
        self.t1 = float("-inf")
        self.latencies: list[float] = []
        self.stamped = 0
        self.total = 0
        self.first = 0
        self.expected_first = 0
        self.first_done = threading.Event()

    def record(self, now: float, ts: float) -> None:
        self.total += 1
        if self.first < self.expected_first:
            self.first += 1
            if self.first == self.expected_first:
                self.first_done.set()
            return
        if self.t0 <= now <= self.t1:
            self.latencies.append(now - ts)
        if self.t0 <= ts <= self.t1:
            self.stamped += 1


class Client:
    """Channels and subscriptions of one benchmark client."""

    def __init__(self, names: list[str], connect_timeout: float) -> None:
        self.names = names
        self.recorder = Recorder()
        self.chids: list[object] = []
        self._keep: list[object] = []
        self.connect_timeout = connect_timeout

    def connect(self) -> float:
        ca.use_initial_context()  # libca contexts are per thread: join the one pyepics made
        t = time.monotonic()
        lock = threading.Lock()
        connected: set[str] = set()
        done = threading.Event()

        def on_connect(pvname=None, conn=None, **kw):  # libca's thread
            if conn:
                with lock:
                    connected.add(pvname)
                    if len(connected) == len(self.names):
                        done.set()

        self._keep.append(on_connect)
        self.chids = [ca.create_channel(n, connect=False, auto_cb=False, callback=on_connect) for n in self.names]
        ca.flush_io()
        if self.names and not done.wait(self.connect_timeout):
            missing = sorted(set(self.names) - connected)
            raise RuntimeError(f"{len(missing)} PVs not connected within {self.connect_timeout} s, e.g. {missing[:3]}")
        return time.monotonic() - t

    def subscribe(self) -> float:
        ca.use_initial_context()
        rec = self.recorder
        rec.expected_first = len(self.chids)
        if not self.chids:
            return 0.0

        def on_event(args):  # libca's thread; keep it short
            now = time.time()
            if args.status != 1:
                return
            stamp = ctypes.cast(args.raw_dbr, _P_TIME_DOUBLE).contents.stamp
            rec.record(now, EPOCH + stamp.secs + stamp.nsec * 1e-9)

        callback = dbr.make_callback(on_event, dbr.event_handler_args)
        self._keep.append(callback)
        t = time.monotonic()
        for chid in self.chids:
            evid = ctypes.c_void_p()
            usr = ctypes.py_object(None)
            self._keep.extend([evid, usr])
            status = ca.libca.ca_create_subscription(
                dbr.TIME_DOUBLE, 1, chid, dbr.DBE_VALUE | dbr.DBE_ALARM, callback, usr, ctypes.byref(evid)
            )
            if status != 1:
                raise RuntimeError(f"ca_create_subscription failed: {ca.message(status)}")
        ca.flush_io()
        if not rec.first_done.wait(self.connect_timeout):
            raise RuntimeError(f"only {rec.first} of {rec.expected_first} first monitor values arrived")
        return time.monotonic() - t


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prefix", default="BENCH:")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--connect-timeout", type=float, default=120.0)
    args = parser.parse_args()
    ca.initialize_libca()
    loop = asyncio.get_running_loop()
    client = Client(pv_names(args.prefix, args.count), args.connect_timeout)
    connect_s = await asyncio.to_thread(client.connect)
    subscribe_s = await asyncio.to_thread(client.subscribe)

    window = measurement_window(loop, lambda: client.recorder)

    async def roundtrip(
        pv: str, n: int, base: float = 1.0, step: float = 0.001, timeout: float = 5.0, deadline: float | None = None
    ) -> dict:
        return await asyncio.to_thread(_roundtrip, pv, n, base, step, timeout, deadline)

    requests = Requests(loop, {"window": window, "roundtrip": roundtrip})
    requests.start()
    emit({"event": "ready", "channels": len(client.chids), "connect_s": connect_s, "subscribe_s": subscribe_s})
    await requests.stopped.wait()


def _roundtrip(pv: str, n: int, base: float, step: float, timeout: float, deadline: float | None) -> dict:
    ca.use_initial_context()
    chid = ca.create_channel(pv, connect=False, auto_cb=False)
    if not ca.connect_channel(chid, timeout=timeout):
        raise RuntimeError(f"{pv}: not connected")
    seen = threading.Event()
    state = {"want": None}

    def on_event(args):
        if args.status != 1:
            return
        value = ctypes.cast(args.raw_dbr, _P_TIME_DOUBLE).contents.value
        want = state["want"]
        if want is not None and abs(value - want) < 1e-9:
            seen.set()

    callback = dbr.make_callback(on_event, dbr.event_handler_args)
    evid, usr = ctypes.c_void_p(), ctypes.py_object(None)
    status = ca.libca.ca_create_subscription(dbr.TIME_DOUBLE, 1, chid, dbr.DBE_VALUE, callback, usr, ctypes.byref(evid))
    if status != 1:
        raise RuntimeError(f"ca_create_subscription failed: {ca.message(status)}")
    ca.flush_io()
    times, failures = [], 0
    for k in range(n):
        if deadline is not None and time.time() >= deadline:
            break
        value = round(base + step * (k % 500 + 1), 6)
        seen.clear()
        state["want"] = value
        t = time.perf_counter()
        ca.put(chid, value)
        ca.flush_io()
        if seen.wait(timeout):
            times.append(time.perf_counter() - t)
        else:
            failures += 1
        state["want"] = None
    ca.clear_subscription(evid)
    return {"times": times, "failures": failures, "latency": summary(times)}


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception as e:  # the orchestrator reads stderr
        log(f"ca_client: {type(e).__name__}: {e}")
        raise
