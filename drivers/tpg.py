r"""Pfeiffer TPG 26x / 36x dual gauge controllers (``driver: tpg``).

Theory of operation: the gauge speaks Pfeiffer's mnemonic protocol. The host sends a
mnemonic (``PR1``) with CR LF; the gauge acknowledges with ACK (``\x06``) or refuses
with NAK (``\x15``); the host then sends a bare ENQ (``\x05``, no CR LF) and the gauge
answers with the data. One "query" is therefore two exchanges, which :meth:`TPG._ask`
makes under one hold of the transport lock so nothing can come between them. Serial
settings are the factory 9600 8N1.

A pressure reply is ``<status>,<value>`` (``0,1.2340E-03``). The status code decides
what the ``pressure`` channel returns:

====  =========================  ==========================================================
code  meaning                    ``pressure:<n>`` returns
====  =========================  ==========================================================
0     measurement OK             the value
1     underrange                 the value sent (the lower limit: an upper bound on the truth)
2     overrange                  ``+inf`` (never lower than the truth, so HIGH alarms fire)
3     sensor error               no reading: INVALID/READ
4     sensor off                 no reading: INVALID/DISABLE (switched off, not broken)
5     no sensor                  no reading: INVALID/READ
6     identification error       no reading: INVALID/READ
====  =========================  ==========================================================

One failed sensor must not make the whole controller look dead, so these are not
DriverFaults: codes 3-6 read as a :class:`~labctl.drivers.values.NoReading`, which the
database posts INVALID with that status, keeping the PV's last value (never a NaN that
looks like a measurement); the ``status:<n>`` channel carries the code for display.
An unknown status code or a malformed reply is a DriverFault. When both gauges are
read in one batch the driver asks ``PRX`` once instead of ``PR1`` and ``PR2``.

Channels:

===================  =====  =====  ===============================================
channel              type   unit   commands
===================  =====  =====  ===============================================
``pressure:<1-2>``   float  gauge  ``PR<n>`` + ENQ; unit as set on the gauge
``status:<1-2>``     int    enum   ``PR<n>`` + ENQ: the status code above
``pressure_unit``    int    enum   ``UNI`` + ENQ: 0 mbar, 1 Torr, 2 Pa (36x: 3 µm, 4 hPa, 5 V)
===================  =====  =====  ===============================================

The connect check asks ``PNR`` (firmware number), which every TPG answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from labctl.drivers.base import BoundChannel, VisaDriver, measurement
from labctl.drivers.values import NoReading, parse_float, parse_int
from labctl.ioc.errors import DriverFault
from labctl.ioc.types import Status

ACK = "\x06"
NAK = "\x15"
ENQ = "\x05"

#: Status code -> meaning.
STATUS = {
    0: "measurement OK",
    1: "underrange",
    2: "overrange",
    3: "sensor error",
    4: "sensor off",
    5: "no sensor",
    6: "identification error",
}

GAUGES = ("1", "2")

#: What ``pressure:<n>`` reads for a status code that carries no measurement.
NO_READING = {
    3: NoReading(Status.READ, STATUS[3]),
    4: NoReading(Status.DISABLE, STATUS[4]),
    5: NoReading(Status.READ, STATUS[5]),
    6: NoReading(Status.READ, STATUS[6]),
}


def split_reading(reply: str) -> tuple[int, float]:
    """``"0,1.2340E-03"`` -> ``(0, 0.001234)``.

    Raises:
        ValueError: not ``<status>,<value>``, or an unknown status code.
    """
    fields = reply.split(",")
    if len(fields) != 2:
        raise ValueError("expected <status>,<value>")
    status = parse_int(fields[0])
    if status not in STATUS:
        raise ValueError(f"unknown status code {status}")
    return status, parse_float(fields[1])


def parse_pressure(reply: str) -> float | NoReading:
    """The pressure of a ``<status>,<value>`` reply, per the status table of this module."""
    status, value = split_reading(reply)
    if status in (0, 1):
        return value
    if status == 2:
        return math.inf
    return NO_READING[status]


def parse_status(reply: str) -> int:
    """The status code of a ``<status>,<value>`` reply."""
    return split_reading(reply)[0]


class TPG(VisaDriver):
    """Pfeiffer TPG 261/262/361/362 gauge controller."""

    model = "tpg"
    identity_query = "PNR"
    table = {
        "pressure": measurement("PR{gauge}", parse=parse_pressure, choices=GAUGES, doc="gauge pressure"),
        "status": measurement("PR{gauge}", kind=int, parse=parse_status, choices=GAUGES, doc="gauge status code"),
        "pressure_unit": measurement("UNI", kind=int, doc="0 mbar, 1 Torr, 2 Pa"),
    }

    async def _ask(self, command: str) -> str:
        async with self.transport.locked():
            ack = await self.transport.query(command)
            if ack == NAK:
                raise DriverFault(self.name, f"the gauge refused {command!r} (NAK)")
            if ack != ACK:
                self.transport.mark_unsynchronized()
                raise DriverFault(self.name, f"expected ACK after {command!r}, got {ack!r}")
            return await self.transport.query(ENQ, raw=True)

    async def _read_locked(self, bound: Sequence[BoundChannel], replies: dict[str, str]) -> dict[str, Any]:
        wanted = {b.get for b in bound}
        if {"PR1", "PR2"} <= wanted:
            reply = await self._ask("PRX")
            fields = reply.split(",")
            if len(fields) != 4:
                self.transport.mark_unsynchronized()
                raise DriverFault(self.name, f"'PRX' answered {reply!r}: expected <status>,<value>,<status>,<value>")
            replies["PR1"] = f"{fields[0]},{fields[1]}"
            replies["PR2"] = f"{fields[2]},{fields[3]}"
        return await super()._read_locked(bound, replies)
