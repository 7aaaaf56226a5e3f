"""Sample storage for strip charts: a preallocated live ring and merged history chunks.

Theory of operation. A chart curve needs its points as contiguous, time-ordered numpy
arrays every time it is redrawn (``PlotDataItem.setData``), twenty times a second, so
storage must neither allocate nor copy per frame:

* :class:`Ring` keeps the live points in arrays of twice its capacity and writes every
  point twice, at ``i`` and ``i + capacity``. The last ``n`` points are then always the
  contiguous slice ``[head - n + capacity, head + capacity)`` -- a view, never a copy --
  and appending is O(1) with nothing allocated after construction. When full, the
  oldest point is overwritten.
* :class:`History` holds what the historian returned, as chunks of one request each
  (``since``/``until`` plus the points). Chunks arrive in any order (the first one when a
  chart opens, older ones as someone pans into the past, gap fills after a reconnect);
  they are merged into one sorted array set only when a chunk arrives, which is rare.
* :class:`Trace` is one PV of one chart: a :class:`History` and a :class:`Ring`, plus
  the bookkeeping that decides which past interval still has to be fetched.

Every point carries ``ok``: False for an INVALID reading (no trustworthy value) and for
the first point after a connection gap. Curves are drawn with a ``connect`` array built
from it, so a lost instrument or a lost connection shows as a gap in the line and never
as a straight segment that looks like data. The value stored for a point that is not
``ok`` is the previous finite value (or 0), so arrays stay finite: the curves skip
pyqtgraph's finite check, and the auto-range is not dragged to a meaningless value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Default live points kept per PV (at 10 Hz, close to three hours).
RING_CAPACITY = 100_000


class Ring:
    """A fixed-capacity ring of (time, value, ok) points with contiguous, copy-free views."""

    def __init__(self, capacity: int = RING_CAPACITY) -> None:
        if capacity < 2:
            raise ValueError(f"ring capacity must be at least 2, got {capacity}")
        self.capacity = capacity
        self._t = np.zeros(2 * capacity)
        self._y = np.zeros(2 * capacity)
        self._ok = np.zeros(2 * capacity, dtype=bool)
        self._head = 0  # next write position in [0, capacity)
        self.count = 0
        """How many points the ring holds (at most ``capacity``)."""
        self.overwritten = 0
        """How many of the oldest points were dropped because the ring was full."""

    def __len__(self) -> int:
        return self.count

    def append(self, t: float, y: float, ok: bool) -> None:
        """Add one point (the caller keeps times non-decreasing)."""
        i, j = self._head, self._head + self.capacity
        self._t[i] = self._t[j] = t
        self._y[i] = self._y[j] = y
        self._ok[i] = self._ok[j] = ok
        self._head = (i + 1) % self.capacity
        if self.count < self.capacity:
            self.count += 1
        else:
            self.overwritten += 1

    def _slice(self) -> slice:
        end = self._head + self.capacity
        return slice(end - self.count, end)

    def times(self) -> np.ndarray:
        """Times of the points held, oldest first (a view: do not keep it across appends)."""
        return self._t[self._slice()]

    def values(self) -> np.ndarray:
        """Values of the points held, oldest first (a view)."""
        return self._y[self._slice()]

    def ok(self) -> np.ndarray:
        """Validity of the points held, oldest first (a view)."""
        return self._ok[self._slice()]

    def first(self) -> tuple[float, float, bool] | None:
        """The oldest point held."""
        if not self.count:
            return None
        s = self._slice().start
        return float(self._t[s]), float(self._y[s]), bool(self._ok[s])

    def last(self) -> tuple[float, float, bool] | None:
        """The newest point held."""
        if not self.count:
            return None
        e = self._slice().stop - 1
        return float(self._t[e]), float(self._y[e]), bool(self._ok[e])


@dataclass
class Chunk:
    """The answer to one history request: the interval asked for and the points in it."""

    since: float
    until: float
    times: np.ndarray
    values: np.ndarray
    ok: np.ndarray


def clean(times: np.ndarray, values: np.ndarray, ok: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted float arrays with non-finite values marked not ok and replaced by the previous finite value."""
    t = np.asarray(times, dtype=float)
    y = np.asarray(values, dtype=float)
    if t.shape != y.shape or t.ndim != 1:
        raise ValueError(f"history times and values must be 1-D arrays of one length, got {t.shape} and {y.shape}")
    good = np.isfinite(y) & np.isfinite(t)
    if ok is not None:
        good &= np.asarray(ok, dtype=bool)
    t, y, good = t[np.isfinite(t)], y[np.isfinite(t)], good[np.isfinite(t)]
    if len(t) > 1 and np.any(np.diff(t) < 0):
        order = np.argsort(t, kind="stable")
        t, y, good = t[order], y[order], good[order]
    if not good.all():
        # carry the previous finite value forward so the arrays stay finite
        idx = np.where(good, np.arange(len(y)), 0)
        np.maximum.accumulate(idx, out=idx)
        y = np.where(good, y, y[idx] if good.any() else 0.0)
        y = np.where(np.isfinite(y), y, 0.0)
    return t, y, good


