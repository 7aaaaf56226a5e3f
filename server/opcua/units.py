"""Engineering units of PVs as OPC UA ``EUInformation``.

OPC UA identifies units by their UN/CEFACT (UNECE Recommendation 20) *common code*,
packed into an Int32 ``UnitId`` (Part 8, 5.6.3: each character of the code, up to
four, shifted in from the right). A PV's ``unit`` is the symbol people write in the
site file (``K``, ``mbar``, ``V``); :func:`eu_information` looks it up in
:data:`UNECE_CODES` and returns the EUInformation a SCADA client can interpret. A
symbol not in the table keeps its text as the display name with ``UnitId`` -1, which
Part 8 defines as "no unit id available".
"""

from __future__ import annotations

from asyncua import ua

#: The namespace of UNECE unit ids (OPC UA Part 8, EUInformation.NamespaceUri).
UNECE_NAMESPACE = "http://www.opcfoundation.org/UA/units/un/cefact"

#: Unit symbol as written in site files -> (UNECE common code, description).
UNECE_CODES: dict[str, tuple[str, str]] = {
    # temperature
    "K": ("KEL", "kelvin"),
    "degC": ("CEL", "degree Celsius"),
    "°C": ("CEL", "degree Celsius"),
    # pressure
    "Pa": ("PAL", "pascal"),
    "kPa": ("KPA", "kilopascal"),
    "MPa": ("MPA", "megapascal"),
    "hPa": ("A97", "hectopascal"),
    "mPa": ("74", "millipascal"),
    "bar": ("BAR", "bar"),
    "mbar": ("MBR", "millibar"),
    "Torr": ("UA", "torr"),
    "torr": ("UA", "torr"),
    # electricity
    "V": ("VLT", "volt"),
    "kV": ("KVT", "kilovolt"),
    "mV": ("2Z", "millivolt"),
    "uV": ("D82", "microvolt"),
    "µV": ("D82", "microvolt"),
    "A": ("AMP", "ampere"),
    "mA": ("4K", "milliampere"),
    "uA": ("B84", "microampere"),
    "µA": ("B84", "microampere"),
    "nA": ("C39", "nanoampere"),
    "pA": ("C70", "picoampere"),
    "W": ("WTT", "watt"),
    "kW": ("KWT", "kilowatt"),
    "mW": ("C31", "milliwatt"),
    "uW": ("D80", "microwatt"),
    "µW": ("D80", "microwatt"),
    "nW": ("C49", "nanowatt"),
    "Ohm": ("OHM", "ohm"),
    "ohm": ("OHM", "ohm"),
    "Ω": ("OHM", "ohm"),
    "kOhm": ("B49", "kiloohm"),
    "kΩ": ("B49", "kiloohm"),
    "MOhm": ("B75", "megaohm"),
    "MΩ": ("B75", "megaohm"),
    "mOhm": ("E45", "milliohm"),
    "mΩ": ("E45", "milliohm"),
    "F": ("FAR", "farad"),
    "nF": ("C41", "nanofarad"),
    "pF": ("4T", "picofarad"),
    "H": ("81", "henry"),
    "mH": ("C14", "millihenry"),
    "S": ("SIE", "siemens"),
    # magnetism
    "T": ("D33", "tesla"),
    "mT": ("C29", "millitesla"),
    "uT": ("D81", "microtesla"),
    "µT": ("D81", "microtesla"),
    "nT": ("C48", "nanotesla"),
    "Wb": ("WEB", "weber"),
    # time and frequency
    "s": ("SEC", "second"),
    "ms": ("C26", "millisecond"),
    "us": ("B98", "microsecond"),
    "µs": ("B98", "microsecond"),
    "ns": ("C47", "nanosecond"),
    "min": ("MIN", "minute"),
    "h": ("HUR", "hour"),
    "Hz": ("HTZ", "hertz"),
    "kHz": ("KHZ", "kilohertz"),
    "MHz": ("MHZ", "megahertz"),
    "GHz": ("A86", "gigahertz"),
    # length, volume, mass, energy, ratio
    "m": ("MTR", "metre"),
    "mm": ("MMT", "millimetre"),
    "cm": ("CMT", "centimetre"),
    "um": ("4H", "micrometre"),
    "µm": ("4H", "micrometre"),
    "nm": ("C45", "nanometre"),
    "l": ("LTR", "litre"),
    "L": ("LTR", "litre"),
    "ml": ("MLT", "millilitre"),
    "g": ("GRM", "gram"),
    "kg": ("KGM", "kilogram"),
    "J": ("JOU", "joule"),
    "eV": ("A53", "electron volt"),
    "rad": ("C81", "radian"),
    "deg": ("DD", "degree [unit of angle]"),
    "°": ("DD", "degree [unit of angle]"),
    "%": ("P1", "percent"),
}
# A bare "C" is left out on purpose: coulomb or degree Celsius? Write degC or °C.


def unit_id(common_code: str) -> int:
    """The Int32 ``UnitId`` of a UNECE common code (OPC UA Part 8, 5.6.3)."""
    value = 0
    for ch in common_code[:4]:
        value = (value << 8) | ord(ch)
    return value


def eu_information(unit: str) -> ua.EUInformation:
    """The EUInformation of a unit symbol (UnitId -1 when the symbol has no known UNECE code)."""
    code = UNECE_CODES.get(unit)
    info = ua.EUInformation()
    info.NamespaceUri = UNECE_NAMESPACE
    info.DisplayName = ua.LocalizedText(unit)
    if code is None:
        info.UnitId = -1
        info.Description = ua.LocalizedText(unit)
    else:
        info.UnitId = unit_id(code[0])
        info.Description = ua.LocalizedText(code[1])
    return info
