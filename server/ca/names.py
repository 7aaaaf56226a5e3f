"""Channel Access name service of a site: TCP name searches answered for the PVs of other servers.

Theory of operation. An EPICS client finds a channel by searching for its name: over UDP
to the addresses of ``EPICS_CA_ADDR_LIST``, and over TCP to the name servers of
``EPICS_CA_NAME_SERVERS`` (EPICS 3.14.12 and later). Over TCP, libca opens a circuit to
the name server, sends VERSION, CLIENT_NAME and HOST_NAME, then the same frames it
would send over UDP: a VERSION message (whose priority field carries a sequence flag)
followed by SEARCH messages. A search reply holds a TCP port and an IPv4 address; libca
connects there to create the channel, or to the name server itself when the address is
255.255.255.255. An EPICS CA name server answers with the address of the IOC that serves
the name.

A labctl server that is part of a site (:mod:`labctl.server.siteinfo`) does the same on
its CA TCP port (:class:`~labctl.server.ca.context.LabctlCircuit` asks
:meth:`NameService.resolve`): a name it serves itself is answered as caproto answers it
(the client stays on this server); a name whose PV another server of the site owns is
answered with that server's CA address and TCP port, if the directory says that server
is up and serves Channel Access; anything else gets no answer (or NOT_FOUND when the
client asked for one). UDP searches are not affected: each server answers those for its
own PVs, so a client whose ``EPICS_CA_ADDR_LIST`` lists every server finds every PV.

Where the answers come from. Nothing here queries the database per search, nor on the
event loop: :class:`NameTable` answers from memory, and :class:`NameService` keeps it
up to date through the site directory service (:mod:`labctl.server.sitedir`), which
runs its queries on its own thread:

* the *owner map* (PV name -> server name) is the directory service's own: it reads it
  whole when a server of the site starts, registers again, or changes its PV count, once
  for the whole server (the OPC UA ``Site`` folder answers from the same map), and its
  listener hands the new map to the table (:meth:`NameService.servers_changed`). Whether
  an owner is up is taken from the directory's latest heartbeat, so a server that
  stopped or whose heartbeat lapsed is not answered for from the next heartbeat on;
* a name the owner map does not hold is *looked up*: searched names are collected
  (at most :data:`PENDING_MAX` at a time), and looked up in batches of
  :data:`LOOKUP_BATCH`, at most one query per :data:`MIN_QUERY_INTERVAL_S`, in one
  supervised task. The search itself gets no answer; libca repeats unanswered searches,
  and its next one is answered from what the lookup found. Names found are added to the
  directory's owner map (:meth:`~labctl.server.siteinfo.SiteDirectory.lookup_owners`);
  names not found go to a *negative cache* (at most :data:`NEGATIVE_MAX` names, oldest
  dropped first, each for :data:`NEGATIVE_TTL_S`), so a client searching for a name no
  server owns (a typo, a PV of another control system) costs one lookup per TTL, not
  one per search. Nothing is looked up before the directory first read the owner map;
* the address in a reply is the first of the owner's published CA interfaces
  (``ca_address`` in the directory: ``server.directory.address`` when set, else the
  interfaces it bound, with this host's name for a wildcard). A host name is resolved
  once, off the event loop; an owner whose address cannot be resolved is not answered
  for (logged once).

Names. A searched name is taken as this server's ``server.ca.prefix`` plus a PV name,
optionally followed by a record field or channel filter (``.EGU``, ``.VAL$``, ``.{...}``);
the PV name is what the directory is asked about, so the servers of a site should share
one prefix (or none). The lock command channels ``ARB:<RES>:REQUEST`` and ``:RELEASE``
belong to the server whose ``ARB:<RES>:OWNER`` PV the directory lists.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from labctl.ioc.config.pvs import PV_NAME
from labctl.server.siteinfo import Ownership, ServerEntry, SiteDirectory, ownership

from labctl.backoff import Backoff
from labctl.supervision import Supervisor

log = logging.getLogger("labctl.ca")

#: Seconds a name that no server of the site owned stays unanswered without a new lookup.
NEGATIVE_TTL_S = 5.0
#: Names held in the negative cache at most (the oldest go first).
NEGATIVE_MAX = 10_000
#: Names waiting to be looked up at most; searches for further unknown names get no answer and no lookup.
PENDING_MAX = 1_000
#: Names looked up in one query.
LOOKUP_BATCH = 500
#: Shortest interval between two queries of the name service (bounds what a flood of unknown names costs).
MIN_QUERY_INTERVAL_S = 0.05
#: Longest name looked up; a longer one is answered only if the owner map holds it.
MAX_LOOKUP_CHARS = 255
#: Seconds allowed to resolve an owner's host name.
RESOLVE_TIMEOUT_S = 5.0

#: The lock command channels, and the lock PV whose owner serves them (see :mod:`labctl.server.ca.arbiter`).
_COMMAND_SUFFIXES = (":REQUEST", ":RELEASE")


@dataclass(frozen=True, slots=True)
class Redirect:
    """Where a client finds a name: a server of the site, its CA address and TCP port."""

    server: str
    address: str
    """IPv4 address (dotted quad)."""
    port: int
    """The server's CA TCP port."""


