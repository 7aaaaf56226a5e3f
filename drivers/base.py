"""Declarative instrument drivers: a driver is a table of channels.

Theory of operation
-------------------
pymeasure declares an instrument as properties (``Instrument.control("VOLT?", "VOLT
%g", ...)``). We declare the same with plain data: a driver class holds a ``table``
mapping a channel *family* to a :class:`ChannelSpec` made by :func:`control`
(read/write) or :func:`measurement` (read-only)::

    table = {
        "temperature": measurement("KRDG? {input}", choices=("A", "B"), unit="K"),
        "setpoint": control("SETP? {output}", "SETP {output},{value:g}", limits=(0, 300),
                            choices=("1", "2"), unit="K"),
    }

A template field other than ``value`` is the family's *parameter*; its allowed values
(``choices``) become channel-name suffixes, so this table serves ``temperature:A``,
``temperature:B``, ``setpoint:1`` and ``setpoint:2``. A table key that already carries a
suffix (``heater_range:0``) is one channel with fixed commands, for the odd channel
whose limits differ from its siblings'.

:class:`VisaDriver` implements :class:`labctl.ioc.driver.Driver` over a
:class:`~labctl.drivers.transport.Transport`:

* ``read(channels)`` takes the transport lock once and sends each distinct query once:
  channels that share a query (Keithley's ``:READ?`` fills ``voltage`` and ``current``)
  are parsed from one reply. A driver may join more by overriding
  :meth:`VisaDriver._read_locked` (the TPG asks ``PRX`` for both gauges).
* ``write(channel, value)`` checks the value (kind, allowed values, limits), sends the
  command, runs the driver's error check and reads the value back, all under one lock
  acquisition so no other task's I/O slips in between.
* A reply that does not parse raises :class:`~labctl.ioc.errors.DriverFault` naming the
  channel, the command and the reply. A value the instrument cannot take raises
  :class:`~labctl.ioc.errors.OutOfRange` or :class:`~labctl.ioc.errors.WrongType` (the ``pv`` field
  holds ``<instrument>.<channel>``; the database knows which PV was written).

Values are the Python types of PVs: float, int (enum indices too), bool, str, and
tuples of floats.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from labctl.drivers.transport import Transport
from labctl.drivers.values import KIND_OF_PARSER, KINDS, PARSERS, coerce, is_finite, parse_int
from labctl.ioc.config.instruments import InstrumentConfig
from labctl.ioc.driver import PushCallback
from labctl.ioc.errors import ConfigError, DriverFault, NotWritable, OutOfRange, WrongType
from labctl.ioc.types import PVType

#: A problem found in an instrument's configuration: (key path inside the instrument, message).
Problem = tuple[tuple[str | int, ...], str]

#: The channel kinds each PV type can bind to.
KINDS_FOR_PV_TYPE: dict[PVType, tuple[type, ...]] = {
    PVType.FLOAT64: (float,),
    PVType.INT: (int,),
    PVType.ENUM: (int,),
    PVType.BOOL: (bool,),
    PVType.STRING: (str,),
    PVType.FLOAT64_ARRAY: (tuple,),
}

_FORMATTER = string.Formatter()

#: An error queue is read at most this many times after one write.
MAX_QUEUED_ERRORS = 16


def template_fields(template: str) -> list[str]:
    """The replacement-field names of a ``str.format`` template, in order.

    Raises:
        ValueError: the template is malformed, or a field uses attribute or index
            access (``{value.real}``, ``{0}``), which we never allow.
    """
    names = []
    for _literal, name, _spec, _conversion in _FORMATTER.parse(template):
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"template {template!r}: field {{{name}}} must be a plain name")
        names.append(name)
    return names


@dataclass(frozen=True)
class ChannelSpec:
    """How one channel family is read and written.

    Build it with :func:`control` or :func:`measurement` rather than directly.
    """

    get: str | None
    """Query template (None: write-only)."""
    set: str | None
    """Command template with ``{value}`` (None: read-only)."""
    kind: type
    """The Python type of the value: float, int, bool, str or tuple."""
    parse: Callable[[str], Any]
    """Reply text -> value; raises ValueError for a reply that does not fit."""
    encode: Callable[[Any], Any] | None = None
    """Value -> what goes into ``{value}`` (default: the value, bools as 0/1)."""
    limits: tuple[float, float] | None = None
    """Inclusive range the instrument accepts for writes."""
    values: tuple[Any, ...] | None = None
    """The discrete values the instrument accepts for writes (enum indices...)."""
    choices: tuple[str, ...] = ()
    """Allowed values of the template parameter (the channel-name suffixes)."""
    param: str | None = None
    """Name of the template parameter, if any."""
    unit: str = ""
    """Unit of the value, for documentation and the site-file checker."""
    doc: str = ""
    """What the channel is."""
    readback: bool = True
    """Whether ``write`` reads the value back (when there is a ``get``)."""

    @property
    def writable(self) -> bool:
        """Whether the channel can be written."""
        return self.set is not None

    @property
    def readable(self) -> bool:
        """Whether the channel can be read."""
        return self.get is not None


def _default_encode(value: Any) -> Any:
    # SCPI wants 1/0 for booleans; str.format would write "True".
    return int(value) if isinstance(value, bool) else value


def _spec(
    get: str | None,
    set_: str | None,
    *,
    kind: type | None,
    parse: Callable[[str], Any] | None,
    enum: Sequence[str] | None,
    limits: tuple[float, float] | None,
    values: Sequence[Any] | None,
    choices: Sequence[str],
    unit: str,
    doc: str,
    readback: bool,
) -> ChannelSpec:
    encode: Callable[[Any], Any] | None = None
    if enum is not None:
        tokens = tuple(enum)
        if kind not in (None, int) or parse is not None or values is not None:
            raise ValueError("an enum channel is an int index: give no kind, parse or values with 'enum'")
        kind, values = int, tuple(range(len(tokens)))
        upper = tuple(t.upper() for t in tokens)

        def parse(reply: str) -> int:
            try:
                return upper.index(reply.strip().upper())
            except ValueError:
                raise ValueError(f"expected one of {', '.join(tokens)}") from None

        def encode(index: int) -> str:
            return tokens[index]

    if kind is None:
        kind = KIND_OF_PARSER.get(parse, float) if parse is not None else float
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if parse is None:
        parse = PARSERS[kind]
    params: set[str] = set()
    for template, is_set in ((get, False), (set_, True)):
        if template is None:
            continue
        names = template_fields(template)
        if is_set and "value" not in names:
            raise ValueError(f"set template {template!r} has no {{value}} field")
        params.update(n for n in names if n != "value")
    if len(params) > 1:
        raise ValueError(f"a channel takes at most one parameter, got {sorted(params)}")
    param = params.pop() if params else None
    if param is not None and not choices:
        raise ValueError(f"parameter {{{param}}} needs its 'choices'")
    if param is None and choices:
        raise ValueError("'choices' given but the templates have no parameter field")
    if limits is not None and not limits[0] <= limits[1]:
        raise ValueError(f"limits must be (low, high), got {limits!r}")
    return ChannelSpec(
        get=get,
        set=set_,
        kind=kind,
        parse=parse,
        encode=encode,
        limits=tuple(limits) if limits is not None else None,  # type: ignore[arg-type]
        values=tuple(values) if values is not None else None,
        choices=tuple(str(c) for c in choices),
        param=param,
        unit=unit,
        doc=doc,
        readback=readback,
    )


def control(
    get: str | None,
    set: str,
    *,
    kind: type | None = None,
    parse: Callable[[str], Any] | None = None,
    enum: Sequence[str] | None = None,
    limits: tuple[float, float] | None = None,
    values: Sequence[Any] | None = None,
    choices: Sequence[str] = (),
    unit: str = "",
    doc: str = "",
    readback: bool = True,
) -> ChannelSpec:
    """A channel that is written (and usually read back), like pymeasure's ``control``.

    Args:
        get: Query template, e.g. ``"SETP? {loop}"`` (None for write-only).
        set: Command template, e.g. ``"SETP {loop},{value:g}"``.
        kind: Python type of the value (inferred from ``parse``; default float).
        parse: Reply -> value (default: the kind's parser from :mod:`labctl.drivers.values`).
        enum: Reply tokens of an enumerated setting, index 0 first; the channel's
            value is the index (``enum=("VOLT", "CURR")``).
        limits: Inclusive (low, high) the instrument accepts.
        values: The discrete values the instrument accepts.
        choices: Allowed values of the template parameter.
        unit: Unit of the value.
        doc: What the channel is.
        readback: Read the value back after writing it.
    """
    return _spec(
        get, set, kind=kind, parse=parse, enum=enum, limits=limits, values=values,
        choices=choices, unit=unit, doc=doc, readback=readback,
    )  # fmt: skip


def measurement(
    get: str,
    *,
    kind: type | None = None,
    parse: Callable[[str], Any] | None = None,
    enum: Sequence[str] | None = None,
    choices: Sequence[str] = (),
    unit: str = "",
    doc: str = "",
) -> ChannelSpec:
    """A read-only channel, like pymeasure's ``measurement``.

    Args:
        get: Query template, e.g. ``"KRDG? {input}"``.
        kind: Python type of the value (inferred from ``parse``; default float).
        parse: Reply -> value.
        enum: Reply tokens of an enumerated reading (the value is the index).
        choices: Allowed values of the template parameter.
        unit: Unit of the value.
        doc: What the channel is.
    """
    return _spec(
        get, None, kind=kind, parse=parse, enum=enum, limits=None, values=None,
        choices=choices, unit=unit, doc=doc, readback=False,
    )  # fmt: skip


@dataclass(frozen=True)
class BoundChannel:
    """One concrete channel: a spec with its parameter filled in."""

    name: str
    """The channel name (``setpoint:1``)."""
    spec: ChannelSpec
    """Its family's spec."""
    get: str | None
    """The rendered query."""
    args: Mapping[str, str] = field(default_factory=dict)
    """The parameter value(s) for the set template."""

    def command(self, value: Any) -> str:
        """The rendered set command for an accepted ``value``."""
        assert self.spec.set is not None
        encode = self.spec.encode or _default_encode
        return self.spec.set.format(value=encode(value), **self.args)


def bind_table(table: Mapping[str, ChannelSpec]) -> dict[str, BoundChannel]:
    """Expand a driver table into its concrete channels, by name.

    Raises:
        ValueError: two entries produce the same channel name.
    """
    out: dict[str, BoundChannel] = {}
    for family, spec in table.items():
        if spec.param is None:
            bound = [BoundChannel(family, spec, spec.get)]
        else:
            bound = []
            for choice in spec.choices:
                args = {spec.param: choice}
                get = spec.get.format(**args) if spec.get is not None else None
                bound.append(BoundChannel(f"{family}:{choice}", spec, get, args))
        for channel in bound:
            if channel.name in out:
                raise ValueError(f"channel {channel.name!r} is declared twice")
            out[channel.name] = channel
    return out


class VisaDriver:
    """A driver built from a channel table, speaking through a Transport.

    Subclasses set :attr:`model` and :attr:`table` and, where the instrument needs
    it, override :meth:`_ask` (how one query is exchanged), :meth:`_read_locked`
    (joining queries), :meth:`_check_write` (the instrument's error queue) or
    :meth:`_setup` (commands sent once after connecting).

    Args:
        name: The instrument name.
        transport: The link.
        channels: The concrete channels (default: the class table).
        options: Driver options from the site file (see :attr:`options_doc`).
    """

    model: ClassVar[str] = ""
    """The driver name in site files (``lakeshore336``)."""
    protocol: ClassVar[str] = ""
    """The command set a simulated plant must speak to host this driver (default: model)."""
    table: ClassVar[Mapping[str, ChannelSpec]] = {}
    """Channel family -> spec."""
    identity_query: ClassVar[str | None] = "*IDN?"
    """Asked on connect to check the instrument answers (None: no check)."""
    identity_contains: ClassVar[str | None] = None
    """The identity reply must contain this text, or connect fails."""
    error_query: ClassVar[str | None] = None
    """SCPI error-queue query read after every write (None: the instrument has none)."""
    write_termination: ClassVar[str] = "\r\n"
    """Appended to every command on a VISA link."""
    read_termination: ClassVar[str] = "\r\n"
    """Ends every reply on a VISA link."""
    serial_settings: ClassVar[Mapping[str, Any]] = {}
    """pyvisa attributes set when the resource is a serial port (factory defaults)."""
    options_doc: ClassVar[Mapping[str, str]] = {
        "check_identity": "bool, default true: ask the identity query on connect",
        "baud_rate": "int: serial baud rate, when it differs from the factory default",
    }
    """Accepted ``options`` keys and what they mean."""

    def __init__(
        self,
        name: str,
        transport: Transport,
        channels: Mapping[str, BoundChannel] | None = None,
        *,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.transport = transport
        self._channels = dict(channels) if channels is not None else bind_table(type(self).table)
        self.options = dict(options or {})
        self.identity: str | None = None
        """The identity reply seen on the last connect."""
        self._push: PushCallback | None = None

    # ---- configuration -------------------------------------------------------------

    @classmethod
    def bind_config(cls, inst: InstrumentConfig) -> tuple[dict[str, BoundChannel], list[Problem]]:
        """The channels this driver serves for ``inst``, and problems with its options.

        The base accepts the options in :attr:`options_doc` and serves its table; the
        generic SCPI driver builds its channels from the PVs instead.
        """
        problems: list[Problem] = []
        for key in inst.options:
            if key not in cls.options_doc:
                accepted = ", ".join(sorted(cls.options_doc)) or "none"
                problems.append((("options", key), f"unknown option for the {cls.model} driver; accepted: {accepted}"))
        if "check_identity" in inst.options and not isinstance(inst.options["check_identity"], bool):
            problems.append((("options", "check_identity"), "expected true or false"))
        if "baud_rate" in inst.options and (
            not isinstance(inst.options["baud_rate"], int) or isinstance(inst.options["baud_rate"], bool)
        ):
            problems.append((("options", "baud_rate"), "expected an integer"))
        for i, pv in enumerate(inst.pvs):
            for key in ("read", "write", "parse"):
                if getattr(pv, key) is not None:
                    problems.append(
                        (("pvs", i, key), f"PV {pv.name}: {key!r} is only for the scpi driver; {cls.model} has fixed commands")
                    )
        return bind_table(cls.table), problems

    @classmethod
    def from_config(cls, inst: InstrumentConfig, transport: Transport) -> VisaDriver:
        """Build the driver for an instrument config, on a transport of the caller's choice.

        Raises:
            ConfigError: the options or PV specs are wrong (one line per problem).
        """
        channels, problems = cls.bind_config(inst)
        if problems:
            raise ConfigError(f"instrument {inst.name!r}", [f"{'.'.join(map(str, p))}: {m}" for p, m in problems])
        return cls(inst.name, transport, channels, options=inst.options)

    @classmethod
    def terminations_for(cls, options: Mapping[str, Any]) -> tuple[str, str]:
        """The (write, read) terminations for a VISA link."""
        return cls.write_termination, cls.read_termination

    @classmethod
    def serial_for(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """The serial-port settings, with the ``baud_rate`` option applied."""
        settings = dict(cls.serial_settings)
        if "baud_rate" in options:
            settings["baud_rate"] = options["baud_rate"]
        return settings

    # ---- the Driver protocol -------------------------------------------------------

    def channels(self) -> Sequence[str]:
        """The channels this driver serves."""
        return tuple(self._channels)

    def readable(self, channel: str) -> bool:
        """Whether ``channel`` can be read (write-only channels are not scanned)."""
        return self.channel(channel).spec.readable

    def channel(self, name: str) -> BoundChannel:
        """The concrete channel ``name``.

        Raises:
            ValueError: the driver has no such channel.
        """
        try:
            return self._channels[name]
        except KeyError:
            raise ValueError(f"{self.name}: the {self.model} driver has no channel {name!r}") from None

    async def connect(self) -> None:
        """Open the link, check the instrument's identity, send setup commands.

        Raises:
            DriverFault: the link failed, or another instrument answered.
            DriverTimeout: the instrument did not answer.
        """
        await self.transport.open()
        async with self.transport.locked():
            if self.identity_query is not None and self.options.get("check_identity", True):
                await self._identify()
            await self._setup()

    async def read(self, channels: Sequence[str]) -> dict[str, Any]:
        """Read several channels under one lock acquisition.

        Raises:
            ValueError: a channel is unknown or write-only (a binding bug).
            DriverFault: the link failed or a reply did not parse.
            DriverTimeout: the instrument did not answer.
        """
        bound = [self.channel(name) for name in channels]
        for b in bound:
            if b.get is None:
                raise ValueError(f"{self.name}: channel {b.name!r} is write-only")
        async with self.transport.locked():
            return await self._read_locked(bound, {})

    async def write(self, channel: str, value: Any) -> Any:
        """Write one channel and return its read-back (None if it has none).

        Raises:
            NotWritable: the channel is read-only.
            WrongType: the value is not of the channel's kind or not an allowed value.
            OutOfRange: the value is outside the instrument's limits.
            DriverFault: the link failed, the instrument refused, or the read-back
                did not parse.
            DriverTimeout: the instrument did not answer.
        """
        b = self.channel(channel)
        if b.spec.set is None:
            raise NotWritable(f"{self.name}.{b.name}")
        value = self._accept(b, value)
        command = b.command(value)
        async with self.transport.locked():
            if b.get is not None and b.spec.readback and self.error_query is None and type(self)._ask is VisaDriver._ask:
                # The command and its read-back in one exchange with the link (one hand-over to its I/O thread).
                return self._parse(b, await self.transport.write_then_query(command, b.get))
            await self.transport.write(command)
            await self._check_write(command)
            if b.get is None or not b.spec.readback:
                return None
            return self._parse(b, await self._ask(b.get))

    async def close(self) -> None:
        """Close the link; never raises."""
        await self.transport.close()

    def bind_push(self, push: PushCallback) -> None:
        """Keep the push callback (no driver here streams; reads are polled)."""
        self._push = push

    # ---- hooks for subclasses ------------------------------------------------------

    async def _ask(self, command: str) -> str:
        """Exchange one query; the caller holds the lock."""
        return await self.transport.query(command)

    async def _identify(self) -> None:
        """Ask the identity query and check the reply; the caller holds the lock."""
        assert self.identity_query is not None
        reply = await self._ask(self.identity_query)
        expected = self.identity_contains
        if expected is not None and expected.upper() not in reply.upper():
            self.transport.mark_unsynchronized()
            raise DriverFault(
                self.name,
                f"{self.identity_query!r} answered {reply!r}: not a {self.model} (expected {expected!r} in the reply)",
            )
        if not reply.strip():
            raise DriverFault(self.name, f"{self.identity_query!r} answered nothing")
        self.identity = reply

    async def _setup(self) -> None:
        """Commands sent once after the identity check; the caller holds the lock."""

    async def _read_locked(self, bound: Sequence[BoundChannel], replies: dict[str, str]) -> dict[str, Any]:
        """Read ``bound`` channels, asking each distinct query once.

        Args:
            bound: The channels to read.
            replies: Replies already known, by query (a subclass that joined queries
                fills it); updated in place.
        """
        values: dict[str, Any] = {}
        for b in bound:
            assert b.get is not None
            if b.get not in replies:
                replies[b.get] = await self._ask(b.get)
            values[b.name] = self._parse(b, replies[b.get])
        return values

    async def _check_write(self, command: str) -> None:
        """Check the instrument accepted ``command``; the caller holds the lock.

        With an :attr:`error_query`, read the SCPI error queue until it reports
        ``0,...`` (no error) and raise DriverFault listing what it held.
        """
        query = self.error_query
        if query is None:
            return
        errors = []
        for _ in range(MAX_QUEUED_ERRORS):
            reply = await self._ask(query)
            code, _, message = reply.partition(",")
            try:
                number = parse_int(code)
            except ValueError:
                self.transport.mark_unsynchronized()
                raise DriverFault(self.name, f"{query!r} after {command!r} answered {reply!r}") from None
            if number == 0:
                break
            errors.append(f"{number} {message.strip()}")
        if errors:
            raise DriverFault(self.name, f"{command!r} was refused: {'; '.join(errors)}")

    # ---- helpers -------------------------------------------------------------------

    def _parse(self, b: BoundChannel, reply: str) -> Any:
        try:
            return b.spec.parse(reply)
        except (ValueError, IndexError) as e:
            # The reply may belong to an earlier query (a late answer after a timeout).
            self.transport.mark_unsynchronized()
            raise DriverFault(self.name, f"cannot read {b.name}: {b.get!r} answered {reply!r} ({e})") from None

    def _accept(self, b: BoundChannel, value: Any) -> Any:
        spec = b.spec
        where = f"{self.name}.{b.name}"
        try:
            value = coerce(value, spec.kind)
        except TypeError as e:
            raise WrongType(where, str(e), value) from None
        if spec.values is not None and value not in spec.values:
            allowed = ", ".join(map(repr, spec.values))
            raise WrongType(where, f"{value!r} is not one of the values the instrument takes ({allowed})", value)
        if spec.limits is not None:
            low, high = spec.limits
            if not is_finite(value) or not low <= value <= high:
                raise OutOfRange(where, value, low, high)
        return value

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} via {self.transport!r}>"
