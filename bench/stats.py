"""Summaries of measured samples: percentiles and a log-spaced histogram (the raw shape)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: Histogram bucket edges in seconds: 10 per decade from 10 us to 100 s.
EDGES = np.logspace(-5, 2, 71)


def summary(samples: Sequence[float]) -> dict:
    """Count, mean, p50/p90/p99/p99.9, min, max (seconds) and the histogram of ``samples``."""
    if not len(samples):
        return {"n": 0}
    a = np.asarray(samples, dtype=np.float64)
    p50, p90, p99, p999 = np.percentile(a, [50, 90, 99, 99.9])
    counts, _ = np.histogram(np.clip(a, EDGES[0], EDGES[-1]), EDGES)
    nz = np.nonzero(counts)[0]
    return {
        "n": int(a.size),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "p999": float(p999),
        "max": float(a.max()),
        "hist_edges_s": [float(EDGES[i]) for i in range(nz[0], nz[-1] + 2)] if nz.size else [],
        "hist_counts": [int(c) for c in counts[nz[0] : nz[-1] + 1]] if nz.size else [],
    }


#: Latencies a client sends beside its summary, so clients can be pooled exactly enough.
SUBSAMPLE = 20_000


def subsample(samples: Sequence[float], k: int = SUBSAMPLE, seed: int = 1) -> list[int]:
    """At most ``k`` of ``samples``, chosen uniformly, in integer microseconds."""
    a = np.asarray(samples, dtype=np.float64)
    if a.size > k:
        a = np.random.default_rng(seed).choice(a, k, replace=False)
    return [int(round(x * 1e6)) for x in a]


def pooled(parts: Sequence[tuple[int, Sequence[int]]]) -> dict:
    """Percentiles over several clients from (count, subsample in us) pairs, each weighted by its count."""
    values, weights = [], []
    for count, sample in parts:
        if count and len(sample):
            values.append(np.asarray(sample, dtype=np.float64) / 1e6)
            weights.append(np.full(len(sample), count / len(sample)))
    if not values:
        return {"n": 0}
    v, w = np.concatenate(values), np.concatenate(weights)
    order = np.argsort(v)
    v, cw = v[order], np.cumsum(w[order])
    total = cw[-1]

    def q(p: float) -> float:
        return float(v[min(int(np.searchsorted(cw, p * total)), v.size - 1)])

    return {
        "n": int(round(total)),
        "mean": float((v * w[order]).sum() / total),
        "p50": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
        "p999": q(0.999),
        "max": float(v[-1]),
    }


def ms(seconds: float | None) -> str:
    """Seconds as milliseconds for a table cell."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    v = seconds * 1000
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"
