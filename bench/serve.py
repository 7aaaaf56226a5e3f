"""A server under test, in a process of its own: labctl, or a baseline doing the same work.

``python -m bench.serve KIND --count N ...`` builds the server, reports ``ready`` (with its
ports and the time each start-up phase took), and then takes requests (:mod:`bench.wire`):

* ``drive rate t_end t0 t1`` -- post updates at ``rate`` per second over the N PVs until
  ``t_end`` (:class:`bench.driver.Pacer`); answered at once, the ``driven`` event follows
  with what was posted;
* ``stats`` -- server-side counters (labctl: historian, coalesced CA updates, dropped
  OPC UA notifications);
* labctl only: ``feed`` (archive-only samples straight into the historian's ingest
  path), ``flush``, ``count`` (archived rows), ``bare`` (the same rows written by a bare
  COPY / executemany, for comparison), ``directory`` (the site's servers and how many
  PVs each owns, with a PostgreSQL historian);
* ``stop``.

Kinds:

``labctl``  :class:`labctl.server.app.Server` on a generated site (:mod:`bench.site`): Channel
            Access and OPC UA served, the historian archiving (SQLite unless
            ``--historian`` names another URL), all in one process as in production.
            ``--prefix`` and ``--server-name`` make it one server of a site of several
            (:mod:`bench.sitebench`).
``caproto`` a plain caproto asyncio server: one ``ChannelDouble`` per PV, caproto's
            defaults, updates by ``await channel.write(value, timestamp=...)``.
``asyncua`` a plain asyncua server: one Double variable per PV (NodeId ``ns=<idx>;s=<name>``,
            100 per folder), updates by ``await server.write_attribute_value(...)``.
``softioc`` pythonSoftIOC: an EPICS IOC with the C core (database, RSRV Channel Access
            server), one ``ai`` record per PV, updates by ``record.set(value, timestamp=...)``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.driver import Pacer
from bench.wire import Requests, emit, log, pv_names

T_IMPORT = time.monotonic()
PREFIX = "BENCH:"
#: The setpoint written in the round-trip benchmark (labctl: on a simulated Lake Shore 336;
#: the baselines: a plain writable PV that monitors post to when written).
SETPOINT_PV = "MAG:SETP"


class Phases:
    """Wall-clock seconds of the named start-up phases, in order."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._t = time.monotonic()

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.times[name] = round(now - self._t, 4)
        self._t = now


class GcPauses:
    """The cyclic garbage collector's pauses in this process: count, total and longest per generation."""

    def __init__(self) -> None:
        self.by_gen: dict[int, list[float]] = {0: [0, 0.0, 0.0], 1: [0, 0.0, 0.0], 2: [0, 0.0, 0.0]}
        self._t = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t = time.perf_counter()
            return
        pause = time.perf_counter() - self._t
        entry = self.by_gen[info["generation"]]
        entry[0] += 1
        entry[1] += pause
        entry[2] = max(entry[2], pause)

    def stats(self) -> dict[str, Any]:
        return {
            f"gen{g}": {"count": n, "total_s": total, "max_s": longest}
            for g, (n, total, longest) in self.by_gen.items()
        }


# ---- labctl -------------------------------------------------------------------------------


