"""Network settings of the Channel Access server: the site file, then the EPICS environment.

Theory of operation. An EPICS IOC takes its network settings from ``EPICS_CAS_*``
variables, each falling back to its client-side ``EPICS_CA_*`` twin. labctl does the
same, except that a value set in the site file (``server.ca.interfaces``, ``port``,
``beacon_port``) or on the command line wins. :func:`resolve` is a pure function of the
CA section and an environment mapping, so the precedence is tested without sockets.

===========================  ==============================================================
setting                      source, first found
===========================  ==============================================================
interfaces                   ``interfaces`` | ``EPICS_CAS_INTF_ADDR_LIST`` | ``0.0.0.0``
server port (UDP and TCP)    ``port`` | ``EPICS_CAS_SERVER_PORT`` | ``EPICS_CA_SERVER_PORT``
                             | 5064
beacon port                  ``beacon_port`` | ``EPICS_CAS_BEACON_PORT`` |
                             ``EPICS_CA_REPEATER_PORT`` | 5065
beacon addresses             ``EPICS_CAS_BEACON_ADDR_LIST`` (else ``EPICS_CA_ADDR_LIST``),
                             plus, unless ``EPICS_CAS_AUTO_BEACON_ADDR_LIST`` (else
                             ``EPICS_CA_AUTO_ADDR_LIST``) is ``NO``, the broadcast addresses
                             of the interfaces served (see below); an entry may carry its
                             own ``:port``; an empty result sends no beacons
beacon period                ``EPICS_CAS_BEACON_PERIOD`` | ``EPICS_CA_BEACON_PERIOD`` | 15 s
ignored clients              ``EPICS_CAS_IGNORE_ADDR_LIST`` (their searches get no answer)
largest client message       ``limits.max_array_bytes`` | ``EPICS_CAS_MAX_ARRAY_BYTES`` |
                             ``EPICS_CA_MAX_ARRAY_BYTES`` | 16 384 + the largest PV's value
                             (the service adds that default; at least 16 384)
===========================  ==============================================================

Beacons go where an IOC's go (``rsrv``'s automatic beacon list): a server bound to the
wildcard address beacons to the broadcast address of every interface of the host that is
up and not loopback (the peer address of a point-to-point link); one bound to given
addresses beacons to the broadcast address of each one's interface, and to a loopback
address itself (a server on 127.0.0.1 beacons to 127.0.0.1, where a CA repeater on the
host listens). The host's interfaces are read once, when the settings are resolved
(:func:`host_interfaces`; on a system where they cannot be read, a wildcard server falls
back to the limited broadcast address 255.255.255.255).

caproto's own server reads only part of this (it binds ``EPICS_CA_SERVER_PORT``, not
``EPICS_CAS_SERVER_PORT``, and matches the ignore list against (host, port) pairs), which
is why :mod:`labctl.server.ca.context` takes these settings from here instead.

Subscription latency. caproto batches subscription updates per client circuit: when
updates arrive faster than one per ``CAPROTO_SERVER_HIGH_LOAD_TIMEOUT_SEC`` (10 ms) it
holds them, doubling the hold on each batch up to ``CAPROTO_SERVER_MAX_LATENCY_SEC``
(1 s by default, which puts a steady stream at a few hundred milliseconds of latency).
:func:`tune_latency` lowers that ceiling to :data:`MAX_LATENCY_S` (50 ms: still at most
20 packets per second per client under load, each up to 64 KiB, but a display follows
its instrument without visible lag) and raises caproto's "high load" warning threshold
to :data:`WARN_LATENCY_S`, so a warning means the event loop itself is late rather than
batching working as intended. Both knobs are caproto module settings, shared by every
server in the process; an operator who sets the ``CAPROTO_SERVER_*`` variables keeps
their values.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from labctl.ioc.errors import LabctlError
from labctl.server.ca.config import CAConfig

#: Ceiling of caproto's subscription batching delay (seconds), unless the environment sets one.
MAX_LATENCY_S = 0.05
#: caproto warns of high load only when a batch was held this long (seconds).
WARN_LATENCY_S = 0.25

DEFAULT_SERVER_PORT = 5064
DEFAULT_BEACON_PORT = 5065
DEFAULT_BEACON_PERIOD_S = 15.0
#: EPICS's default (and smallest) ``EPICS_CA_MAX_ARRAY_BYTES``.
MIN_ARRAY_BYTES = 16_384


class CASettingsError(LabctlError):
    """An ``EPICS_CAS_*``/``EPICS_CA_*`` variable (or the site file) holds an unusable value."""


@dataclass(frozen=True, slots=True)
class CASettings:
    """Where the Channel Access server listens and where it sends beacons."""

    interfaces: tuple[str, ...]
    """Addresses to bind (``0.0.0.0``: all)."""
    port: int
    """UDP search port and first-choice TCP port; 0 picks a free one."""
    beacon_port: int
    """Default destination port of beacons."""
    beacon_addresses: tuple[tuple[str, int], ...]
    """Where beacons go, as (address, port)."""
    beacon_period_s: float
    """Longest interval between beacons (they start fast and back off to this)."""
    ignore_hosts: frozenset[str]
    """Client addresses whose searches are not answered."""
    max_array_bytes: int | None = None
    """Largest payload a client may send (None: the service's default for its PVs)."""


@dataclass(frozen=True, slots=True)
class NetInterface:
    """One IPv4 network interface of the host that is up."""

    name: str
    address: str
    beacon_to: str | None
    """Its broadcast address, or the peer of a point-to-point link (None: neither)."""
    loopback: bool = False


def host_interfaces() -> list[NetInterface] | None:
    """The host's IPv4 interfaces that are up (their primary addresses); None where they cannot be read.

    Linux only (``SIOCGIF*`` requests on each interface): elsewhere None.
    """
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return None
    if not hasattr(socket, "if_nameindex"):
        return None
    out: list[NetInterface] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:

        def request(code: int, name: bytes) -> bytes | None:
            try:
                return fcntl.ioctl(sock.fileno(), code, struct.pack("256s", name))
            except OSError:  # no IPv4 address, or not this kind of interface
                return None

        try:
            names = [name for _, name in socket.if_nameindex()]
        except OSError:
            return None
        for name in names:
            raw = name.encode()[:15]
            flags_reply = request(_SIOCGIFFLAGS, raw)
            address_reply = request(_SIOCGIFADDR, raw)
            if flags_reply is None or address_reply is None:
                continue
            flags = struct.unpack_from("H", flags_reply, 16)[0]
            if not flags & _IFF_UP:
                continue
            beacon_to = None
            if flags & _IFF_BROADCAST:
                reply = request(_SIOCGIFBRDADDR, raw)
                beacon_to = socket.inet_ntoa(reply[20:24]) if reply else None
            elif flags & _IFF_POINTOPOINT:
                reply = request(_SIOCGIFDSTADDR, raw)
                beacon_to = socket.inet_ntoa(reply[20:24]) if reply else None
            if beacon_to == "0.0.0.0":
                beacon_to = None
            out.append(NetInterface(name, socket.inet_ntoa(address_reply[20:24]), beacon_to, bool(flags & _IFF_LOOPBACK)))
    return out


# Linux <linux/sockios.h> and <net/if.h>
_SIOCGIFFLAGS, _SIOCGIFADDR, _SIOCGIFDSTADDR, _SIOCGIFBRDADDR = 0x8913, 0x8915, 0x8917, 0x8919
_IFF_UP, _IFF_BROADCAST, _IFF_LOOPBACK, _IFF_POINTOPOINT = 0x1, 0x2, 0x8, 0x10
#: Where a wildcard server beacons when the host's interfaces cannot be read.
LIMITED_BROADCAST = "255.255.255.255"


def auto_beacon_addresses(served: tuple[str, ...], interfaces: list[NetInterface] | None) -> list[str]:
    """The beacon destinations of a server bound to ``served``, as an IOC chooses them (module docstring)."""
    out: list[str] = []
    for address in served:
        if address == "0.0.0.0":
            if interfaces is None:
                out.append(LIMITED_BROADCAST)
                continue
            out.extend(i.beacon_to for i in interfaces if not i.loopback and i.beacon_to)
        elif ipaddress.IPv4Address(address).is_loopback:
            out.append(address)
        else:
            out.extend(i.beacon_to for i in interfaces or () if i.address == address and i.beacon_to)
    return out


def _get(environ: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


def _port(text: str, name: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise CASettingsError(f"{name}={text!r}: expected a port number") from None
    if not 0 <= port <= 65535:
        raise CASettingsError(f"{name}={text!r}: a port is 0..65535")
    return port


def _env_port(environ: Mapping[str, str], names: tuple[str, ...], default: int) -> int:
    for name in names:
        text = environ.get(name, "").strip()
        if text:
            return _port(text, name)
    return default


def _address(entry: str, default_port: int, name: str) -> tuple[str, int]:
    host, sep, port = entry.rpartition(":")
    if not sep:
        host, port_number = entry, default_port
    else:
        port_number = _port(port, f"{name} entry {entry!r}")
    if not host:
        raise CASettingsError(f"{name}: empty address in {entry!r}")
    return host, port_number


def _interface(entry: str, name: str) -> str:
    host = entry.partition(":")[0]  # EPICS ignores a port given with an interface
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise CASettingsError(f"{name}: {entry!r} is not an IPv4 address") from None
    return host


def _yes(text: str | None, default: bool) -> bool:
    if text is None:
        return default
    return text.strip().upper() in ("YES", "Y", "TRUE", "1")


def resolve(
    cfg: CAConfig,
    environ: Mapping[str, str] | None = None,
    host: Callable[[], list[NetInterface] | None] = host_interfaces,
) -> CASettings:
    """The settings for ``cfg`` (the site file's ``server.ca``) in environment ``environ``.

    ``host`` lists the host's network interfaces (called only for automatic beacon addresses).

    Raises:
        CASettingsError: a variable holds something that is not an address or a port.
    """
    env = os.environ if environ is None else environ
    if cfg.interfaces:
        interfaces = tuple(dict.fromkeys(_interface(i, "server.ca.interfaces") for i in cfg.interfaces))
    else:
        listed = (_get(env, "EPICS_CAS_INTF_ADDR_LIST") or "").split()
        interfaces = tuple(dict.fromkeys(_interface(i, "EPICS_CAS_INTF_ADDR_LIST") for i in listed)) or ("0.0.0.0",)
    if "0.0.0.0" in interfaces:
        interfaces = ("0.0.0.0",)  # the wildcard already covers every other address

    port = (
        cfg.port
        if cfg.port is not None
        else _env_port(env, ("EPICS_CAS_SERVER_PORT", "EPICS_CA_SERVER_PORT"), DEFAULT_SERVER_PORT)
    )
    beacon_port = (
        cfg.beacon_port
        if cfg.beacon_port is not None
        else _env_port(env, ("EPICS_CAS_BEACON_PORT", "EPICS_CA_REPEATER_PORT"), DEFAULT_BEACON_PORT)
    )

    list_name = "EPICS_CAS_BEACON_ADDR_LIST" if _get(env, "EPICS_CAS_BEACON_ADDR_LIST") else "EPICS_CA_ADDR_LIST"
    listed = (_get(env, list_name) or "").split()
    addresses = [_address(a, beacon_port, list_name) for a in listed]
    auto = _yes(_get(env, "EPICS_CAS_AUTO_BEACON_ADDR_LIST", "EPICS_CA_AUTO_ADDR_LIST"), True)
    if auto:
        addresses.extend((a, beacon_port) for a in auto_beacon_addresses(interfaces, host()))

    period_text = _get(env, "EPICS_CAS_BEACON_PERIOD", "EPICS_CA_BEACON_PERIOD")
    try:
        period = float(period_text) if period_text is not None else DEFAULT_BEACON_PERIOD_S
    except ValueError:
        raise CASettingsError(f"EPICS_CAS_BEACON_PERIOD={period_text!r}: expected seconds") from None
    if not period > 0:
        raise CASettingsError(f"EPICS_CAS_BEACON_PERIOD={period_text!r}: must be positive")

    ignore = frozenset(a.partition(":")[0] for a in (_get(env, "EPICS_CAS_IGNORE_ADDR_LIST") or "").split())
    max_array_bytes = cfg.limits.max_array_bytes
    if max_array_bytes is None:
        text = _get(env, "EPICS_CAS_MAX_ARRAY_BYTES", "EPICS_CA_MAX_ARRAY_BYTES")
        if text is not None:
            try:
                max_array_bytes = int(text)
            except ValueError:
                raise CASettingsError(f"EPICS_CA_MAX_ARRAY_BYTES={text!r}: expected a number of bytes") from None
            if not MIN_ARRAY_BYTES <= max_array_bytes < 2**31:
                raise CASettingsError(f"EPICS_CA_MAX_ARRAY_BYTES={text!r}: must be {MIN_ARRAY_BYTES} .. 2**31-1")
    return CASettings(
        interfaces=interfaces,
        port=port,
        beacon_port=beacon_port,
        beacon_addresses=tuple(dict.fromkeys(addresses)),
        beacon_period_s=period,
        ignore_hosts=ignore,
        max_array_bytes=max_array_bytes,
    )


def tune_latency(environ: Mapping[str, str] | None = None) -> dict[str, float]:
    """Set caproto's subscription batching limits (see the module docstring); return them.

    A ``CAPROTO_SERVER_MAX_LATENCY_SEC`` or ``CAPROTO_SERVER_HIGH_LOAD_WARN_LATENCY_SEC``
    in the environment is left as the operator set it.
    """
    from caproto.server import common

    env = os.environ if environ is None else environ
    if "CAPROTO_SERVER_MAX_LATENCY_SEC" not in env:
        common.MAX_LATENCY = MAX_LATENCY_S
    if "CAPROTO_SERVER_HIGH_LOAD_WARN_LATENCY_SEC" not in env:
        common.HIGH_LOAD_WARN_LATENCY_SEC = WARN_LATENCY_S
    return {
        "max_latency_s": common.MAX_LATENCY,
        "high_load_timeout_s": common.HIGH_LOAD_TIMEOUT,
        "warn_latency_s": common.HIGH_LOAD_WARN_LATENCY_SEC,
    }