def steps(times: np.ndarray, values: np.ndarray, connect: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points and ``connect`` drawn as held steps: each value holds until the next point's time, then the line rises to it.

    Point ``i`` becomes the vertices ``(t[i], y[i])`` and ``(t[i+1], y[i])``; the hold and
    the rise to point ``i + 1`` are drawn only where ``connect[i]`` is (a gap stays a gap).
    New arrays of ``2n - 1`` vertices; made only when a curve gets new points.
    """
    n = len(times)
    if n < 2:
        return times, values, connect
    t = np.empty(2 * n - 1)
    y = np.empty(2 * n - 1)
    c = np.empty(2 * n - 1, dtype=bool)
    t[0::2] = times
    t[1::2] = times[1:]
    y[0::2] = values
    y[1::2] = values[:-1]
    c[0::2] = connect
    c[1::2] = connect[:-1]
    return t, y, c


class History:
    """Points from the historian for one PV, merged from chunks requested separately."""

    def __init__(self) -> None:
        self.chunks: list[Chunk] = []
        self.times = np.zeros(0)
        self.values = np.zeros(0)
        self.ok = np.zeros(0, dtype=bool)
        self.connect = np.zeros(0, dtype=bool)
        """``connect[i]``: draw a line from point ``i`` to point ``i + 1``."""

    def __len__(self) -> int:
        return len(self.times)

    def add(self, since: float, until: float, times: np.ndarray, values: np.ndarray, ok: np.ndarray | None = None) -> None:
        """Merge the answer to a request for ``[since, until]``."""
        t, y, good = clean(times, values, ok)
        self.chunks.append(Chunk(since, until, t, y, good))
        self.chunks.sort(key=lambda c: (c.since, c.until))
        ts, ys, oks, cs = [], [], [], []
        for k, c in enumerate(self.chunks):
            if not len(c.times):
                continue
            conn = c.ok.copy()
            conn[:-1] &= c.ok[1:]
            # join to the next chunk only if the two requests touch (no unknown time between them)
            nxt = next((n for n in self.chunks[k + 1 :] if len(n.times)), None)
            conn[-1] = bool(c.ok[-1]) and nxt is not None and nxt.since <= c.until and bool(nxt.ok[0])
            ts.append(c.times)
            ys.append(c.values)
            oks.append(c.ok)
            cs.append(conn)
        if not ts:
            return
        t, y, ok, conn = np.concatenate(ts), np.concatenate(ys), np.concatenate(oks), np.concatenate(cs)
        if len(t) > 1 and np.any(np.diff(t) < 0):  # overlapping requests: sort, and join nothing across
            order = np.argsort(t, kind="stable")
            t, y, ok = t[order], y[order], ok[order]
            conn = ok.copy()
            conn[:-1] &= ok[1:]
            conn[-1] = False
        self.times, self.values, self.ok, self.connect = t, y, ok, conn

    @property
    def since(self) -> float | None:
        """The earliest time asked for so far."""
        return min((c.since for c in self.chunks), default=None)


class Trace:
    """One PV's points on one chart: history (older) and the live ring (newer)."""

    def __init__(self, name: str, capacity: int = RING_CAPACITY) -> None:
        self.name = name
        self.history = History()
        self.ring = Ring(capacity)
        self.live_connect = np.zeros(2 * capacity, dtype=bool)
        self._gap = False
        self._last_finite = 0.0
        self.dirty = False
        """New points since the chart last drew this trace."""
        self.history_dirty = False
        self.covered_since: float | None = None
        """The earliest time history has been fetched from; None: no answer yet."""

    def mark_gap(self) -> None:
        """The connection was lost: do not join the next live point to the previous one."""
        self._gap = True

    def append(self, t: float, value: float | None) -> bool:
        """Add a live point (None: invalid). Returns False when it repeats the newest point."""
        last = self.ring.last()
        ok = value is not None and math.isfinite(value)
        if last is not None:
            if t < last[0]:
                t = last[0]  # keep times non-decreasing: clipping and downsampling need it
            elif t == last[0] and ok == last[2] and (not ok or value == last[1]):
                return False  # the same reading again (a monitor's first value after a reconnect)
        if ok:
            self._last_finite = float(value)  # type: ignore[arg-type]
        self.ring.append(t, self._last_finite, ok)
        self._set_last_connect(ok)  # tentative: a line to the next point, if that one is good
        if last is not None and (self._gap or not ok or not last[2]):
            self._set_prev_connect(False)
        self._gap = False
        self.dirty = True
        return True

    def _connect_index(self, back: int) -> tuple[int, int]:
        cap = self.ring.capacity
        i = (self.ring._head - back) % cap  # noqa: SLF001 -- same module
        return i, i + cap

    def _set_last_connect(self, value: bool) -> None:
        i, j = self._connect_index(1)
        self.live_connect[i] = self.live_connect[j] = value

    def _set_prev_connect(self, value: bool) -> None:
        if self.ring.count < 2:
            return
        i, j = self._connect_index(2)
        self.live_connect[i] = self.live_connect[j] = value

    def live(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The live points: times, values, connect (views)."""
        s = self.ring._slice()  # noqa: SLF001 -- same module
        conn = self.live_connect[s]
        return self.ring.times(), self.ring.values(), conn

    def past(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The history points up to the first live point, joined to it when history reaches up to it.

        Where history and live overlap (the archive already holds samples the monitor
        delivered, or a sample's archived time is rounded to the microsecond past its live
        time), the live points win: history ends at the first live point, so the points
        stay in time order.
        """
        h = self.history
        first = self.ring.first()
        if first is None or not len(h):
            return h.times, h.values, h.connect
        cut = int(np.searchsorted(h.times, first[0], side="left"))
        times, values, conn, ok = h.times[:cut], h.values[:cut], h.connect[:cut].copy(), h.ok[:cut]
        reaches = max(c.until for c in h.chunks) >= first[0]
        if not reaches or not len(times):  # history stops short of live
            return times, values, conn
        conn[-1] = bool(ok[-1]) and first[2]
        return np.append(times, first[0]), np.append(values, first[1]), np.append(conn, False)

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """Every point (history, then live) as new arrays: for inspection, not for drawing."""
        ht, hy, _ = self.past()
        lt, ly, _ = self.live()
        return np.concatenate([ht, lt]), np.concatenate([hy, ly])

    def oldest_time(self) -> float | None:
        """Time of the oldest valid point held (an invalid one, such as a history bound without data, does not count)."""
        h = self.history
        if len(h) and h.ok.any():
            return float(h.times[int(np.argmax(h.ok))])
        ok = self.ring.ok()
        if len(ok) and ok.any():
            return float(self.ring.times()[int(np.argmax(ok))])
        return None

    def newest(self) -> tuple[float, float, bool] | None:
        """The newest point held (live, else history): (time, value, ok)."""
        last = self.ring.last()
        if last is not None or not len(self.history):
            return last
        h = self.history
        return float(h.times[-1]), float(h.values[-1]), bool(h.ok[-1])

    def newest_time(self) -> float | None:
        """Time of the newest point held."""
        last = self.ring.last()
        if last is not None:
            return last[0]
        return float(self.history.times[-1]) if len(self.history) else None
