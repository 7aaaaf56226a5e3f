"""Values converted between a PV and the DBR types Channel Access clients use, as an EPICS IOC converts them.

Theory of operation. A Channel Access client chooses the DBR type of what it writes and
reads, whatever the PV's own type: EPICS base's ``caput`` sends text (DBR_STRING) to every
PV that is not an enum, and for an enum either a state name (DBR_STRING) or a number
(DBR_DOUBLE); ``caget -d`` asks for any type. An IOC converts in both directions (its
``dbPut``/``dbGet`` conversion tables, ``dbFastLinkConv.c`` and ``dbConvert.c`` in EPICS
base); this module makes the same conversions, pure functions of a PV's
:class:`~labctl.ioc.pv.PVInfo` and the wire data.

Puts (:func:`put_value`), by PV type:

=============  ============================================  ===================================
PV type        numbers (DBR_CHAR/SHORT/LONG/FLOAT/DOUBLE)    text (DBR_STRING)
=============  ============================================  ===================================
float64        the number                                    the number it spells
int            truncated toward zero (20.7 -> 20, as the     the integer it spells, or a decimal
               IOC's C conversion); must fit DBR_LONG        number truncated toward zero
bool, enum     the state index, truncated toward zero        a state name, or a decimal index
string         its text                                      the text
float64[]      the elements (fewer than the PV holds: the    each element the number it spells
               PV then holds that many, as a waveform's NORD)
=============  ============================================  ===================================

What cannot be converted raises :class:`~labctl.ioc.errors.WrongType` naming what was
wrong; the channel audits it and the client's put fails with ECA_PUTFAIL, as an IOC's
does. Every value that converts still goes through the core's write path, which checks
what the PV accepts (drive limits, states, length).

Where labctl differs from an IOC on purpose (the README lists these too):

* Text must be a whole number: an IOC parses a number's leading part and ignores the rest
  (``"5 V"`` writes 5, ``"1e3"`` to a longout writes 1, ``"0x10"`` writes 0); labctl refuses
  ``"5 V"``, takes ``"1e3"`` as 1000 and ``"0x10"`` as 16. Empty text, which an IOC
  writes as 0, is refused.
* A state index outside the PV's states is refused; an IOC stores it and the record
  shows an invalid state.
* Values outside the drive limits are refused (by the core), never clipped.

Reads (:func:`number_of_text`, :func:`double_text`): a float64 PV read as DBR_STRING is
its value formatted with the PV's precision, as ``cvtDoubleToString`` formats an ai
record's (``10.0000`` with precision 4); a string PV read as a number is the number its
text spells (empty text reads 0, as on an IOC); text that spells none cannot be read as a
number, which the server answers as an IOC does: the read (or monitor update) fails with
ECA_GETFAIL and the client's other requests go on (:class:`NoConversion`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from caproto import ChannelType
from labctl.ioc.errors import WrongType
from labctl.ioc.pv import PVInfo
from labctl.ioc.types import PVType

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
#: Native DBR types that carry numbers.
NUMBER_TYPES = frozenset(
    {ChannelType.CHAR, ChannelType.INT, ChannelType.LONG, ChannelType.ENUM, ChannelType.FLOAT, ChannelType.DOUBLE}
)
#: Native DBR types that carry integers (a float to them is truncated toward zero).
INTEGER_TYPES = frozenset({ChannelType.CHAR, ChannelType.INT, ChannelType.LONG, ChannelType.ENUM})

_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")
_HEX = re.compile(r"[+-]?0[xX][0-9a-fA-F]+")
_SPECIAL = {"nan": math.nan, "+nan": math.nan, "-nan": math.nan, "inf": math.inf, "+inf": math.inf,
            "-inf": -math.inf, "infinity": math.inf, "+infinity": math.inf, "-infinity": -math.inf}  # fmt: skip


class NoConversion(Exception):
    """The PV's value cannot be read as the requested DBR type (the read fails with ECA_GETFAIL)."""


def number_of_text(text: str) -> int | float | None:
    """The number ``text`` spells (an int for an integer, hexadecimal included), else None.

    Surrounding blanks are ignored; anything else around the number makes it no number.
    """
    t = text.strip()
    if _INTEGER.fullmatch(t):
        return int(t)
    if _HEX.fullmatch(t):
        return int(t, 16)
    if _DECIMAL.fullmatch(t):
        return float(t)
    return _SPECIAL.get(t.lower())


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(info: PVInfo, value: Any) -> int | float:
    """A number sent as a number or as text; WrongType if the text is none."""
    if isinstance(value, str):
        if not value.strip():
            raise WrongType(info.name, "expected a number, got empty text", value)
        number = number_of_text(value)
        if number is None:
            raise WrongType(info.name, f"expected a number, got {_describe(value)}", value)
        return number
    if isinstance(value, bytes):
        raise WrongType(info.name, "expected a number, got bytes that are not UTF-8 text", value)
    return value