class Labctl:
    """labctl's own server, built as ``labctl serve`` builds it, on a generated site."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.server: Any = None
        self.names = pv_names(args.prefix, args.count)
        self.arch_names = pv_names("ARCH:", args.extra)

    async def start(self, phases: Phases) -> dict[str, Any]:
        from labctl.server.app import Server
        from labctl.server.site import load_site

        from bench.site import SITE_WRITE_PHASE, site_data, write_site

        phases.mark("imports")
        args = self.args
        data = site_data(
            args.count,
            state_dir=args.state_dir,
            beacon_port=args.beacon_port,
            historian_url=None if args.historian == "none" else args.historian,
            opcua=not args.no_opcua,
            ca=not args.no_ca,
            instrument=args.instrument,
            password_hash=args.password_hash,
            extra_count=args.extra,
            numbered=True,
            prefix=args.prefix,
            server_name=args.server_name,
        )
        path = write_site(Path(args.state_dir) / "bench-site.yaml", data)
        del data
        phases.mark(SITE_WRITE_PHASE)
        # What `labctl serve` does (server.app.Server.from_file), in two timed steps.
        site = load_site(path)
        phases.mark("site")
        server = Server(site, base_dir=path.parent, source=str(path))
        del site
        phases.mark("build")
        for service in server.services:
            _time_start(service, phases)
        await server.start()
        self.server = server
        self._post = server.db.post
        if args.instrument:
            from bench import stages

            stages.install(server, SETPOINT_PV)
        out: dict[str, Any] = {"pvs": len(server.db)}
        if not args.no_ca:
            out["ca_port"] = server.service("ca").port
        if not args.no_opcua:
            ua = server.service("opcua")
            out["opcua_url"] = f"opc.tcp://127.0.0.1:{ua.port}"
            out["ns_uri"] = "urn:labctl:bench"
        return out

    def post(self, i: int, value: float, ts: float) -> None:
        self._post(self.names[i], value, ts)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        s = self.server
        try:
            out["historian"] = s.service("historian").stats()
        except KeyError:
            pass
        try:
            ca = s.service("ca")
            out["ca_coalesced"] = ca._queue.coalesced
            circuits = list(ca.context.circuits) if ca.context is not None else []
            out["ca_dropped"] = sum(c.outbox.dropped for c in circuits if hasattr(c, "outbox"))
        except KeyError:
            pass
        try:
            pub = s.service("opcua")._publisher
            out["opcua_dropped"] = pub.dropped if pub is not None else None
        except KeyError:
            pass
        return out

    async def feed(self, rate: float, t_end: float, t0: float, t1: float) -> dict[str, Any]:
        """Archive-only samples into the historian's ingest path (its subscription's entry point)."""
        from labctl.ioc.types import Reading, Severity, Status

        ingestor = self.server.service("historian").ingestor
        names = self.arch_names
        put = ingestor.put

        def post(i: int, value: float, ts: float) -> None:
            put(names[i], Reading(value, ts, Severity.NO_ALARM, Status.NO_ALARM))

        res = await Pacer(len(names), rate).run(post, t_end, t0, t1)
        return res.as_dict()

    async def flush(self) -> dict[str, Any]:
        t = time.monotonic()
        ok = await self.server.service("historian").flush()
        return {"in_database": ok, "seconds": time.monotonic() - t}

    async def count(self, prefix: str, since: float) -> dict[str, Any]:
        """Rows archived for PVs named ``prefix*`` with a time from ``since`` on."""
        from sqlalchemy import text

        engine = self.server.service("historian").backend.engine

        def run() -> int:
            with engine.connect() as conn:
                return conn.execute(
                    text(
                        "SELECT count(*) FROM sample s JOIN pv ON pv.id = s.pv_id "
                        "WHERE pv.name LIKE :p AND s.time_us >= :t"
                    ),
                    {"p": prefix + "%", "t": int(since * 1e6)},
                ).scalar_one()

        return {"rows": await asyncio.to_thread(run)}

    async def directory(self) -> dict[str, Any]:
        """The site's servers as the directory has them now, each with the number of PVs it owns."""
        from collections import Counter

        sitedir = self.server.service("sitedir")
        servers = await sitedir.read_servers()
        owned = Counter((await sitedir.read_owners()).values())
        return {
            "servers": [
                {"name": e.name, "up": e.up, "health": e.health, "pv_count": e.pv_count, "owned": owned[e.name]}
                for e in servers
            ]
        }

    async def bare(self, rows: int, batch: int) -> dict[str, Any]:
        """The same rows written by a bare COPY (PostgreSQL) / executemany (SQLite)."""
        from bench.bare import bare_insert

        backend = self.server.service("historian").backend
        return await asyncio.to_thread(bare_insert, backend.engine, backend.kind, rows, batch)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()


