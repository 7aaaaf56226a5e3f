"""Autosave: writable PVs keep their values across restarts, as EPICS autosave does.

Theory of operation. The PVs saved are the *writable* ones -- server-kept PVs (soft PVs
with no instrument) and instrument setpoints -- unless the site turns it off for one PV
(``autosave: false`` on the PV) or for the whole site (``autosave: {enabled: false}``).
Read-only PVs (readings, derived PVs, lock state) are never saved: they come back from
their source.

* **Save on change, coalesced, off the loop.** The service listens to the database (one
  subscription to the saved PVs) and to the audit trail (an accepted ``write`` of a saved
  PV, which also catches writes inside a monitor deadband). A change only marks the PV
  dirty and arms one timer; ``delay_s`` later (0.1 s by default) the loop takes the
  current readings of the dirty PVs -- a dictionary update, no I/O -- and hands the whole
  document to one worker thread, which writes ``<file>.tmp``, fsyncs it, renames it over
  the file and fsyncs the directory. The file is therefore always complete: the previous
  version or the new one, never a torn mixture, whenever the process dies. Changes that
  arrive while a save is running are gathered into the next one. The write path never
  waits for the disk.
* **The window.** A write is acknowledged to its client before it is on disk: a crash
  (kill -9, power loss) within ``delay_s`` plus one file write (a few milliseconds) of an
  acknowledged write may lose that write, and the PV then restarts with the value saved
  before it. Nothing older is ever lost, and a clean stop saves everything. The restart
  tests measure the window (``tests/system/test_autosave.py``).
* **What is saved.** The value of each saved PV's latest *valid* reading; an INVALID
  reading (an instrument that went away) leaves the last valid value in the file.
* **Restore at start.** ``start()`` runs before the instruments start. Server-kept PVs
  get their saved value at once, before any client can connect. Instrument setpoints are
  written to their instrument as soon as its link first connects -- a lab expects its
  setpoints back, as EPICS autosave's pass 0/1 restores a record before its device
  support runs -- through the core's write path under the server's own identity, so the
  drive limits, interlocks and the instrument's own read-back apply. Until then a setpoint
  keeps its saved value in the file (the instrument's power-on value is not saved over
  it), and a client's write to it before the restore wins (the restore is dropped).
  Each restored value is audited once as action ``restore`` by the server
  (``labctl@autosave``); a setpoint's restore also leaves the write path's ``write``
  record. A saved value the site no longer accepts (another type, outside new drive
  limits, refused by an interlock) is not restored; that is logged and audited as refused.

The file is ``{state_dir}/autosave.json`` unless ``autosave.file`` says otherwise: JSON
with ``format``, ``version``, ``saved`` (UNIX s) and ``pvs`` (name -> type, value, time).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labctl.ioc.config.base import Model, PositiveSeconds

if TYPE_CHECKING:
    from labctl.ioc.access import AuditRecord
    from labctl.ioc.database import Database
    from labctl.ioc.subscription import Callback
    from labctl.ioc.types import Update
    from labctl.server.app import Server

log = logging.getLogger(__name__)

FORMAT = "labctl-autosave"
VERSION = 1
#: The actor restores are audited under (``labctl@autosave``).
ACTOR = "autosave"


class AutosaveConfig(Model):
    """Saving writable PVs' values across restarts (see :mod:`labctl.server.autosave`)."""

    enabled: bool = True
    """Save and restore at all (per PV: ``autosave: false`` on the PV)."""
    delay_s: PositiveSeconds = 0.1
    """The longest a change waits before it is written: changes within it are saved together."""
    file: str = "{state_dir}/autosave.json"
    """Where the values are kept; ``{state_dir}`` is replaced."""


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # "nan", "inf": strict JSON
    return value


