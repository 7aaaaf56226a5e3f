"""Limit alarms as the EPICS ai record computes them: levels, hysteresis, delay."""

from __future__ import annotations

import pytest
from labctl.ioc.config.pvs import AlarmConfig
from labctl.ioc.pv import AlarmEvaluator, limit_alarm
from labctl.ioc.types import Severity, Status

CFG = AlarmConfig(lolo=1.0, low=2.0, high=8.0, hihi=9.0, hysteresis=0.5)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.5, (Severity.MAJOR, Status.LOLO)),
        (1.0, (Severity.MAJOR, Status.LOLO)),
        (1.5, (Severity.MINOR, Status.LOW)),
        (5.0, (Severity.NO_ALARM, Status.NO_ALARM)),
        (8.0, (Severity.MINOR, Status.HIGH)),
        (9.5, (Severity.MAJOR, Status.HIHI)),
        (float("nan"), (Severity.INVALID, Status.CALC)),
    ],
)
def test_levels(value, expected):
    assert limit_alarm(value, CFG, Status.NO_ALARM) == expected


def test_hysteresis_holds_an_alarm_until_back_inside_by_the_band():
    ev = AlarmEvaluator(CFG)
    assert ev.evaluate(8.1, 0) == (Severity.MINOR, Status.HIGH)
    assert ev.evaluate(7.8, 1) == (Severity.MINOR, Status.HIGH)  # inside 8.0 but within 0.5
    assert ev.evaluate(7.5, 2) == (Severity.MINOR, Status.HIGH)  # exactly at limit - hyst
    assert ev.evaluate(7.4, 3) == (Severity.NO_ALARM, Status.NO_ALARM)
    # a fresh crossing needs the full limit again
    assert ev.evaluate(7.9, 4) == (Severity.NO_ALARM, Status.NO_ALARM)


def test_hysteresis_from_hihi_falls_back_to_high():
    ev = AlarmEvaluator(CFG)
    assert ev.evaluate(9.2, 0)[1] is Status.HIHI
    assert ev.evaluate(8.7, 1)[1] is Status.HIHI
    assert ev.evaluate(8.4, 2) == (Severity.MINOR, Status.HIGH)


def test_low_side_hysteresis():
    ev = AlarmEvaluator(CFG)
    assert ev.evaluate(1.9, 0)[1] is Status.LOW
    assert ev.evaluate(2.4, 1)[1] is Status.LOW
    assert ev.evaluate(2.6, 2)[1] is Status.NO_ALARM


def test_delay_raises_only_after_the_condition_persists():
    ev = AlarmEvaluator(AlarmConfig(high=5.0, delay_s=10.0))
    assert ev.evaluate(6.0, 100.0) == (Severity.NO_ALARM, Status.NO_ALARM)
    assert ev.evaluate(6.0, 105.0) == (Severity.NO_ALARM, Status.NO_ALARM)
    assert ev.evaluate(6.0, 110.0) == (Severity.MINOR, Status.HIGH)
    # clearing is immediate
    assert ev.evaluate(4.0, 111.0) == (Severity.NO_ALARM, Status.NO_ALARM)
    # a blip shorter than the delay never raises
    assert ev.evaluate(6.0, 200.0)[0] is Severity.NO_ALARM
    assert ev.evaluate(4.0, 205.0)[0] is Severity.NO_ALARM
    assert ev.evaluate(6.0, 206.0)[0] is Severity.NO_ALARM


def test_no_alarm_config_or_non_numbers_never_alarm():
    assert AlarmEvaluator(None).evaluate(1e9, 0) == (Severity.NO_ALARM, Status.NO_ALARM)
    assert AlarmEvaluator(CFG).evaluate("text", 0) == (Severity.NO_ALARM, Status.NO_ALARM)