def _time_start(service: Any, phases: Phases) -> None:
    start = service.start

    async def timed() -> None:
        phases.mark(f"before {service.name}")
        await start()
        phases.mark(f"start {service.name}")

    service.start = timed


# ---- plain caproto ------------------------------------------------------------------------


class PlainCaproto:
    """caproto's asyncio server with one ChannelDouble per PV and caproto's defaults."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.names = pv_names(PREFIX, args.count)

    async def start(self, phases: Phases) -> dict[str, Any]:
        from caproto import ChannelDouble
        from caproto.asyncio.server import Context

        phases.mark("imports")
        self.channels = [ChannelDouble(value=0.0, precision=3) for _ in self.names]
        pvdb = dict(zip(self.names, self.channels, strict=True))
        if self.args.instrument:
            pvdb[SETPOINT_PV] = ChannelDouble(value=0.0, precision=3)
        phases.mark("build")
        self.context = Context(pvdb, ["127.0.0.1"])
        started = asyncio.Event()

        async def hook(*_: Any) -> None:
            started.set()

        self.task = asyncio.create_task(self.context.run(log_pv_names=False, startup_hook=hook))
        async with asyncio.timeout(60):
            await started.wait()
        phases.mark("start ca")
        return {"pvs": len(pvdb), "ca_port": int(os.environ["EPICS_CA_SERVER_PORT"])}

    async def apost(self, i: int, value: float, ts: float) -> None:
        await self.channels[i].write(value, timestamp=ts)

    def stats(self) -> dict[str, Any]:
        return {}

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


# ---- plain asyncua ------------------------------------------------------------------------


class PlainAsyncua:
    """asyncua's server with one Double variable per PV, written by ``write_attribute_value``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.names = pv_names(PREFIX, args.count)

    async def start(self, phases: Phases) -> dict[str, Any]:
        from asyncua import Server, ua

        phases.mark("imports")
        server = Server()
        await server.init()
        server.set_endpoint(f"opc.tcp://127.0.0.1:{self.args.opcua_port}")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        idx = await server.register_namespace("urn:bench")
        root = await server.nodes.objects.add_folder(ua.NodeId("bench", idx), "bench")
        self.nodeids = []
        folder = None
        for k, name in enumerate(self.names):
            if k % 100 == 0:
                folder = await root.add_folder(ua.NodeId(f"bench/{k // 100}", idx), f"f{k // 100}")
            node = await folder.add_variable(
                ua.NodeId(name, idx), ua.QualifiedName(name, idx), 0.0, varianttype=ua.VariantType.Double
            )
            self.nodeids.append(node.nodeid)
        if self.args.instrument:
            node = await root.add_variable(
                ua.NodeId(SETPOINT_PV, idx), ua.QualifiedName(SETPOINT_PV, idx), 0.0, varianttype=ua.VariantType.Double
            )
            await node.set_writable()
        phases.mark("build")
        await server.start()
        phases.mark("start opcua")
        self.server, self.ua = server, ua
        return {
            "pvs": len(self.names),
            "opcua_url": f"opc.tcp://127.0.0.1:{self.args.opcua_port}",
            "ns_uri": "urn:bench",
        }

    async def apost(self, i: int, value: float, ts: float) -> None:
        ua = self.ua
        stamp = dt.datetime.fromtimestamp(ts, dt.UTC)
        dv = ua.DataValue(ua.Variant(value, ua.VariantType.Double), SourceTimestamp=stamp, ServerTimestamp=stamp)
        await self.server.write_attribute_value(self.nodeids[i], dv)

    def stats(self) -> dict[str, Any]:
        return {}

    async def stop(self) -> None:
        await self.server.stop()


# ---- pythonSoftIOC ------------------------------------------------------------------------


