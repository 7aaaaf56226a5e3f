"""Pure parts of the CA adapter: event bits, record types, metadata, the update queue."""

from __future__ import annotations

import asyncio
import math

import pytest
from caproto import SubscriptionType
from labctl.ioc.config.pvs import AlarmConfig
from labctl.ioc.pv import PVInfo
from labctl.ioc.types import EventMask, PVType, Reading, Update
from labctl.server.ca.channels import dbe_flags, subscription_backlog
from labctl.server.ca.context import put_status
from labctl.server.ca.metadata import numeric_metadata, record_type, states_of
from labctl.server.ca.service import UpdateQueue
from labctl.server.ca.wire import clip_utf8

from tests.helpers import wait_for


@pytest.mark.parametrize("bits", range(16))
def test_event_bits_are_dbe_flags(bits):
    mask = EventMask(bits)
    flags = dbe_flags(mask)
    assert bool(flags & SubscriptionType.DBE_VALUE) == bool(mask & EventMask.VALUE)
    assert bool(flags & SubscriptionType.DBE_LOG) == bool(mask & EventMask.LOG)
    assert bool(flags & SubscriptionType.DBE_ALARM) == bool(mask & EventMask.ALARM)
    assert bool(flags & SubscriptionType.DBE_PROPERTY) == bool(mask & EventMask.PROPERTY)


@pytest.mark.parametrize(
    ("type_", "writable", "expr", "rtyp"),
    [
        (PVType.FLOAT64, False, None, "ai"),
        (PVType.FLOAT64, True, None, "ao"),
        (PVType.FLOAT64, False, "a + 1", "calc"),
        (PVType.INT, True, None, "longout"),
        (PVType.BOOL, False, None, "bi"),
        (PVType.ENUM, True, None, "mbbo"),
        (PVType.STRING, False, None, "stringin"),
        (PVType.FLOAT64_ARRAY, True, None, "waveform"),
    ],
)
def test_record_types(type_, writable, expr, rtyp):
    info = PVInfo("X", type_, "soft", writable=writable, expr=expr, states=("A", "B") if type_ is PVType.ENUM else ())
    assert record_type(info) == rtyp


def test_metadata_of_a_bare_numeric_pv():
    md = numeric_metadata(PVInfo("X", PVType.FLOAT64, "soft"))
    assert (md["lower_disp_limit"], md["upper_disp_limit"], md["lower_ctrl_limit"], md["upper_ctrl_limit"]) == (
        0,
        0,
        0,
        0,
    )
    assert all(
        math.isnan(md[k])
        for k in ("lower_alarm_limit", "lower_warning_limit", "upper_warning_limit", "upper_alarm_limit")
    )


def test_control_limits_are_the_drive_limits_else_the_display_range():
    info = PVInfo("X", PVType.FLOAT64, "soft", display=(0, 100), drive=(10, 20), alarm=AlarmConfig(high=90))
    md = numeric_metadata(info)
    assert (md["lower_ctrl_limit"], md["upper_ctrl_limit"], md["upper_warning_limit"]) == (10, 20, 90)
    md = numeric_metadata(PVInfo("X", PVType.FLOAT64, "soft", display=(0, 100)))
    assert (md["lower_ctrl_limit"], md["upper_ctrl_limit"]) == (0, 100)


def test_text_is_clipped_at_character_boundaries():
    assert clip_utf8("mbar", 7) == "mbar"
    assert clip_utf8("°C°C°C", 7) == "°C°C"  # ° is two bytes: 2+1+2+1 = 6, the next ° does not fit
    assert states_of(PVInfo("X", PVType.BOOL, "soft")) == ("false", "true")
    assert states_of(PVInfo("X", PVType.ENUM, "soft", states=("é" * 25,))) == ("é" * 12,)


def test_large_arrays_queue_fewer_updates_per_subscriber():
    assert subscription_backlog(PVInfo("X", PVType.FLOAT64, "soft")) == 32
    assert subscription_backlog(PVInfo("X", PVType.FLOAT64_ARRAY, "soft", length=100)) == 32
    assert subscription_backlog(PVInfo("X", PVType.FLOAT64_ARRAY, "soft")) == 2  # up to a million elements


def test_put_status_table():
    from labctl.ioc.errors import (
        DriverTimeout,
        Interlocked,
        LockedBy,
        NotWritable,
        OutOfRange,
        PermissionDenied,
        WrongType,
    )

    assert put_status(PermissionDenied("X", "eve", "soft")).name == "ECA_NOWTACCESS"
    assert put_status(LockedBy("X", "cryostat", "bob", None)).name == "ECA_NOWTACCESS"
    assert put_status(NotWritable("X")).name == "ECA_NOWTACCESS"
    assert put_status(OutOfRange("X", 5, 0, 1)).name == "ECA_PUTFAIL"
    assert put_status(WrongType("X", "bad")).name == "ECA_PUTFAIL"
    assert put_status(Interlocked("X", "vacuum")).name == "ECA_PUTFAIL"
    assert put_status(DriverTimeout("ls336", "no answer")).name == "ECA_PUTFAIL"
    assert put_status(ZeroDivisionError()).name == "ECA_INTERNAL"


async def test_update_queue_keeps_the_latest_per_pv_with_merged_bits():
    applied: list[Update] = []

    async def apply(update: Update) -> None:
        applied.append(update)

    queue = UpdateQueue(apply)
    pump = asyncio.create_task(queue.run())
    try:
        queue.offer(Update("A", Reading(1.0, 1.0), EventMask.VALUE | EventMask.LOG))
        queue.offer(Update("B", Reading(5.0, 1.0), EventMask.VALUE))
        queue.offer(Update("A", Reading(2.0, 2.0), EventMask.VALUE))  # same loop turn: replaces the first
        await queue.flush("A")  # applies A now, whatever the pump does
        assert [(u.name, u.reading.value, u.mask) for u in applied] == [("A", 2.0, EventMask.VALUE | EventMask.LOG)]
        await wait_for(lambda: len(applied) == 2, what="the pump")
        assert (applied[1].name, applied[1].reading.value) == ("B", 5.0)
        assert queue.coalesced == 1
    finally:
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
