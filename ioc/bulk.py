"""Building many long-lived objects at once without the cyclic garbage collector's rescans.

Theory of operation. CPython's collector runs a full collection whenever the objects that
survived earlier collections grow by a quarter, and each full collection traverses every
container object alive. Reading a site of 100 000 PVs and building its database allocates
a few million objects that all stay alive, so the collector would traverse the growing
heap again and again (half the build time at that size) for no garbage at all.
:func:`gc_paused` turns automatic collection off for such a block (reference counting
still frees everything that is not in a cycle) and restores it afterwards; the first
collection after the block finds any cycles left.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


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

