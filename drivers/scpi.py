r"""A generic SCPI driver configured entirely in the site file (``driver: scpi``).

Theory of operation: a lab adds a simple instrument without code. Each PV of the
instrument says how it is read and written, and the driver builds one channel per PV
(named by the PV's ``channel``, or by the PV name when it has none)::

    - name: PSU:VOLT
      type: float64
      writable: true
      read: ":VOLT?"                 # query (sent as written)
      write: ":VOLT {value:.3f}"     # command; {value} with an optional format spec
    - name: PSU:OUT
      type: bool
      writable: true
      read: ":OUTP?"
      write: ":OUTP {value}"
      parse: 'map:{"ON": true, "OFF": false}'

A ``write`` template has exactly one kind of field, ``{value}`` (``{value:g}``,
``{value:.3f}``...); bools are written as 1/0 and arrays as comma-separated numbers.
Templates are checked when the driver is built by formatting a sample value.

``parse`` turns the reply into the PV's type. The set is small and never evaluates
code:

=====================  =========================================================================
parse                  reply -> value
=====================  =========================================================================
(none)                 by PV type: float64 a number, int an integer, enum an integer index,
                       bool ``1/0/ON/OFF/TRUE/FALSE``, string the text, float64[] ``a,b,c``
``float`` ``int``      the whole reply as that type; it must agree with the PV type
``bool`` ``str``       (``int`` suits int and enum PVs, ``str`` string PVs...)
``regex:<pattern>``    the pattern's single capture group (first match anywhere in the reply),
                       then converted by PV type: ``regex:T=([-+.\dE]+)C``
``csv:<index>``        field ``index`` (0-based; negative counts from the end) of a
                       comma-separated reply, converted by PV type
``csv``                every field, as a float64[] value
``map:<json object>``  the reply (stripped, exact) looked up in the object; values are
                       converted to the PV type (``map:{"ON": 1, "OFF": 0}`` on a bool PV gives
                       True/False). Writes send the key of the written value, and values not
                       in the map are refused.
=====================  =========================================================================

Options (``options:`` of the instrument): ``idn`` (text the ``*IDN?`` reply must
contain), ``check`` (the connect query, default ``*IDN?``; ``null`` skips the check),
``error_query`` (e.g. ``:SYST:ERR?``, read after every write; a non-zero code makes
the write fail), ``write_termination`` and ``read_termination`` (default ``\n``),
``baud_rate``, ``check_identity``.

A bad spec or template is reported naming the PV and what was wrong; the registry
gathers these into one :class:`~labctl.ioc.errors.ConfigError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from labctl.drivers.base import BoundChannel, ChannelSpec, Problem, VisaDriver, template_fields
from labctl.drivers.transport import Transport
from labctl.drivers.values import coerce, csv_field, parse_bool, parse_float, parse_floats, parse_int, parse_str
from labctl.ioc.config.instruments import InstrumentConfig
from labctl.ioc.config.pvs import PVConfig
from labctl.ioc.types import PVType

#: How a reply (or a captured piece of it) becomes each PV type's value.
CONVERT: dict[PVType, Callable[[str], Any]] = {
    PVType.FLOAT64: parse_float,
    PVType.INT: parse_int,
    PVType.ENUM: parse_int,
    PVType.BOOL: parse_bool,
    PVType.STRING: parse_str,
    PVType.FLOAT64_ARRAY: parse_floats,
}

#: The Python type of each PV type's value.
KIND: dict[PVType, type] = {
    PVType.FLOAT64: float,
    PVType.INT: int,
    PVType.ENUM: int,
    PVType.BOOL: bool,
    PVType.STRING: str,
    PVType.FLOAT64_ARRAY: tuple,
}

#: Type-name parse specs and the PV types each suits.
TYPE_SPECS: dict[str, tuple[Callable[[str], Any], tuple[PVType, ...]]] = {
    "float": (parse_float, (PVType.FLOAT64,)),
    "int": (parse_int, (PVType.INT, PVType.ENUM)),
    "bool": (parse_bool, (PVType.BOOL,)),
    "str": (parse_str, (PVType.STRING,)),
}

_SAMPLES: dict[type, Any] = {float: 1.5, int: 1, bool: True, str: "x", tuple: (1.0, 2.0)}


class ParseSpecError(ValueError):
    """A PV's ``parse`` spec, ``write`` template or ``read`` query is not valid.

    Args:
        message: What is wrong.
        key: The PV key at fault (``parse``, ``write`` or ``read``).
    """

    def __init__(self, message: str, key: str = "parse") -> None:
        super().__init__(message)
        self.key = key


def _encode(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return value


def build_parser(spec: str | None, pv_type: PVType) -> tuple[Callable[[str], Any], dict[str, Any] | None]:
    """Compile a parse spec for a PV type.

    Args:
        spec: The spec text (None: the PV type's default).
        pv_type: The PV's type.

    Returns:
        The parser (reply -> value), and for ``map:`` specs the mapping
        reply-token -> value (used to encode writes).

    Raises:
        ParseSpecError: the spec is unknown, malformed, or does not suit the PV type.
    """
    convert = CONVERT[pv_type]
    if spec is None:
        return convert, None
    text = spec.strip()
    if text in TYPE_SPECS:
        parser, suits = TYPE_SPECS[text]
        if pv_type not in suits:
            names = ", ".join(t.value for t in suits)
            raise ParseSpecError(f"parse {text!r} gives values for {names} PVs, but the PV is {pv_type.value}")
        return parser, None
    kind, colon, arg = text.partition(":")
    if kind == "csv" and not colon:
        if pv_type is not PVType.FLOAT64_ARRAY:
            raise ParseSpecError(f"parse 'csv' (all fields) is for float64[] PVs; use 'csv:<index>' for a {pv_type.value} PV")
        return parse_floats, None
    if not colon:
        raise ParseSpecError(f"unknown parse spec {text!r}; expected float, int, bool, str, regex:..., csv[:<index>] or map:{{...}}")
    if kind == "regex":
        try:
            pattern = re.compile(arg)
        except re.error as e:
            raise ParseSpecError(f"parse regex {arg!r} does not compile: {e}") from None
        if pattern.groups != 1:
            raise ParseSpecError(f"parse regex {arg!r} must have exactly one capture group, it has {pattern.groups}")

        def by_regex(reply: str) -> Any:
            match = pattern.search(reply)
            if match is None:
                raise ValueError(f"does not match {pattern.pattern!r}")
            return convert(match.group(1))

        return by_regex, None
    if kind == "csv":
        if pv_type is PVType.FLOAT64_ARRAY:
            raise ParseSpecError("a float64[] PV takes 'csv' (all fields), not one field")
        try:
            index = int(arg)
        except ValueError:
            raise ParseSpecError(f"parse 'csv:{arg}': the index must be an integer") from None
        return csv_field(index, convert), None
    if kind == "map":
        return _map_parser(arg, pv_type)
    raise ParseSpecError(f"unknown parse spec {text!r}; expected float, int, bool, str, regex:..., csv[:<index>] or map:{{...}}")


def _map_parser(arg: str, pv_type: PVType) -> tuple[Callable[[str], Any], dict[str, Any]]:
    if pv_type is PVType.FLOAT64_ARRAY:
        raise ParseSpecError("parse 'map:' does not suit a float64[] PV")
    try:
        raw = json.loads(arg)
    except json.JSONDecodeError as e:
        raise ParseSpecError(f"parse 'map:' needs a JSON object such as {{\"ON\": 1, \"OFF\": 0}}: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise ParseSpecError("parse 'map:' needs a non-empty JSON object such as {\"ON\": 1, \"OFF\": 0}")
    kind = KIND[pv_type]
    table: dict[str, Any] = {}
    for token, value in raw.items():
        try:
            table[token.strip()] = coerce(value, kind)
        except TypeError as e:
            raise ParseSpecError(f"parse 'map:' value for {token!r} does not suit a {pv_type.value} PV: {e}") from None
    if len(set(table.values())) != len(table):
        raise ParseSpecError("parse 'map:' maps two replies to the same value, so writes would be ambiguous")
    tokens = ", ".join(table)

    def by_map(reply: str) -> Any:
        try:
            return table[reply.strip()]
        except KeyError:
            raise ValueError(f"expected one of {tokens}") from None

    return by_map, table


def build_channel(pv: PVConfig) -> BoundChannel:
    """The channel of one PV of a generic SCPI instrument.

    Raises:
        ParseSpecError: its parse spec or write template is not valid, or it can be
            neither read nor written.
    """
    if pv.read is None and pv.write is None:
        raise ParseSpecError("needs 'read' (a query) and/or 'write' (a command with {value})", "read")
    if pv.writable and pv.write is None:
        raise ParseSpecError("is writable but has no 'write' command", "write")
    if pv.parse is not None and pv.read is None:
        raise ParseSpecError("has 'parse' but no 'read' query", "read")
    parser, table = build_parser(pv.parse, pv.type)
    kind = KIND[pv.type]
    encode: Callable[[Any], Any] = _encode
    values = None
    if table is not None:
        reverse = {value: token for token, value in table.items()}
        values = tuple(reverse)

        def encode(value: Any) -> Any:
            return reverse[value]

    if pv.write is not None:
        try:
            names = template_fields(pv.write)
        except ValueError as e:
            raise ParseSpecError(f"write {pv.write!r}: {e}", "write") from None
        if set(names) != {"value"}:
            raise ParseSpecError(f"write {pv.write!r} must use {{value}} and no other field", "write")
        sample = values[0] if values else _SAMPLES[kind]
        try:
            pv.write.format(value=encode(sample))
        except (ValueError, TypeError, KeyError) as e:
            raise ParseSpecError(f"write {pv.write!r} cannot format a {pv.type.value} value: {e}", "write") from None
    spec = ChannelSpec(
        get=pv.read,
        set=pv.write,
        kind=kind,
        parse=parser,
        encode=encode,
        values=values,
        unit=pv.unit,
        doc=pv.description,
        readback=True,
    )
    return BoundChannel(pv.channel or pv.name, spec, pv.read)


class ScpiDriver(VisaDriver):
    """Generic SCPI instrument whose channels come from its PVs' read/write/parse."""

    model = "scpi"
    write_termination = "\n"
    read_termination = "\n"
    options_doc: ClassVar[Mapping[str, str]] = {
        **VisaDriver.options_doc,
        "idn": "text the *IDN? reply must contain",
        "check": "the connect query (default *IDN?); null skips the check",
        "error_query": "SCPI error query read after every write, e.g. :SYST:ERR?",
        "write_termination": "appended to every command (default \\n)",
        "read_termination": "ends every reply (default \\n)",
    }

    def __init__(
        self,
        name: str,
        transport: Transport,
        channels: Mapping[str, BoundChannel] | None = None,
        *,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(name, transport, channels or {}, options=options)
        opts = self.options
        self.identity_query = opts.get("check", "*IDN?")
        self.identity_contains = opts.get("idn")
        self.error_query = opts.get("error_query")

    @classmethod
    def bind_config(cls, inst: InstrumentConfig) -> tuple[dict[str, BoundChannel], list[Problem]]:
        """One channel per PV, and every problem with the PVs' specs and the options."""
        problems: list[Problem] = []
        for key, value in inst.options.items():
            if key not in cls.options_doc:
                problems.append((("options", key), f"unknown option for the scpi driver; accepted: {', '.join(sorted(cls.options_doc))}"))
            elif key in ("idn", "error_query", "write_termination", "read_termination") and not isinstance(value, str):
                problems.append((("options", key), f"expected a string, got {value!r}"))
            elif key == "check" and not (value is None or isinstance(value, str)):
                problems.append((("options", key), f"expected a query string or null, got {value!r}"))
            elif key == "check_identity" and not isinstance(value, bool):
                problems.append((("options", key), "expected true or false"))
            elif key == "baud_rate" and (not isinstance(value, int) or isinstance(value, bool)):
                problems.append((("options", key), "expected an integer"))
        channels: dict[str, BoundChannel] = {}
        declared_by: dict[str, str] = {}
        for i, pv in enumerate(inst.pvs):
            try:
                channel = build_channel(pv)
            except ParseSpecError as e:
                problems.append((("pvs", i, e.key), f"PV {pv.name}: {e}"))
                continue
            previous = channels.get(channel.name)
            if previous is not None and (previous.get, previous.spec.set) != (channel.get, channel.spec.set):
                problems.append(
                    (("pvs", i, "channel"), f"PV {pv.name}: channel {channel.name!r} is also PV {declared_by[channel.name]}'s, with other commands")
                )
                continue
            channels.setdefault(channel.name, channel)
            declared_by.setdefault(channel.name, pv.name)
        return channels, problems

    @classmethod
    def terminations_for(cls, options: Mapping[str, Any]) -> tuple[str, str]:
        """The terminations, from the options when given."""
        return options.get("write_termination", cls.write_termination), options.get("read_termination", cls.read_termination)
