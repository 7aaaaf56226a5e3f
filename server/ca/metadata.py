"""What Channel Access reports about a PV besides its value: DBR_CTRL metadata, record type, states.

Theory of operation. Everything here is read from the PV's :class:`~labctl.ioc.pv.PVInfo`,
once, when its channel is built (:mod:`labctl.server.ca.channels`) or a record field is
asked for (:mod:`labctl.server.ca.fields`).

DBR_CTRL metadata comes from the PV: units and precision; display limits are the display
range; control limits the drive limits (else the display range, see
:attr:`~labctl.ioc.pv.PVInfo.control_limits`); alarm limits are the PV's HIHI/HIGH/LOW/LOLO
(NaN when unset, as an EPICS ai record reports a limit whose severity is NO_ALARM).
Units are cut to the 7 bytes DBR_CTRL holds. The record type a client sees (``RTYP``,
DBR_CLASS_NAME) is the EPICS record a PV most resembles (:func:`record_type`). Enum and
bool PVs serve state strings (bool: ``false``/``true``) cut to the 25 bytes a
DBR_CTRL_ENUM string holds; a DBR_CTRL_ENUM carries at most 16 of them.

A string PV whose declared length exceeds the 39 characters of DBR_STRING is a *long
string*, as an EPICS lsi/lso record: DBR_STRING reads give its first 39 bytes, and its
whole text is the DBR_CHAR array ``NAME.VAL$`` (:func:`long_string_bytes` elements, room
for the declared number of characters in UTF-8). A string PV of at most 39 characters is
a stringin/stringout, whole in DBR_STRING (its ``.VAL$`` works too, as on an IOC).
"""

from __future__ import annotations

from typing import Any

from labctl.ioc.pv import PVInfo
from labctl.ioc.types import PVType
from labctl.server.ca.wire import MAX_STRING_BYTES, clip_utf8

#: DBR_CTRL units hold 8 bytes including the NUL.
MAX_UNITS_BYTES = 7
#: A DBR_CTRL_ENUM carries at most 16 state strings of 25 bytes each.
MAX_ENUM_STATES = 16
MAX_ENUM_STRING_BYTES = 25
#: State strings of a bool PV.
BOOL_STATES = ("false", "true")


def long_string(info: PVInfo) -> bool:
    """Whether a string PV is a long string: its declared length exceeds what DBR_STRING holds (39)."""
    return info.type is PVType.STRING and info.max_length > MAX_STRING_BYTES


def long_string_bytes(info: PVInfo) -> int:
    """Elements of a string PV's long-string form ``NAME.VAL$`` (DBR_CHAR): its length in UTF-8 and the NUL."""
    return info.max_length * 4 + 1


def record_type(info: PVInfo) -> str:
    """The EPICS record type a PV most resembles (``RTYP``, DBR_CLASS_NAME)."""
    if info.type is PVType.FLOAT64_ARRAY:
        return "waveform"
    if info.expr is not None:
        return "calc"
    out = info.writable
    if long_string(info):
        return ("lsi", "lso")[out]
    return {
        PVType.FLOAT64: ("ai", "ao"),
        PVType.INT: ("longin", "longout"),
        PVType.BOOL: ("bi", "bo"),
        PVType.ENUM: ("mbbi", "mbbo"),
        PVType.STRING: ("stringin", "stringout"),
    }[info.type][out]


def states_of(info: PVInfo) -> tuple[str, ...]:
    """Enum state strings of an enum or bool PV, as served."""
    states = BOOL_STATES if info.type is PVType.BOOL else info.states
    return tuple(clip_utf8(s, MAX_ENUM_STRING_BYTES) for s in states)


def numeric_metadata(info: PVInfo, convert: Any = float) -> dict[str, Any]:
    """DBR_GR/CTRL fields of a numeric PV: units, display, control and alarm limits."""
    nan = float("nan")
    alarm = info.alarm
    display = info.display or (0.0, 0.0)
    control = info.control_limits or (0.0, 0.0)
    md = {
        "units": clip_utf8(info.unit, MAX_UNITS_BYTES),
        "lower_disp_limit": display[0],
        "upper_disp_limit": display[1],
        "lower_ctrl_limit": control[0],
        "upper_ctrl_limit": control[1],
        "lower_alarm_limit": alarm.lolo if alarm and alarm.lolo is not None else nan,
        "lower_warning_limit": alarm.low if alarm and alarm.low is not None else nan,
        "upper_warning_limit": alarm.high if alarm and alarm.high is not None else nan,
        "upper_alarm_limit": alarm.hihi if alarm and alarm.hihi is not None else nan,
    }
    for key, value in md.items():
        if key != "units":
            md[key] = convert(value)
    return md