def _unplain(value: Any) -> Any:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, list):
        return [_unplain(v) for v in value]
    return value


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that it is complete or absent: temporary file, fsync, rename, fsync of the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: Path) -> dict[str, dict[str, Any]]:
    """The saved PVs of an autosave file (name -> entry); empty if there is none. Raises ValueError if unreadable."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("pvs"), dict):
        raise ValueError(f"{path}: not a labctl autosave file")
    if doc.get("version") != VERSION:
        raise ValueError(f"{path}: autosave version {doc.get('version')!r}; this labctl reads version {VERSION}")
    return {str(k): v for k, v in doc["pvs"].items() if isinstance(v, dict) and "value" in v}


class Autosave:
    """Saves and restores the writable PVs of one :class:`~labctl.ioc.database.Database`."""

    name = "autosave"

    def __init__(self, db: Database, config: AutosaveConfig, state_dir: Path | str, excluded: Iterable[str] = ()) -> None:
        self.db = db
        self.config = config
        self.path = Path(config.file.replace("{state_dir}", str(state_dir)))
        skip = set(excluded)
        self.names = [i.name for i in db.infos() if i.writable and not i.expr and i.name not in skip]
        self._saved: dict[str, dict[str, Any]] = {}
        self._dirty: set[str] = set()
        self._pending: dict[str, Any] = {}
        """Setpoints whose saved value waits for their instrument: name -> value."""
        self._timer: asyncio.TimerHandle | None = None
        self._io: ThreadPoolExecutor | None = None
        self._last: asyncio.Future | None = None
        self._subscription: Callback | None = None
        self._tasks: list[asyncio.Task] = []
        self.saves = 0
        """Files written so far."""
        self.last_saved: float | None = None
        """When the last file write finished (UNIX s)."""

    # ---- Service --------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the file, restore server-kept PVs, schedule setpoint restores, then save on change."""
        from labctl.ioc.types import internal_identity

        self.who = internal_identity(ACTOR)
        saved = await asyncio.to_thread(self._load)
        wanted = set(self.names)
        self._saved = {n: e for n, e in saved.items() if n in wanted}
        dropped = sorted(set(saved) - wanted)
        if dropped:
            log.info("autosave: %d saved PVs are no longer saved (unknown, read-only or autosave: false): %s",
                     len(dropped), ", ".join(dropped[:10]) + (" ..." if len(dropped) > 10 else ""))  # fmt: skip
        by_instrument: dict[str, list[str]] = {}
        restored = 0
        for name, entry in self._saved.items():
            info = self.db.info(name)
            if entry.get("type") not in (None, info.type.value):
                log.warning("autosave: %s: saved as %s, now %s: not restored", name, entry.get("type"), info.type.value)
                continue
            value = _unplain(entry["value"])
            if info.instrument is None:
                restored += self._restore_soft(name, value)
            else:
                self._pending[name] = value
                by_instrument.setdefault(info.instrument, []).append(name)
        self._io = ThreadPoolExecutor(1, thread_name_prefix="autosave")
        self._subscription = self.db.subscribe(self._on_update, names=self.names)
        self.db.add_audit_sink(self._on_audit)
        for inst, names in by_instrument.items():
            self._tasks.append(asyncio.create_task(self._restore_setpoints(inst, names), name=f"autosave restore {inst}"))
        if self._saved:
            log.info("autosave: %d values restored from %s, %d setpoints to send when their instruments connect",
                     restored, self.path, len(self._pending))  # fmt: skip

    async def stop(self) -> None:
        """Save what changed, then stop listening."""
        if self._io is None:
            return
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        if self._subscription is not None:
            self.db.unsubscribe(self._subscription)
            self._subscription = None
        self.db.remove_audit_sink(self._on_audit)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._dirty:
            self._save()
        if self._last is not None:
            with contextlib.suppress(Exception):
                await self._last
        self._io.shutdown(wait=True)
        self._io = None

    def endpoints(self) -> list[str]:
        """The file (and how many PVs it keeps)."""
        return [f"autosave {self.path} ({len(self.names)} writable PVs)"]

    # ---- restore --------------------------------------------------------------------------

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            return read_file(self.path)
        except ValueError as e:
            # Keep the unreadable file for a person to look at; start from the site's values.
            aside = self.path.with_name(self.path.name + f".unreadable-{int(time.time())}")
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            log.error("autosave: %s; moved aside to %s, starting from the site file's values", e, aside.name)
            return {}

    def _restore_soft(self, name: str, value: Any) -> bool:
        from labctl.ioc.access import AuditRecord
        from labctl.ioc.errors import Refused, WrongType

        old = self.db.read(name).value
        try:
            v = self.db.check_write(name, value, self.who)
        except (Refused, WrongType) as e:
            log.warning("autosave: %s: saved value %r not restored: %s", name, value, e)
            if isinstance(e, Refused):
                self.db.refuse(self.who, e, old=_plain(old), new=_plain(value))
            return False
        self.db.post(name, v)
        self.db.audit(AuditRecord.of(self.db.clock(), "restore", self.who, name, old=_plain(old), new=_plain(v)))
        return True

    async def _restore_setpoints(self, instrument: str, names: list[str]) -> None:
        from labctl.ioc.access import AuditRecord
        from labctl.ioc.errors import LabctlError

        link = self.db.link(instrument)
        while True:
            try:
                await link.wait_connected(3600.0)
                break
            except TimeoutError:
                continue
        for name in names:
            if name not in self._pending:
                continue  # written by someone since the start: theirs wins
            value = self._pending[name]
            old = self.db.read(name).value
            try:
                reading = await self.db.write(name, value, self.who)
            except LabctlError as e:
                log.warning("autosave: %s: saved setpoint %r not restored: %s", name, value, e)
                self._pending.pop(name, None)
                continue
            self._pending.pop(name, None)
            self.db.audit(AuditRecord.of(self.db.clock(), "restore", self.who, name, old=_plain(old), new=_plain(reading.value)))
            log.info("autosave: %s restored to %r on %s", name, reading.value, instrument)
            self._changed(name)

    # ---- save -----------------------------------------------------------------------------

    def _on_update(self, update: Update) -> None:
        self._changed(update.name)

    def _on_audit(self, record: AuditRecord) -> None:
        if record.action == "write" and record.accepted and record.target in self._saved_names:
            if record.user != self.who.user or record.host != self.who.host:
                self._pending.pop(record.target, None)  # a client's write before the restore wins
            self._changed(record.target)

    @property
    def _saved_names(self) -> frozenset[str]:
        names = self.__dict__.get("_names_set")
        if names is None:
            names = self.__dict__["_names_set"] = frozenset(self.names)
        return names

    def _changed(self, name: str) -> None:
        if name in self._pending or self._io is None:
            return
        self._dirty.add(name)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.config.delay_s, self._save)

    def _save(self) -> None:
        """Take the dirty PVs' readings (on the loop) and hand the document to the writer thread."""
        self._timer = None
        dirty, self._dirty = self._dirty, set()
        for name in dirty:
            r = self.db.read(name)
            if r.valid:
                self._saved[name] = {"type": self.db.info(name).type.value, "value": _plain(r.value), "time": r.timestamp}
        doc = {"format": FORMAT, "version": VERSION, "saved": time.time(), "pvs": self._saved}
        data = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
        assert self._io is not None
        fut = asyncio.wrap_future(self._io.submit(self._write, data))
        fut.add_done_callback(self._written)
        self._last = fut

    def _write(self, data: bytes) -> None:
        write_atomically(self.path, data)

    def _written(self, fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        e = fut.exception()
        if e is not None:
            log.error("autosave: cannot write %s: %s (the next change tries again)", self.path, e)
            return
        self.saves += 1
        self.last_saved = time.time()

    def stats(self) -> dict[str, Any]:
        """Files written, when the last one was, values kept, setpoints still to restore."""
        return {"saves": self.saves, "last_saved": self.last_saved, "values": len(self._saved), "pending": sorted(self._pending)}


class AutosaveService(Autosave):
    """Autosave as a :class:`labctl.server.app.Service` of a :class:`labctl.server.app.Server`."""

    def __init__(self, server: Server) -> None:
        site = server.site
        excluded = [pv.name for _inst, pv in site.iter_pvs() if not pv.autosave]
        super().__init__(server.db, site.autosave, server.state_dir, excluded)
