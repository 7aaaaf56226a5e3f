"""Keithley 2400-series SourceMeter (``driver: keithley2400``).

Theory of operation: the 2400 speaks SCPI. On connect the driver clears the status
and error queue (``*CLS``) and sets ``:FORM:ELEM VOLT,CURR``, so that one ``:READ?``
answers ``<volts>,<amps>``: a batched read of ``voltage`` and ``current`` is one
exchange. ``:READ?`` triggers a measurement, and with the output off it would switch
the output *on* -- so the driver first asks ``:OUTP?`` and, while the output is off,
returns :func:`~labctl.drivers.values.disabled` for the measured channels without
triggering anything: their PVs read INVALID/DISABLE (OPC UA ``BadOutOfService``) with
their last measured value, as a disabled EPICS record does, never a NaN that looks like
a measurement. Reading never changes the source.

SCPI instruments do not answer a command; they queue errors. After every write the
driver reads ``:SYST:ERR?`` until it says ``0,"No error"`` and raises DriverFault with
the queued messages if there were any (then reads the value back).

Channels (names as pymeasure's guide names them):

=======================  =====  ====  ===========================================================
channel                  type   unit  commands
=======================  =====  ====  ===========================================================
``voltage``              float  V     measured, first field of ``:READ?`` (disabled while output off)
``current``              float  A     measured, second field of ``:READ?`` (disabled while output off)
``voltage_setpoint``     float  V     ``:SOUR:VOLT:LEV?`` / ``:SOUR:VOLT:LEV <v>``, -210..210
``current_setpoint``     float  A     ``:SOUR:CURR:LEV?`` / ``:SOUR:CURR:LEV <v>``, -1.05..1.05
``compliance_current``   float  A     ``:SENS:CURR:PROT?`` / ``:SENS:CURR:PROT <v>``, 0..1.05
``compliance_voltage``   float  V     ``:SENS:VOLT:PROT?`` / ``:SENS:VOLT:PROT <v>``, 0..210
``source_mode``          int    enum  ``:SOUR:FUNC?`` / ``:SOUR:FUNC VOLT|CURR``: 0 voltage, 1 current
``output_enabled``       bool         ``:OUTP?`` / ``:OUTP 1|0``
=======================  =====  ====  ===========================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from labctl.drivers.base import BoundChannel, VisaDriver, control, measurement
from labctl.drivers.values import csv_field, disabled, parse_bool
from labctl.ioc.errors import DriverFault

#: The query that triggers and returns a measurement.
READ = ":READ?"
#: The output state query.
OUTPUT_QUERY = ":OUTP?"
#: What the measured channels read while the output is off.
OUTPUT_OFF = disabled("output off")


class Keithley2400(VisaDriver):
    """Keithley 2400 SourceMeter."""

    model = "keithley2400"
    identity_contains = "MODEL 24"
    error_query = ":SYST:ERR?"
    write_termination = "\n"
    read_termination = "\n"
    table = {
        "voltage": measurement(READ, parse=csv_field(0), unit="V", doc="measured voltage"),
        "current": measurement(READ, parse=csv_field(1), unit="A", doc="measured current"),
        "voltage_setpoint": control(
            ":SOUR:VOLT:LEV?", ":SOUR:VOLT:LEV {value:g}", limits=(-210.0, 210.0), unit="V",
            doc="source voltage level",
        ),  # fmt: skip
        "current_setpoint": control(
            ":SOUR:CURR:LEV?", ":SOUR:CURR:LEV {value:g}", limits=(-1.05, 1.05), unit="A",
            doc="source current level",
        ),  # fmt: skip
        "compliance_current": control(
            ":SENS:CURR:PROT?", ":SENS:CURR:PROT {value:g}", limits=(0.0, 1.05), unit="A",
            doc="current compliance (when sourcing voltage)",
        ),  # fmt: skip
        "compliance_voltage": control(
            ":SENS:VOLT:PROT?", ":SENS:VOLT:PROT {value:g}", limits=(0.0, 210.0), unit="V",
            doc="voltage compliance (when sourcing current)",
        ),  # fmt: skip
        "source_mode": control(":SOUR:FUNC?", ":SOUR:FUNC {value}", enum=("VOLT", "CURR"), doc="0 voltage, 1 current"),
        "output_enabled": control(OUTPUT_QUERY, ":OUTP {value:d}", kind=bool, doc="source output on"),
    }

    async def _setup(self) -> None:
        # Start from an empty error queue (errors left from before are not ours), and
        # make one :READ? answer exactly "<volts>,<amps>".
        await self.transport.write("*CLS")
        await self.transport.write(":FORM:ELEM VOLT,CURR")
        await self._check_write(":FORM:ELEM VOLT,CURR")

    async def _read_locked(self, bound: Sequence[BoundChannel], replies: dict[str, str]) -> dict[str, Any]:
        measured = [b for b in bound if b.get == READ]
        if not measured:
            return await super()._read_locked(bound, replies)
        replies[OUTPUT_QUERY] = reply = await self._ask(OUTPUT_QUERY)
        try:
            enabled = parse_bool(reply)
        except ValueError as e:
            self.transport.mark_unsynchronized()
            raise DriverFault(self.name, f"{OUTPUT_QUERY!r} answered {reply!r} ({e})") from None
        if enabled:
            return await super()._read_locked(bound, replies)
        # Output off: a :READ? would turn it on, so there is no measurement to report.
        values = await super()._read_locked([b for b in bound if b.get != READ], replies)
        values.update({b.name: OUTPUT_OFF for b in measured})
        return values