def pv_of(name: str, prefix: str = "") -> str | None:
    """The site PV a searched CA name belongs to, or None if it cannot name one.

    ``<prefix>PV``, ``<prefix>PV.FIELD``, ``<prefix>PV.{filter}`` -> ``PV``; the lock
    command channels ``ARB:<RES>:REQUEST``/``:RELEASE`` -> ``ARB:<RES>:OWNER``.
    """
    if not name.startswith(prefix):
        return None
    pv = name[len(prefix) :]
    for stop in (".", "{"):
        pv = pv.partition(stop)[0]
    if not PV_NAME.match(pv):
        return None
    if pv.startswith("ARB:"):
        for suffix in _COMMAND_SUFFIXES:
            if pv.endswith(suffix):
                return pv.removesuffix(suffix) + ":OWNER"
    return pv


def ca_host(entry: ServerEntry) -> str | None:
    """The host a server's CA clients connect to: the first of its published interfaces (None: no CA)."""
    if not entry.ca_address or not entry.ca_tcp_port:
        return None
    host = entry.ca_address.split(",", 1)[0].strip()
    return host or None


def ipv4(host: str) -> str | None:
    """``host`` if it is an IPv4 address, else None."""
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        return None


class NameTable:
    """Answers name searches from memory (pure: no I/O, the time passed in)."""

    def __init__(
        self,
        me: str,
        prefix: str = "",
        *,
        negative_ttl_s: float = NEGATIVE_TTL_S,
        negative_max: int = NEGATIVE_MAX,
        pending_max: int = PENDING_MAX,
    ) -> None:
        self.me = me
        """This server's name (its own PVs are answered by the circuit, not from here)."""
        self.prefix = prefix
        self.negative_ttl_s = negative_ttl_s
        self.negative_max = negative_max
        self.pending_max = pending_max
        self.owners: Mapping[str, str] = MappingProxyType({})
        """PV name -> owning server: the site directory's owner map (read-only here)."""
        self.loaded = False
        """Whether the owner map was read at least once."""
        self.servers: dict[str, ServerEntry] = {}
        """The site's servers by name, as of the directory's latest heartbeat."""
        self.addresses: dict[str, str] = {}
        """Server name -> the IPv4 address its CA clients connect to."""
        self.pending: dict[str, None] = {}
        """PV names waiting to be looked up, in the order they were searched."""
        self.asking: set[str] = set()
        """PV names being looked up now (taken from :attr:`pending`, not yet learned): not queued again meanwhile."""
        self._negative: OrderedDict[str, float] = OrderedDict()
        self.redirected = 0
        """Searches answered with another server's address."""
        self.unanswered = 0
        """Searches for names of no server that is up (or not yet known)."""
        self.dropped = 0
        """Unknown names not looked up because :attr:`pending_max` were waiting already."""

    # ---- the directory's side ---------------------------------------------------------------

    def set_servers(self, servers: Iterable[ServerEntry], resolved: Mapping[str, str | None]) -> set[str]:
        """Take the directory's servers; return the host names among their CA addresses not yet in ``resolved``."""
        self.servers = {e.name: e for e in servers}
        self.addresses = {}
        unresolved = set()
        for entry in self.servers.values():
            host = ca_host(entry)
            if host is None or entry.name == self.me:
                continue
            address = ipv4(host) or resolved.get(host)
            if address is not None:
                self.addresses[entry.name] = address
            elif host not in resolved:
                unresolved.add(host)
        return unresolved

    def replace_owners(self, owners: Mapping[str, str]) -> None:
        """Answer from ``owners`` (the directory's map, as read whole; looked-up names are added to it there)."""
        self.owners = owners
        self.loaded = True

    def take_pending(self, limit: int = LOOKUP_BATCH) -> list[str]:
        """Up to ``limit`` names to look up now (removed from the waiting ones)."""
        batch = []
        for name in self.pending:
            if len(batch) == limit:
                break
            batch.append(name)
        for name in batch:
            del self.pending[name]
        self.asking.update(batch)
        return batch

    def learned(self, asked: Iterable[str], found: Mapping[str, str], now: float) -> None:
        """A lookup of ``asked`` found ``found`` (PV -> owner); the others are owned by no server.

        The directory added what was found to the owner map; here the others go to the negative cache.
        """
        self.asking.difference_update(asked)
        for pv in asked:
            if pv in found:
                self._negative.pop(pv, None)
            else:
                self._negative[pv] = now + self.negative_ttl_s
                self._negative.move_to_end(pv)
        while len(self._negative) > self.negative_max:
            self._negative.popitem(last=False)

    @property
    def negative_size(self) -> int:
        """Names in the negative cache (some may have expired)."""
        return len(self._negative)

    # ---- the circuits' side -------------------------------------------------------------------

    def resolve(self, name: str, now: float) -> Redirect | None:
        """Where to find the searched ``name``: another server of the site that is up, or None.

        A name the owner map does not hold is queued for a lookup (unless one found no
        owner less than the negative TTL ago, or too many are queued).
        """
        pv = pv_of(name, self.prefix)
        if pv is None:
            self.unanswered += 1
            return None
        owner = self.owners.get(pv)
        if owner is None:
            self._miss(pv, now)
            self.unanswered += 1
            return None
        entry = self.servers.get(owner)
        address = self.addresses.get(owner)
        if owner == self.me or entry is None or not entry.up or address is None or not entry.ca_tcp_port:
            self.unanswered += 1
            return None
        self.redirected += 1
        return Redirect(owner, address, entry.ca_tcp_port)

    def _miss(self, pv: str, now: float) -> None:
        if not self.loaded or pv in self.pending or pv in self.asking or len(pv) > MAX_LOOKUP_CHARS:
            return  # the first reading will tell; already asked; no PV of a site
        until = self._negative.get(pv)
        if until is not None:
            if until > now:
                return
            del self._negative[pv]
        if len(self.pending) >= self.pending_max:
            self.dropped += 1
            return
        self.pending[pv] = None