class SoftIoc:
    """An EPICS IOC with the C core (pythonSoftIOC): one ai record per PV."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.names = pv_names(PREFIX, args.count)

    async def start(self, phases: Phases) -> dict[str, Any]:
        from softioc import asyncio_dispatcher, builder, softioc

        phases.mark("imports")
        builder.SetDeviceName(PREFIX.rstrip(":"))
        self.records = [builder.aIn(n[len(PREFIX) :], initial_value=0.0, PREC=3) for n in self.names]
        if self.args.instrument:
            device, _, record = SETPOINT_PV.rpartition(":")
            builder.SetDeviceName(device)
            builder.aOut(record, initial_value=0.0, PREC=3)
        builder.LoadDatabase()
        phases.mark("build")
        self.dispatcher = asyncio_dispatcher.AsyncioDispatcher()
        softioc.iocInit(self.dispatcher, enable_pva=False)
        phases.mark("start ca")
        return {"pvs": len(self.records), "ca_port": int(os.environ["EPICS_CAS_SERVER_PORT"])}

    def post(self, i: int, value: float, ts: float) -> None:
        self.records[i].set(value, timestamp=ts)

    def stats(self) -> dict[str, Any]:
        return {}

    async def stop(self) -> None:
        pass


KINDS = {"labctl": Labctl, "caproto": PlainCaproto, "asyncua": PlainAsyncua, "softioc": SoftIoc}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--extra", type=int, default=0, help="labctl: archive-only PVs (ARCH:...)")
    parser.add_argument("--prefix", default=PREFIX, help=f"labctl: the PVs' names are <prefix>00000... (default {PREFIX})")
    parser.add_argument("--server-name", default=None, help="labctl: server.name in the site directory")
    parser.add_argument("--state-dir", default=None)
    parser.add_argument("--historian", default="sqlite:///{state_dir}/history.sqlite")
    parser.add_argument("--beacon-port", type=int, default=None)
    parser.add_argument("--opcua-port", type=int, default=0)
    parser.add_argument("--no-opcua", action="store_true")
    parser.add_argument("--no-ca", action="store_true")
    parser.add_argument("--instrument", action="store_true", help=f"serve the writable setpoint {SETPOINT_PV}")
    parser.add_argument("--password-hash", default=None)
    parser.add_argument("--lifetime", type=float, default=3600.0, help="exit after this many seconds in any case")
    args = parser.parse_args()
    if args.state_dir is None:
        args.state_dir = tempfile.mkdtemp(prefix="labctl-bench-")
    Path(args.state_dir).mkdir(parents=True, exist_ok=True)

    phases = Phases()
    phases.times["python"] = round(T_IMPORT - _process_start(), 4)
    server = KINDS[args.kind](args)
    info = await server.start(phases)
    phases.mark("ready")
    gc.collect()
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def drive(rate: float, t_end: float, t0: float, t1: float) -> dict:
        pacer = Pacer(args.count, rate)

        async def run() -> None:
            cpu0 = time.process_time()
            res = await pacer.run(server.post if hasattr(server, "post") else server.apost, t_end, t0, t1)
            emit({"event": "driven", **res.as_dict(), "cpu_s": time.process_time() - cpu0})

        task = loop.create_task(run())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return {}

    pauses = GcPauses()
    handlers: dict[str, Any] = {"drive": drive, "stats": lambda: {**server.stats(), "gc": pauses.stats()}}
    if args.kind == "labctl" and args.instrument:
        from bench import stages

        handlers["stages"] = lambda: (stages.summary(), stages.reset())[0]
    for op in ("feed", "flush", "count", "bare", "directory"):
        if hasattr(server, op):
            handlers[op] = getattr(server, op)
    requests = Requests(loop, handlers)
    requests.start()
    emit({"event": "ready", "kind": args.kind, "phases": phases.times, **info})
    try:
        async with asyncio.timeout(args.lifetime):
            await requests.stopped.wait()
    except TimeoutError:
        log(f"bench.serve {args.kind}: lifetime of {args.lifetime} s reached; stopping")
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await server.stop()


def _process_start() -> float:
    """The monotonic time this process started (from /proc), to count interpreter start-up."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.monotonic() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return T_IMPORT


if __name__ == "__main__":
    asyncio.run(main())
