"""Serving's collector tuning: an earlier server's garbage is not frozen with the next server's start-up."""

from __future__ import annotations

import gc
import weakref

from labctl.server import tuning


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_a_second_start_does_not_freeze_the_first_servers_garbage():
    tuning.freeze_long_lived()  # a first server starts...
    try:
        state = _Node()  # ...and builds long-lived state with cycles
        alive = weakref.ref(state)
    finally:
        tuning.thaw()  # it stops
    del state  # its state is garbage now, but in a cycle: not freed yet
    tuning.freeze_long_lived()  # the next server starts in the same process
    try:
        assert alive() is None, "the first server's garbage was frozen with the second's start-up"
        assert gc.get_freeze_count() > 0
    finally:
        tuning.thaw()
