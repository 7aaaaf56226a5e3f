"""Values on the Channel Access wire: text encoding and clipping, put data decoded to Python.

Theory of operation. EPICS defines no text encoding; labctl sends and reads UTF-8
(:data:`ENCODING`), which is what current EPICS tools assume and the same as ASCII for
ASCII. Fixed-size DBR fields are cut at a byte limit without splitting a character:
:func:`clip_utf8` for text (units, enum states) and :func:`clip_strings` for DBR_STRING
values read from a channel (39 bytes and the NUL).

A client's put arrives as caproto's decoded wire data of one of :data:`VALUE_TYPES`;
:func:`wire_values` turns it into plain Python numbers or strings (DBR_CHAR arrays as
text when written to a string PV). What that becomes for the PV is decided by
:mod:`labctl.server.ca.convert`, as an IOC converts it. Bytes that are no UTF-8 are passed
on as bytes and refused there or by the core, so every attempt reaches the audit trail.
"""

from __future__ import annotations

from typing import Any

from caproto import ChannelType
from caproto._dbr import DbrStringArray, _LongStringChannelType, native_type

#: Text encoding of strings on the wire (units, enum states, string PVs). EPICS defines
#: none; UTF-8 is what current EPICS tools assume, and ASCII is the same in both.
ENCODING = "utf-8"
#: DBR_STRING holds 40 bytes including the terminating NUL.
MAX_STRING_BYTES = 39


def clip_utf8(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes without splitting a character."""
    data = text.encode(ENCODING)
    if len(data) <= limit:
        return text
    return data[:limit].decode(ENCODING, errors="ignore")


def clip_strings(data_type: ChannelType, metadata: Any, values: Any) -> tuple[Any, Any]:
    """DBR_STRING values cut to 39 bytes: room for the NUL, no UTF-8 character cut in two."""
    if data_type not in _LongStringChannelType and native_type(data_type) == ChannelType.STRING:
        values = DbrStringArray(_clip_bytes(v, MAX_STRING_BYTES) for v in values)
    return metadata, values


#: Native DBR types a client may put as a value (the rest: alarm acknowledgements).
VALUE_TYPES = {
    ChannelType.STRING,
    ChannelType.INT,
    ChannelType.FLOAT,
    ChannelType.ENUM,
    ChannelType.CHAR,
    ChannelType.LONG,
    ChannelType.DOUBLE,
}


def _clip_bytes(data: bytes, limit: int) -> bytes:
    if len(data) <= limit:
        return data
    return data[:limit].decode(ENCODING, errors="ignore").encode(ENCODING)


def wire_values(data: Any, native: ChannelType, as_text: bool) -> list[Any]:
    """Decoded wire data as a list of Python numbers or strings (DBR_CHAR as text if ``as_text``)."""
    if native == ChannelType.STRING:
        return [_text(v) for v in data]
    if native == ChannelType.CHAR and as_text:
        raw = bytes(data.tobytes() if hasattr(data, "tobytes") else bytes(data))
        return [_text(raw.split(b"\x00", 1)[0])]
    if hasattr(data, "tolist"):
        return list(data.tolist())
    return list(data)


def _text(value: Any) -> Any:
    """Bytes from the wire as text; undecodable bytes are passed on (the core refuses them)."""
    if isinstance(value, bytes):
        try:
            return value.decode(ENCODING)
        except UnicodeDecodeError:
            return value
    return value


def plain_value(data: Any) -> Any:
    """Wire data as plain Python (a list for an array), for an audit record."""
    return data.tolist() if hasattr(data, "tolist") else data
