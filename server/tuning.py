"""The server's process tuning: many long-lived objects without the cyclic garbage collector's rescans.

Theory of operation. CPython's collector runs a full collection whenever the objects that
survived earlier collections grow by a quarter, and each full collection traverses every
container object alive. Reading a site of 100 000 PVs and building its database allocates
a few million objects that all stay alive, so the collector would traverse the growing
heap again and again (half the build time at that size) for no garbage at all.
:func:`gc_paused` turns automatic collection off for such a block (reference counting
still frees everything that is not in a cycle) and restores it afterwards; the first
collection after the block finds any cycles left.

Once a server has started, the objects it built (the database, the OPC UA address space,
the libraries' own tables: millions at scale) live as long as it does, yet every full
collection would traverse them all again, stopping the event loop for 40-75 ms at
10 000 PVs about once a second under load -- a latency tail every client sees.
:func:`freeze_long_lived` moves everything alive into the collector's permanent
generation (``gc.freeze()``), so later collections traverse only what was made since,
and raises the youngest generation's threshold from 700 to :data:`SERVING_THRESHOLDS`'s
50 000 allocations: serving allocates objects that live for a batch or a publishing
interval (archive rows, notifications), which at the default threshold survive two
young collections, reach the oldest generation and trigger full collections over every
channel built since start-up (up to 200 ms each at 10 000 PVs, several per minute).
With the higher threshold they are gone before the first collection; each young
collection costs a few milliseconds and bounds what cyclic garbage can pile up.
:func:`thaw` restores both when the server stops (a process may run another). A
process that runs servers one after another (a test session, a host embedding labctl)
must not freeze an earlier server's garbage with the next server's start-up:
``gc.freeze()`` takes whatever is alive, collectable cycles included, and a frozen cycle
is never collected while frozen. So once a server has thawed, the next
:func:`freeze_long_lived` collects first (one full collection at that start, none at a
process's first); without it a test session grew by one whole server (~40 MiB of
asyncua address space and caproto channels) per test, to 3 GiB.

Threads and the GIL. Besides the event loop, a server runs threads that need the GIL for
short spells: each instrument link's I/O thread (pyvisa: the command, the answer's
parsing), the audit journal's (the fsync of a batch), the historian's ingest thread. A
thread that wants the GIL while another runs Python waits for CPython's *switch interval*
(5 ms by default) before the holder is asked to drop it. A write passes the GIL back and
forth four times or more (command and read-back to the link's thread and back, the
journal's fsync and back), and under a fan-out load the loop is busy most of the time: at
the default interval each hand-over cost up to 5 ms, and a write's 99th percentile grew to
tens of milliseconds of pure waiting. While serving, :data:`SERVING_SWITCH_INTERVAL_S`
(0.5 ms) bounds each hand-over at a tenth of that; the cost is more frequent switches
when two threads are both busy computing, a few microseconds each
(``docs/benchmarks.md``, "Where a write's time goes", has the figures).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_DEFAULT_THRESHOLDS = gc.get_threshold()
#: Collection thresholds while serving (see the module docstring).
SERVING_THRESHOLDS = (50_000, 20, 10)
_DEFAULT_SWITCH_INTERVAL_S = sys.getswitchinterval()
#: The GIL's switch interval while serving (see the module docstring).
SERVING_SWITCH_INTERVAL_S = 0.0005


@contextmanager
def gc_paused() -> Iterator[None]:
    """Automatic cyclic garbage collection off within the block (nested blocks are fine)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_thawed = False


def freeze_long_lived() -> None:
    """Exempt every object alive now from later collections (see the module docstring)."""
    if _thawed:
        gc.collect()  # an earlier server's garbage is not this one's long-lived state
    gc.freeze()
    gc.set_threshold(*SERVING_THRESHOLDS)
    sys.setswitchinterval(SERVING_SWITCH_INTERVAL_S)


def thaw() -> None:
    """Hand the exempted objects back to the collector."""
    global _thawed
    _thawed = True
    gc.unfreeze()
    gc.set_threshold(*_DEFAULT_THRESHOLDS)
    sys.setswitchinterval(_DEFAULT_SWITCH_INTERVAL_S)
