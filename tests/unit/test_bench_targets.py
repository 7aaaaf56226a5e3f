"""The benchmark's verdict on the write round trip: relative to the raw library of the same round, every round."""

from __future__ import annotations

from bench.report import roundtrip_targets


def _cell(server: str, round_: int, idle_ms: float, loaded_ms: float, protocol: str = "ca") -> dict:
    return {
        "scenario": "roundtrip",
        "protocol": protocol,
        "server": server,
        "round": round_,
        "idle": {"latency": {"p99": idle_ms / 1e3}},
        "loaded": [{"rate_offered": 10_000, "latency": {"p99": loaded_ms / 1e3}}],
    }


def test_each_round_is_held_against_its_own_baseline_and_all_must_pass():
    cells = [
        _cell("labctl", 1, 2.0, 12.0),
        _cell("softioc", 1, 0.5, 8.0),  # limit 16 ms: met
        _cell("caproto", 1, 9.0, 90.0),  # not the raw library of CA: ignored
        _cell("labctl", 2, 2.5, 20.0),
        _cell("softioc", 2, 0.6, 8.0),  # limit 16 ms: missed by 1.25x
    ]
    rows = {r["target"].split(":")[0]: r for r in roundtrip_targets(cells)}
    idle = rows["write round trip CA idle"]
    assert idle["met"] and idle["required"] == "10.0 / 10.0 ms"  # the 10 ms floor
    loaded = rows["write round trip CA under 10.0k/s fan-out"]
    assert not loaded["met"]
    assert loaded["measured"] == "12.0 / 20.0 ms (spread 12.0-20.0)"
    assert loaded["required"] == "16.0 / 16.0 ms"
    assert loaded["by"] == "1.25x"


def test_a_failed_round_is_not_met():
    cells = [_cell("labctl", 1, 2.0, 5.0), {"scenario": "roundtrip", "protocol": "ca", "server": "labctl", "round": 2, "error": "x"}]
    rows = roundtrip_targets(cells)
    idle = next(r for r in rows if "idle" in r["target"])
    assert not idle["met"] and "failed" in idle["measured"]
