"""Lake Shore temperature controllers: Model 336 and Model 372.

Theory of operation: both speak Lake Shore's plain command set -- a query is a
mnemonic with ``?`` and its argument (``KRDG? A``), a command takes comma-separated
arguments (``SETP 1,4.2``), every message ends with CR LF, and the controller sends
no reply and no error for a command it ignores. So a write is always followed by its
read-back query, which is how a refused write shows up (the read-back differs). The
drivers are tables of channels; the channel-name suffix is the input or output the
command addresses. On a serial (USB) link the factory setting is 57600 baud, 7 data
bits, odd parity, one stop bit.

Model 336 (``driver: lakeshore336``), inputs A-D, outputs 1-4:

==========================  =====  ======  =================================================
channel                     type   unit    commands
==========================  =====  ======  =================================================
``temperature:<A-D>``       float  K       ``KRDG? <in>``
``sensor:<A-D>``            float  Ω or V  ``SRDG? <in>`` (sensor units)
``setpoint:<1-4>``          float  K       ``SETP? <out>`` / ``SETP <out>,<v>``, 0-1500
``heater_range:<1-2>``      int    enum    ``RANGE? <out>`` / ``RANGE <out>,<n>``: 0 off, 1 low, 2 medium, 3 high
``heater_output:<1-2>``     float  %       ``HTR? <out>`` (read-only)
``manual_output:<1-4>``     float  %       ``MOUT? <out>`` / ``MOUT <out>,<v>``, 0-100
==========================  =====  ======  =================================================

Model 372 AC resistance bridge (``driver: lakeshore372``), control input A and
scanner channels 1-16; output 0 is the sample heater, 1 the warm-up heater, 2 the
still (analog) heater:

==========================  =====  ======  =================================================
channel                     type   unit    commands
==========================  =====  ======  =================================================
``temperature:<A,1-16>``    float  K       ``KRDG? <in>``
``resistance:<A,1-16>``     float  Ω       ``RDGR? <in>``
``setpoint:<0-1>``          float  K       ``SETP? <out>`` / ``SETP <out>,<v>``, 0-400
``heater_range:0``          int    enum    ``RANGE? 0`` / ``RANGE 0,<n>``: 0 off, 1 31.6 µA, 2 100 µA,
                                           3 316 µA, 4 1 mA, 5 3.16 mA, 6 10 mA, 7 31.6 mA, 8 100 mA
``heater_range:<1-2>``      int    enum    ``RANGE? <out>`` / ``RANGE <out>,<n>``: 0 off, 1 on
``heater_output:0``         float  %       ``HTR?`` (sample heater, read-only)
``manual_output:<0-2>``     float  %       ``MOUT? <out>`` / ``MOUT <out>,<v>``, 0-100
==========================  =====  ======  =================================================

Enum channels return the int index; give the PV ``type: enum`` with the state strings.
"""

from __future__ import annotations

from labctl.drivers.base import VisaDriver, control, measurement
from pyvisa.constants import Parity, StopBits

#: Factory serial settings of Lake Shore controllers (USB appears as a serial port).
LAKESHORE_SERIAL = {"baud_rate": 57600, "data_bits": 7, "parity": Parity.odd, "stop_bits": StopBits.one}

INPUTS_336 = ("A", "B", "C", "D")
INPUTS_372 = ("A",) + tuple(str(n) for n in range(1, 17))


class LakeShore336(VisaDriver):
    """Lake Shore Model 336 temperature controller (four inputs, four outputs)."""

    model = "lakeshore336"
    identity_contains = "MODEL336"
    serial_settings = LAKESHORE_SERIAL
    table = {
        "temperature": measurement("KRDG? {input}", choices=INPUTS_336, unit="K", doc="input reading in kelvin"),
        "sensor": measurement("SRDG? {input}", choices=INPUTS_336, unit="Ω or V", doc="input reading in sensor units"),
        "setpoint": control(
            "SETP? {output}", "SETP {output},{value:g}", limits=(0.0, 1500.0), choices=("1", "2", "3", "4"),
            unit="K", doc="control setpoint of an output's loop",
        ),  # fmt: skip
        "heater_range": control(
            "RANGE? {output}", "RANGE {output},{value:d}", kind=int, values=(0, 1, 2, 3), choices=("1", "2"),
            doc="heater range: 0 off, 1 low, 2 medium, 3 high",
        ),  # fmt: skip
        "heater_output": measurement("HTR? {output}", choices=("1", "2"), unit="%", doc="heater output, percent of range"),
        "manual_output": control(
            "MOUT? {output}", "MOUT {output},{value:g}", limits=(0.0, 100.0), choices=("1", "2", "3", "4"),
            unit="%", doc="manual (open-loop) output",
        ),  # fmt: skip
    }


class LakeShore372(VisaDriver):
    """Lake Shore Model 372 AC resistance bridge and temperature controller."""

    model = "lakeshore372"
    identity_contains = "MODEL372"
    serial_settings = LAKESHORE_SERIAL
    table = {
        "temperature": measurement("KRDG? {input}", choices=INPUTS_372, unit="K", doc="channel reading in kelvin"),
        "resistance": measurement("RDGR? {input}", choices=INPUTS_372, unit="Ω", doc="channel resistance"),
        "setpoint": control(
            "SETP? {output}", "SETP {output},{value:g}", limits=(0.0, 400.0), choices=("0", "1"),
            unit="K", doc="control setpoint: 0 sample heater, 1 warm-up heater",
        ),  # fmt: skip
        "heater_range:0": control(
            "RANGE? 0", "RANGE 0,{value:d}", kind=int, values=range(9),
            doc="sample heater range: 0 off, 1 31.6 µA ... 8 100 mA",
        ),  # fmt: skip
        "heater_range:1": control("RANGE? 1", "RANGE 1,{value:d}", kind=int, values=(0, 1), doc="warm-up heater: 0 off, 1 on"),
        "heater_range:2": control("RANGE? 2", "RANGE 2,{value:d}", kind=int, values=(0, 1), doc="still heater: 0 off, 1 on"),
        "heater_output:0": measurement("HTR?", unit="%", doc="sample heater output, percent of range"),
        "manual_output": control(
            "MOUT? {output}", "MOUT {output},{value:g}", limits=(0.0, 100.0), choices=("0", "1", "2"),
            unit="%", doc="manual (open-loop) output",
        ),  # fmt: skip
    }
