"""Reply text to Python values, and Python values to command arguments.

Theory of operation: instruments answer in text (``+1.2345E-03``, ``ON``, ``0,1.0E-3``).
Every driver turns that text into the Python type of the PV it feeds -- ``float``,
``int`` (also enum indices), ``bool``, ``str``, or a ``tuple`` of floats for arrays --
with the small parsers here. They accept what instruments really send (leading ``+``,
padding, ``ON``/``OFF``) and nothing looser: a reply that does not fit raises
``ValueError`` with a short reason, which the driver turns into a
:class:`~labctl.ioc.errors.DriverFault` naming the command and the reply.

The other direction, :func:`coerce`, checks a value written by a client against the
channel's kind before anything is sent. It refuses silently lossy conversions
(``2.5`` to an int, ``2`` to a bool, a bool to a float).

A channel the instrument cannot measure now (a source-meter's measured voltage while its
output is off, a gauge switched off) reads as :class:`NoReading` -- :func:`disabled` for
a channel switched off -- never as a NaN standing for "nothing": the database posts it
INVALID/DISABLE and keeps the PV's last value (see :mod:`labctl.ioc.driver`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from labctl.ioc.driver import NoReading, disabled

__all__ = [
    "KINDS",
    "KIND_OF_PARSER",
    "PARSERS",
    "NoReading",
    "coerce",
    "csv_field",
    "disabled",
    "is_finite",
    "parse_bool",
    "parse_float",
    "parse_floats",
    "parse_int",
    "parse_str",
]
#: The Python types a channel can have. ``tuple`` means a tuple of floats.
KINDS: tuple[type, ...] = (float, int, bool, str, tuple)

_TRUE = frozenset({"1", "ON", "TRUE", "YES"})
_FALSE = frozenset({"0", "OFF", "FALSE", "NO"})


def parse_float(reply: str) -> float:
    """A number such as ``+1.2345E-03``, `` 42``, ``nan``.

    Raises:
        ValueError: the reply is not a number.
    """
    try:
        return float(reply.strip())
    except ValueError:
        raise ValueError("expected a number") from None


def parse_int(reply: str) -> int:
    """An integer; ``+3`` and ``3.0`` (an integral float) are accepted, ``3.5`` is not.

    Raises:
        ValueError: the reply is not an integer.
    """
    text = reply.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        raise ValueError("expected an integer") from None
    if not number.is_integer():
        raise ValueError("expected an integer")
    return int(number)


def parse_bool(reply: str) -> bool:
    """``1``/``ON``/``TRUE``/``YES`` or ``0``/``OFF``/``FALSE``/``NO``, any case.

    Raises:
        ValueError: the reply is none of these.
    """
    text = reply.strip().upper()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("expected 1/0 or ON/OFF")


def parse_str(reply: str) -> str:
    """The reply without surrounding white space (and without SCPI string quotes)."""
    text = reply.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text


def parse_floats(reply: str) -> tuple[float, ...]:
    """Comma-separated numbers as a tuple; an empty reply is an empty tuple.

    Raises:
        ValueError: a field is not a number.
    """
    text = reply.strip()
    if not text:
        return ()
    try:
        return tuple(float(field) for field in text.split(","))
    except ValueError:
        raise ValueError("expected comma-separated numbers") from None


#: The default parser of each kind.
PARSERS: dict[type, Callable[[str], Any]] = {
    float: parse_float,
    int: parse_int,
    bool: parse_bool,
    str: parse_str,
    tuple: parse_floats,
}

#: The kind each built-in parser produces (used to infer a channel's kind).
KIND_OF_PARSER: dict[Callable[[str], Any], type] = {
    float: float,
    int: int,
    str: str,
    bool: bool,
    parse_float: float,
    parse_int: int,
    parse_bool: bool,
    parse_str: str,
    parse_floats: tuple,
}


def csv_field(index: int, parse: Callable[[str], Any] = parse_float) -> Callable[[str], Any]:
    """A parser taking field ``index`` (0-based, negative from the end) of a comma-separated reply.

    Args:
        index: Which field.
        parse: How to parse that field.
    """

    def field(reply: str) -> Any:
        fields = reply.split(",")
        try:
            text = fields[index]
        except IndexError:
            raise ValueError(f"expected at least {index + 1 if index >= 0 else -index} comma-separated fields") from None
        return parse(text)

    field.__name__ = f"csv_field_{index}"
    return field


def coerce(value: Any, kind: type) -> Any:
    """Check a value written to a channel of ``kind`` and return it as exactly that type.

    Args:
        value: What the client wrote.
        kind: One of :data:`KINDS`.

    Raises:
        TypeError: the value is not of the kind and does not convert without loss.
    """
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise TypeError(f"expected a bool, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise TypeError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(f"expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {value!r}")
        return value
    if kind is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise TypeError(f"expected a sequence of numbers, got {value!r}")
        return tuple(coerce(item, float) for item in value)
    raise TypeError(f"unknown channel kind {kind!r}")


def is_finite(value: Any) -> bool:
    """Whether a float (or every float of a tuple) is finite; other values are."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, tuple):
        return all(is_finite(v) for v in value)
    return True