def _truncated(info: PVInfo, value: Any, what: str) -> int:
    """A number as an integer, truncated toward zero as an IOC's C conversion does."""
    number = _number(info, value)
    if isinstance(number, int):
        return number
    f = float(number)
    if not math.isfinite(f):
        raise WrongType(info.name, f"{f!r} is not {what}", value)
    return math.trunc(f)


def _state(info: PVInfo, states: Sequence[str], value: Any) -> int:
    """A state index from a state name, an index as text, or a number (truncated toward zero)."""
    if isinstance(value, str):
        if value in states:
            return states.index(value)
        t = value.strip()
        if not _INTEGER.fullmatch(t):  # as an IOC: a state name or a decimal index, nothing else
            raise WrongType(
                info.name, f"{_describe(value)} is not one of the states {list(states)} (nor a state index)", value
            )
        index = int(t)
    else:
        index = _truncated(info, value, "a state index")
    if not 0 <= index < len(states):
        raise WrongType(info.name, f"state index {index} is outside 0..{len(states) - 1} {list(states)}", value)
    return index


def put_value(info: PVInfo, states: Sequence[str], values: list[Any]) -> Any:
    """What a client's put of ``values`` (decoded wire data: numbers or text) writes to PV ``info``.

    ``states`` are the state strings the PV is served with (bool: ``false``/``true``).

    Raises:
        WrongType: the values cannot be converted to the PV's type.
    """
    t = info.type
    if t is PVType.FLOAT64_ARRAY:
        return [_number(info, v) for v in values]
    if len(values) != 1:
        return values  # the core refuses anything but one value, and says so
    (value,) = values
    if t is PVType.FLOAT64:
        return _number(info, value)
    if t is PVType.INT:
        i = _truncated(info, value, "an integer")
        if not INT32_MIN <= i <= INT32_MAX:
            raise WrongType(info.name, f"{i} does not fit DBR_LONG, Channel Access's 32-bit integer", value)
        return i
    if t is PVType.BOOL:
        return bool(_state(info, states, value))
    if t is PVType.ENUM:
        return _state(info, states, value)
    if t is PVType.STRING:
        if isinstance(value, str | bytes):
            return value
        return format_number(value)
    raise AssertionError(f"unhandled PV type {t}")  # pragma: no cover - PVType is closed


def format_number(value: Any) -> str:
    """A number written to a string PV, as its text (integral floats without ``.0``)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else repr(value)
    return str(value)


# ---- reads --------------------------------------------------------------------------------

_FRACTION_MULTIPLIER = (1, 10, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000)


def double_text(value: float, precision: int) -> str:
    """``value`` as DBR_STRING text with ``precision`` decimals, exactly as EPICS's ``cvtDoubleToString``."""
    p = max(0, precision)
    if math.isnan(value) or p > 8 or value > 1e7 or value < -1e7:
        if p > 8 or value > 1e16 or value < -1e16:  # (NaN compares false, as in C)
            p = min(p, 17)
            return f"{value:{p + 7}.{p}e}"
        return f"{value:.{min(p, 3)}f}"
    sign = "-" if value < 0 else ""
    value = abs(value)
    whole = int(value)
    multiplier = _FRACTION_MULTIPLIER[p]
    fraction = (int((value - whole) * multiplier * 10) + 5) // 10  # rounded half up, as EPICS does
    if fraction >= multiplier:
        whole += 1
        fraction -= multiplier
    return f"{sign}{whole}" + (f".{fraction:0{p}d}" if p else "")


def text_as(native: ChannelType, text: str) -> int | float:
    """A string PV's text read as the number type ``native`` (empty text reads 0, as on an IOC).

    Raises:
        NoConversion: the text spells no number (or, for DBR_ENUM, no index 0..65535).
    """
    if not text.strip():
        return 0
    number = number_of_text(text)
    if number is None:
        raise NoConversion(f"{text[:40]!r} is not a number")
    if native == ChannelType.ENUM:
        if not isinstance(number, int) or not 0 <= number <= 0xFFFF:
            raise NoConversion(f"{text[:40]!r} is not an enum index")
        return number
    if native in INTEGER_TYPES:
        if not math.isfinite(number):
            raise NoConversion(f"{text[:40]!r} is not a finite number")
        low, high = _INTEGER_RANGE[native]
        i = math.trunc(number)
        if not low <= i <= high:
            raise NoConversion(f"{text[:40]!r} does not fit {native.name}")
        return i
    return float(number)


#: What each integer DBR type holds (DBR_CHAR's bytes are read signed or unsigned by clients).
_INTEGER_RANGE = {
    ChannelType.CHAR: (-128, 255),
    ChannelType.INT: (-(2**15), 2**15 - 1),
    ChannelType.LONG: (INT32_MIN, INT32_MAX),
}