class NameService:
    """Keeps a :class:`NameTable` up to date from the site directory; looks names up in one supervised task."""

    def __init__(self, directory: SiteDirectory, prefix: str = "", *, clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.table = NameTable(directory.server_name, prefix)
        self._clock = clock
        self._wake = asyncio.Event()
        self._ownership: Ownership | None = None
        self._resolved: dict[str, str | None] = {}
        self._unresolved: set[str] = set()
        self._supervisor: Supervisor | None = None
        self._unreadable = ""

    async def start(self) -> None:
        """Answer from the directory as it is, follow its listener, and look names up in the background."""
        self.directory.add_listener(self.servers_changed)
        self.servers_changed(self.directory.servers)
        self._supervisor = Supervisor("ca name service", self._run, backoff=Backoff(0.5, 10.0), logger=log)
        self._supervisor.start()

    async def stop(self) -> None:
        """Stop listening and updating."""
        try:
            self.directory.remove_listener(self.servers_changed)
        except ValueError:  # never added (start failed)
            pass
        if self._supervisor is not None:
            await self._supervisor.stop()
            self._supervisor = None

    def resolve(self, name: str) -> Redirect | None:
        """Where another server of the site serves ``name`` (None: nowhere known now; see :meth:`NameTable.resolve`)."""
        redirect = self.table.resolve(name, self._clock())
        if self.table.pending:
            self._wake.set()
        return redirect

    def servers_changed(self, servers: tuple[ServerEntry, ...]) -> None:
        """The directory's listener (on the loop, never waits): new servers, states, addresses and owner map.

        A change of ownership (a server registered) also tries again to resolve host names
        that could not be resolved.
        """
        if self.directory.owners_loaded:
            self.table.replace_owners(self.directory.owners)
        key = ownership(servers)
        if key != self._ownership:
            self._ownership = key
            self._resolved = {host: address for host, address in self._resolved.items() if address is not None}
        self._unresolved = self.table.set_servers(servers, self._resolved)
        if self._unresolved:
            self._wake.set()

    # ---- the task -------------------------------------------------------------------------------

    async def _run(self) -> None:
        self._wake.set()  # (re)started: catch up on what was asked meanwhile
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._unresolved:
                await self._resolve_hosts()
            batch = self.table.take_pending()
            if not batch:
                continue
            try:
                found = await self.directory.lookup_owners(batch)
            except Exception as e:  # the directory's database is away: the names are asked again after the negative TTL
                self._report_unreadable(e)
                found = {}
            else:
                self._readable()
            self.table.learned(batch, found, self._clock())
            if self.table.pending:
                self._wake.set()
            await asyncio.sleep(MIN_QUERY_INTERVAL_S)

    async def _resolve_hosts(self) -> None:
        loop = asyncio.get_running_loop()
        for host in sorted(self._unresolved):
            try:
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(host, None, family=socket.AF_INET, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S
                )
                address: str | None = infos[0][4][0]
            except (OSError, TimeoutError, IndexError) as e:
                log.warning(
                    "Channel Access name service: cannot resolve %r, the CA address of a server of the site (%s); "
                    "its PVs are not answered for (set server.directory.address on that server)",
                    host, e,
                )  # fmt: skip
                address = None
            self._resolved[host] = address
        self._unresolved = self.table.set_servers(self.table.servers.values(), self._resolved)

    def _report_unreadable(self, error: Exception) -> None:
        signature = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        if signature != self._unreadable:
            log.warning(
                "Channel Access name service: the site directory cannot be read (%s); names not in its owner map "
                "go unanswered, PVs of other servers are answered from the last reading", signature,
            )  # fmt: skip
            self._unreadable = signature

    def _readable(self) -> None:
        if self._unreadable:
            log.info("Channel Access name service: the site directory can be read again")
            self._unreadable = ""
