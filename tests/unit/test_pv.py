"""PV types and value checks: every bad write is refused before it reaches an instrument."""

from __future__ import annotations

import math

import numpy as np
import pytest
from labctl.ioc.config.pvs import AlarmConfig
from labctl.ioc.errors import OutOfRange, WrongType
from labctl.ioc.pv import Deadbands, PVInfo, canonical, coerce
from labctl.ioc.types import EventMask, PVType, Reading, Severity, Status


def pv(t: PVType, **kw) -> PVInfo:
    return PVInfo(name="T:PV", type=t, resource="r", **kw)


@pytest.mark.parametrize(
    ("t", "kw", "value", "expected"),
    [
        (PVType.FLOAT64, {}, 1, 1.0),
        (PVType.FLOAT64, {}, np.float32(2.5), 2.5),
        (PVType.FLOAT64, {}, [3.5], 3.5),
        (PVType.FLOAT64, {"allow_nan": True}, math.nan, math.nan),
        (PVType.INT, {}, 7, 7),
        (PVType.INT, {}, 7.0, 7),
        (PVType.INT, {}, np.int64(-3), -3),
        (PVType.BOOL, {}, True, True),
        (PVType.BOOL, {}, 0, False),
        (PVType.ENUM, {"states": ("OFF", "LOW", "HIGH")}, "HIGH", 2),
        (PVType.ENUM, {"states": ("OFF", "LOW", "HIGH")}, 1, 1),
        (PVType.STRING, {}, "hello", "hello"),
        (PVType.STRING, {}, b"bytes", "bytes"),
        (PVType.FLOAT64_ARRAY, {}, [1, 2.5], (1.0, 2.5)),
        (PVType.FLOAT64_ARRAY, {"length": 3}, np.array([1.0, 2.0, 3.0]), (1.0, 2.0, 3.0)),
    ],
)
def test_coerce_accepts(t, kw, value, expected):
    got = coerce(pv(t, **kw), value)
    assert type(got) is type(expected)
    if isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == expected


@pytest.mark.parametrize(
    ("t", "kw", "value", "words"),
    [
        (PVType.FLOAT64, {}, "1.5", "expected a number"),
        (PVType.FLOAT64, {}, True, "expected a number"),
        (PVType.FLOAT64, {}, math.nan, "nan"),
        (PVType.FLOAT64, {}, math.inf, "inf"),
        (PVType.FLOAT64, {}, [1.0, 2.0], "got 2 values"),
        (PVType.INT, {}, 1.5, "expected an integer"),
        (PVType.INT, {}, 2**70, "64-bit"),
        (PVType.BOOL, {}, 2, "expected a boolean"),
        (PVType.BOOL, {}, "yes", "expected a boolean"),
        (PVType.ENUM, {"states": ("OFF", "ON")}, "MAYBE", "not one of the states"),
        (PVType.ENUM, {"states": ("OFF", "ON")}, 2, "outside 0..1"),
        (PVType.ENUM, {"states": ("OFF", "ON")}, -1, "outside 0..1"),
        (PVType.STRING, {}, "x" * 40, "at most 39"),  # the default length: what DBR_STRING holds
        (PVType.STRING, {"length": 5}, "abcdef", "at most 5"),
        (PVType.STRING, {}, 12, "expected a string"),
        (PVType.FLOAT64_ARRAY, {"length": 3}, [1.0, 2.0, 3.0, 4.0], "at most 3"),  # fewer are taken (NORD)
        (PVType.FLOAT64_ARRAY, {}, [1.0, math.nan], "element [1]"),
        (PVType.FLOAT64_ARRAY, {}, "abc", "expected an array"),
        (PVType.FLOAT64_ARRAY, {}, [1.0, "x"], "expected a number"),
    ],
)
def test_coerce_refuses_with_a_reason(t, kw, value, words):
    with pytest.raises(WrongType) as e:
        coerce(pv(t, **kw), value)
    assert e.value.pv == "T:PV"
    assert words in str(e.value)
    assert str(e.value).startswith("T:PV: write refused: ")


@pytest.mark.parametrize("value", [-0.1, 10.5])
def test_drive_limits_refuse_outside(value):
    info = pv(PVType.FLOAT64, drive=(0.0, 10.0))
    with pytest.raises(OutOfRange) as e:
        coerce(info, value)
    assert (e.value.low, e.value.high) == (0.0, 10.0)
    assert "outside the drive limits [0.0, 10.0]" in str(e.value)


def test_drive_limits_include_the_edges_and_apply_to_ints_and_arrays():
    assert coerce(pv(PVType.FLOAT64, drive=(0.0, 10.0)), 10.0) == 10.0
    with pytest.raises(OutOfRange):
        coerce(pv(PVType.INT, drive=(0.0, 3.0)), 4)
    with pytest.raises(OutOfRange):
        coerce(pv(PVType.FLOAT64_ARRAY, drive=(0.0, 3.0)), [1.0, 4.0])


def test_canonical_keeps_readings_outside_drive_limits_and_nan():
    info = pv(PVType.FLOAT64, drive=(0.0, 1.0))
    assert canonical(info, 5) == 5.0
    assert math.isnan(canonical(info, math.nan))
    with pytest.raises(WrongType):
        canonical(info, "garbage")


def reading(v, sev=Severity.NO_ALARM, st=Status.NO_ALARM, t=0.0):
    return Reading(v, t, sev, st)


def test_deadbands_monitor_and_archive_separately():
    db = Deadbands(monitor=0.1, archive=0.5)
    assert db.mask(reading(1.0)) == EventMask.VALUE | EventMask.LOG | EventMask.ALARM  # first value
    assert db.mask(reading(1.05)) == EventMask.NONE
    assert db.mask(reading(1.2)) == EventMask.VALUE
    assert db.mask(reading(1.25)) == EventMask.NONE  # within 0.1 of 1.2
    assert db.mask(reading(1.6)) == EventMask.VALUE | EventMask.LOG  # 0.6 from archived 1.0
    # a change of alarm state is always posted, whatever the deadband
    assert db.mask(reading(1.6, Severity.INVALID, Status.COMM)) & EventMask.ALARM


def test_zero_deadband_posts_every_change_but_not_repeats():
    db = Deadbands(0.0, 0.0)
    db.mask(reading(1.0))
    assert db.mask(reading(1.0)) == EventMask.NONE
    assert db.mask(reading(1.0000001)) == EventMask.VALUE | EventMask.LOG


def test_deadbands_on_strings_and_arrays():
    db = Deadbands(0.0, 0.0)
    db.mask(reading("a"))
    assert db.mask(reading("a")) == EventMask.NONE
    assert db.mask(reading("b")) == EventMask.VALUE | EventMask.LOG
    arr = Deadbands(0.5, 0.0)
    arr.mask(reading((1.0, 2.0)))
    assert arr.mask(reading((1.1, 2.0))) == EventMask.LOG
    assert arr.mask(reading((1.1, 2.6))) == EventMask.VALUE | EventMask.LOG


def test_alarm_config_refuses_unordered_limits():
    with pytest.raises(ValueError, match="ordered"):
        AlarmConfig(low=5, high=1)
