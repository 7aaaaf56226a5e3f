"""``python -m bench``: run the benchmarks, print the tables, write the raw numbers as JSON.

Scenarios (``--only`` picks some; all by default), each measured beside its baselines in
the same run:

``fanout``     N PVs at a total rate to 1 and to many clients, CA and OPC UA (:mod:`bench.fanout`)
``roundtrip``  write a setpoint, wait for its monitor, idle and loaded (:mod:`bench.roundtrip`)
``archive``    samples/s into SQLite and TimescaleDB under load, none dropped (:mod:`bench.archive`)
``scale``      start-up time and memory with 10 000 and 100 000 PVs (:mod:`bench.scale`)
``history``    downsampled day/week/month queries on both backends (:mod:`bench.history`)
``site``       N servers x M PVs archiving into one TimescaleDB against one server of
             N x M PVs: start-up, sustained samples/s, none dropped (:mod:`bench.sitebench`)

``--quick`` runs smaller sizes and shorter windows (a few minutes on two cores); the
default is the full run. Profiles (py-spy) of labctl under the fan-out load, the
archive load and at start-up are recorded in separate repetitions, so sampling never
disturbs a measured window (``--no-profile`` skips them). Results go to
``bench/results/<UTC time>.json`` and ``bench/results/latest.json``; ``--report FILE``
prints the tables of a saved run.

Everything runs on loopback; every process the run starts is stopped when it ends.
The machine should be otherwise idle: each window records the load of other processes
("other load" in the tables), and ``--wait-quiet`` waits for the machine to calm down
before each measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import archive, fanout, history, loginflood, profiling, report, roundtrip, scale, sitebench
from bench.env import wait_quiet
from bench.machine import describe

RESULTS = Path(__file__).resolve().parent / "results"
SCENARIOS = ("fanout", "roundtrip", "archive", "scale", "history", "loginflood", "site")


@dataclass
class Plan:
    """Sizes and durations of one run."""

    sizes: list[int] = field(default_factory=lambda: [100, 1000, 10_000])
    clients: list[int] = field(default_factory=lambda: [1, 20])
    protocols: list[str] = field(default_factory=lambda: ["ca", "opcua"])
    rate: float = 10_000
    rate_many: float = 1_000
    load_rate: float = 2_000
    """A fan-out load labctl carries (1 000 PVs, one CA client): archiving and round trips run beside it."""
    interval_ms: float = 100.0
    duration_s: float = 4.0
    warmup_s: float = 1.5
    rt_writes: int = 200
    rt_pvs: int = 1000
    rt_repeat: int = 3
    """Rounds of the write round trip (every server, every load); the targets need each round met."""
    archive_duration_s: float = 10.0
    feed_sqlite: float = 60_000
    feed_timescaledb: float = 120_000
    scale_sizes: list[int] = field(default_factory=lambda: [10_000, 100_000])
    history_days_one: float = 30
    history_pvs: int = 100
    history_days_many: float = 1
    history_repeat: int = 5
    history_raw_repeat: int = 1
    profiles: list[str] = field(default_factory=lambda: ["fanout-ca", "fanout-opcua", "archive", "startup"])
    backends: list[str] = field(default_factory=lambda: ["sqlite", "timescaledb"])
    flood_measure_s: float = 5.0
    """Seconds of CA gets, then of OPC UA reads, idle and under the login flood."""
    flooders: int = 4
    site_servers: int = 4
    site_pvs: int = 25_000
    """PVs of each server of the site; the single server it is compared with has servers x pvs."""
    site_rate: float = 20_000
    """Total updates/s through ``Database.post``, spread evenly over the site's servers."""
    site_duration_s: float = 10.0


QUICK = dict(
    sizes=[100, 1000],
    duration_s=2.0,
    warmup_s=1.0,
    rt_writes=50,
    rt_repeat=1,
    archive_duration_s=3.0,
    scale_sizes=[10_000],
    history_days_many=1 / 24,
    history_repeat=3,
    history_raw_repeat=1,
    profiles=["fanout-ca", "fanout-opcua"],
    flood_measure_s=2.0,
    site_pvs=2_500,
    site_duration_s=3.0,
)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, Plan]:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small sizes, short windows: a few minutes")
    p.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated scenarios of: {', '.join(SCENARIOS)}")
    p.add_argument("--sizes", type=_ints, help="fan-out PV counts, e.g. 100,1000,10000")
    p.add_argument("--clients", type=_ints, help="fan-out client counts, e.g. 1,20")
    p.add_argument("--protocols", help="ca,opcua")
    p.add_argument("--rate", type=float, help="total updates/s with one client (default 10000)")
    p.add_argument("--rate-many", type=float, help="total updates/s with many clients (default 1000)")
    p.add_argument("--duration", type=float, help="seconds of each measurement window")
    p.add_argument(
        "--repeat", type=int, help="rounds of the write round trip, for its run-to-run spread (default 3, 1 with --quick)"
    )
    p.add_argument("--scale-sizes", type=_ints, help="PV counts of the start-up scenario, e.g. 10000,100000")
    p.add_argument("--backends", help="archive/history backends: sqlite,timescaledb")
    p.add_argument("--history-days-many", type=float, help="days of data for each of the 100 PVs (default 1)")
    p.add_argument("--site-servers", type=int, help="servers of the site scenario (default 4)")
    p.add_argument("--site-pvs", type=int, help="PVs of each server of the site scenario (default 25000)")
    p.add_argument("--site-rate", type=float, help="total updates/s of the site scenario (default 20000)")
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        help="before each measurement wait up to this many seconds for the machine to be idle "
        "(0: never; default 15, 5 with --quick)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON results")
    p.add_argument("--no-latest", action="store_true", help="do not overwrite results/latest.json")
    p.add_argument("--report", type=Path, help="print the tables of a saved results file and exit")
    args = p.parse_args(argv)
    if args.wait_quiet is None:
        args.wait_quiet = 5.0 if args.quick else 15.0
    plan = Plan(**(QUICK if args.quick else {}))
    for name, attr in (
        ("sizes", "sizes"),
        ("clients", "clients"),
        ("rate", "rate"),
        ("rate_many", "rate_many"),
        ("scale_sizes", "scale_sizes"),
        ("history_days_many", "history_days_many"),
        ("site_servers", "site_servers"),
        ("site_pvs", "site_pvs"),
        ("site_rate", "site_rate"),
        ("repeat", "rt_repeat"),
    ):
        value = getattr(args, name)
        if value is not None:
            setattr(plan, attr, value)
    if args.duration is not None:
        plan.duration_s = plan.archive_duration_s = plan.site_duration_s = args.duration
    if args.protocols:
        plan.protocols = [x.strip() for x in args.protocols.split(",")]
    if args.backends:
        plan.backends = [x.strip() for x in args.backends.split(",")]
    if args.no_profile:
        plan.profiles = []
    unknown = set(args.only.split(",")) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s) {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    return args, plan


def say(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


class Run:
    """One benchmark run: the plan, the results so far, the shared resources."""

    def __init__(self, args: argparse.Namespace, plan: Plan) -> None:
        self.args = args
        self.plan = plan
        self.workdir = Path(tempfile.mkdtemp(prefix="labctl-bench-"))
        self.results: dict[str, Any] = {
            "format": 1,
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python -m bench", *sys.argv[1:]]),
            "plan": plan.__dict__,
            "machine": describe(),
            "errors": [],
            "profiles": {},
        }
        self.pg = None
        self._hash: str | None = None

    # ---- shared resources -----------------------------------------------------------------

    def password_hash(self) -> str:
        if self._hash is None:
            from labctl.server.passwords import hash_password

            from bench.site import OPERATOR_PASSWORD

            self._hash = hash_password(OPERATOR_PASSWORD)
        return self._hash

    def database_url(self, backend: str, name: str) -> str:
        """A fresh archive: a SQLite file in the work directory, or a database on the run's cluster."""
        if backend == "sqlite":
            return f"sqlite:///{self.workdir / name / 'history.sqlite'}"
        if self.pg is None:
            from tests.pg.cluster import PgCluster

            # On disk and durable (fsync on) like a production server, unlike the test clusters.
            self.pg = PgCluster(
                timescaledb=True,
                tmpdir=str(self.workdir),
                settings={"fsync": True, "full_page_writes": True, "shared_buffers": "512MB"},
            )
            self.pg.start()
            self.results["machine"]["postgresql"] = (
                self.pg.connect("postgres").execute("SHOW server_version").fetchone()[0]
            )
            self.results["machine"]["timescaledb"] = self.pg.timescaledb_version
        return self.pg.create_database(name, timescaledb=True).url

    def database_pid(self) -> int | None:
        """The process id of the run's PostgreSQL server (its backends are its children), if it runs."""
        if self.pg is None:
            return None
        try:
            return int((self.pg.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    async def quiet(self) -> dict[str, float] | None:
        """Wait (bounded) for the machine to be idle before a measurement; say if it is not."""
        if self.args.wait_quiet <= 0:
            return None
        sample = await asyncio.to_thread(wait_quiet, self.args.wait_quiet)
        if sample["busy_cores"] >= 0.3:
            say(
                f"  (machine busy: {sample['busy_cores']:.2f} cores in use by others after waiting {sample['waited_s']:.0f} s)"
            )
        return sample

    def error(self, where: str, e: BaseException) -> dict[str, str]:
        text = f"{type(e).__name__}: {e}"
        say(f"  ERROR in {where}: {text}")
        self.results["errors"].append({"where": where, "error": text, "trace": traceback.format_exc()[-4000:]})
        return {"error": text.splitlines()[0]}

    def keep_profile(self, name: str, path: Path) -> None:
        """Keep py-spy's collapsed stacks beside the results (flamegraph.pl or speedscope read them)."""
        if path.exists():
            stamp = self.results["started"].replace(":", "").replace("+00:00", "Z")
            self.args.out.mkdir(parents=True, exist_ok=True)
            target = self.args.out / f"{stamp}-{name}.folded"
            shutil.copyfile(path, target)
            self.results["profiles"][name]["stacks"] = target.name

    def close(self) -> None:
        if self.pg is not None:
            self.pg.cleanup()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- scenarios ------------------------------------------------------------------------

    async def fanout(self) -> None:
        p = self.plan
        out = self.results.setdefault("fanout", [])
        for kind, protocol, n, k, rate in fanout.cells(p.sizes, p.clients, p.rate, p.rate_many, p.protocols):
            if self.args.quick and n != (min(p.sizes) if k > 1 else max(p.sizes)):
                continue  # quick: one client on the largest size, many on the smallest
            label = f"fanout {protocol} {kind} {n} PVs x {k} @ {rate:.0f}/s"
            for attempt in (1, 2):  # a client that fails to start (a busy machine) gets one more chance
                await self.quiet()
                try:
                    cell = await fanout.run_cell(
                        kind,
                        protocol,
                        n,
                        k,
                        rate,
                        duration_s=p.duration_s,
                        warmup_s=p.warmup_s,
                        interval_ms=p.interval_ms,
                    )
                    lat = cell["latency"]
                    say(
                        f"{label}: delivered {cell['delivered_rate']:.0f}/s, p50 {lat.get('p50', 0) * 1e3:.1f} ms, "
                        f"p99 {lat.get('p99', 0) * 1e3:.1f} ms, other load {cell['load']['foreign_cores']:.2f}"
                    )
                    break
                except Exception as e:
                    cell = {
                        "scenario": "fanout",
                        "server": kind,
                        "protocol": protocol,
                        "pvs": n,
                        "clients": k,
                        "rate_offered": rate,
                        **self.error(f"{label} (attempt {attempt})", e),
                    }
            out.append(cell)

    async def roundtrip(self) -> None:
        p = self.plan
        out = self.results.setdefault("roundtrip", [])
        for round_ in range(1, p.rt_repeat + 1):
            for protocol in p.protocols:
                for kind in roundtrip.SERVERS[protocol]:
                    label = f"roundtrip {protocol} {kind}" + (f" (round {round_})" if p.rt_repeat > 1 else "")
                    await self.quiet()
                    try:
                        cell = await roundtrip.run(
                            kind,
                            protocol,
                            p.rt_pvs,
                            [p.load_rate, p.rate],
                            writes=p.rt_writes,
                            duration_s=p.duration_s,
                            warmup_s=p.warmup_s,
                            password_hash=self.password_hash(),
                        )
                        loaded = ", ".join(
                            f"at {lo['rate_offered']:.0f}/s p99 {lo['latency'].get('p99', 0) * 1e3:.1f} ms"
                            for lo in cell["loaded"]
                        )
                        say(f"{label}: idle p99 {cell['idle']['latency'].get('p99', 0) * 1e3:.1f} ms, {loaded}")
                    except Exception as e:
                        cell = {"scenario": "roundtrip", "server": kind, "protocol": protocol, **self.error(label, e)}
                    cell["round"] = round_
                    out.append(cell)

    async def archive(self) -> None:
        p = self.plan
        out = self.results.setdefault("archive", [])
        for backend in p.backends:
            label = f"archive {backend}"
            await self.quiet()
            try:
                url = self.database_url(backend, f"archive_{backend}")
                feed = p.feed_timescaledb if backend == "timescaledb" else p.feed_sqlite
                cell = await archive.run(
                    backend, url, 1000, p.load_rate, feed, duration_s=p.archive_duration_s, warmup_s=p.warmup_s
                )
                say(
                    f"{label}: sustained {cell['sustained_rate']:.0f}/s, dropped {cell['counts']['dropped']}, "
                    f"bare {cell['bare']['rows_per_s']:.0f}/s"
                )
            except Exception as e:
                cell = {"scenario": "archive", "backend": backend, **self.error(label, e)}
            out.append(cell)

    async def scale(self) -> None:
        p = self.plan
        out = self.results.setdefault("scale", [])
        files = self.results.setdefault("sitefile", [])
        for n in p.scale_sizes:
            for kind in ("labctl", "caproto", "softioc", "asyncua"):
                label = f"scale {kind} {n} PVs"
                await self.quiet()
                try:
                    cell = await scale.run_server(kind, n)
                    say(f"{label}: start-up {cell['startup_s']:.1f} s, RSS {cell['rss'] / 2**20:.0f} MiB")
                except Exception as e:
                    cell = {"scenario": "scale", "server": kind, "pvs": n, **self.error(label, e)}
                out.append(cell)
            try:
                f = await scale.run_sitefile(n)
                say(f"site file {n} PVs: yaml {f['yaml_s']:.2f} s, parse_site {f['parse_site_s']:.2f} s")
            except Exception as e:
                f = {"scenario": "sitefile", "pvs": n, **self.error(f"site file {n}", e)}
            files.append(f)

    async def history(self) -> None:
        p = self.plan
        out = self.results.setdefault("history", [])
        for backend in p.backends:
            label = f"history {backend}"
            await self.quiet()
            try:
                url = self.database_url(backend, f"history_{backend}")
                cell = await history.run(
                    backend,
                    url,
                    days_one=p.history_days_one,
                    pvs_many=p.history_pvs,
                    days_many=p.history_days_many,
                    repeat=p.history_repeat,
                    raw_repeat=p.history_raw_repeat,
                    state_dir=self.workdir / f"history_{backend}",
                )
                month = [q for q in cell["queries"] if q["query"] == "1 PV, month"]
                say(
                    f"{label}: seeded {cell['seeded_rows']} rows at {cell['seed_rows_per_s']:.0f}/s"
                    + (f", month {month[0]['rollups_median_s'] * 1e3:.0f} ms" if month else "")
                )
            except Exception as e:
                cell = {"scenario": "history", "backend_kind": backend, **self.error(label, e)}
            out.append(cell)

    async def loginflood(self) -> None:
        p = self.plan
        out = self.results.setdefault("loginflood", [])
        await self.quiet()
        try:
            cell = await loginflood.measure(p.flood_measure_s, p.flooders)
            say(
                "loginflood: "
                + ", ".join(
                    f"{what} p99 {cell['idle'][what]['p99_ms']:.1f} -> {cell['flood'][what]['p99_ms']:.1f} ms"
                    for what in ("ca_get", "opcua_read")
                )
                + f", {cell['flood_rate_per_s']:.1f} bad logins/s reached the server"
            )
        except Exception as e:
            cell = {"scenario": "loginflood", **self.error("loginflood", e)}
        out.append(cell)

    async def site(self) -> None:
        p = self.plan
        out = self.results.setdefault("site", [])
        label = f"site {p.site_servers} x {p.site_pvs} PVs @ {p.site_rate:.0f}/s"
        try:
            url_one = self.database_url("timescaledb", "site_one")
            url_site = self.database_url("timescaledb", "site_many")
            cell = await sitebench.run(
                url_one,
                url_site,
                p.site_servers,
                p.site_pvs,
                p.site_rate,
                duration_s=p.site_duration_s,
                warmup_s=p.warmup_s,
                workdir=self.workdir / "site",
                database_pid=self.database_pid(),
                settle=self.settle_site,
            )
            one, many = cell["one"], cell["site"]
            say(
                f"{label}: start-up {one['startup_s']:.1f} s (one server) / {many['startup_s']:.1f} s (site), "
                f"sustained {one['sustained_rate']:.0f} / {many['sustained_rate']:.0f} /s, "
                f"dropped {one['counts']['dropped']} / {many['counts']['dropped']}, "
                f"offered rate carried {'no' if report.site_carried(one) else 'yes'} / "
                f"{'no' if report.site_carried(many) else 'yes'}"
            )
        except Exception as e:
            cell = {
                "scenario": "site",
                "servers": p.site_servers,
                "pvs_per_server": p.site_pvs,
                "rate_offered": p.site_rate,
                **self.error(label, e),
            }
        out.append(cell)

    async def settle_site(self) -> dict[str, float] | None:
        """Before each part of the site scenario: a checkpoint (no arrangement pays for the other's WAL), then quiet."""
        if self.pg is not None:

            def checkpoint() -> None:
                with self.pg.connect("postgres") as conn:
                    conn.execute("CHECKPOINT")

            await asyncio.to_thread(checkpoint)
        return await self.quiet()

    async def profiles(self) -> None:
        p = self.plan
        if not p.profiles:
            return
        if profiling.py_spy() is None:
            self.results["errors"].append({"where": "profiles", "error": "py-spy is not installed; no profiles"})
            return
        n = 1000 if 1000 in p.sizes else p.sizes[0]
        for name in p.profiles:
            await self.quiet()
            path = self.workdir / f"{name}.txt"
            try:
                if name.startswith("fanout-"):
                    protocol = name.split("-", 1)[1]
                    cell = await fanout.run_cell(
                        "labctl",
                        protocol,
                        n,
                        1,
                        p.rate,
                        duration_s=p.duration_s,
                        warmup_s=p.warmup_s,
                        interval_ms=p.interval_ms,
                        profile=path,
                    )
                    frames = cell.pop("profile")
                    context = {
                        k: cell[k]
                        for k in (
                            "pvs",
                            "clients",
                            "rate_offered",
                            "posted_rate",
                            "delivered_rate",
                            "latency",
                            "server_cores",
                        )
                    }
                elif name == "archive":
                    url = self.database_url("sqlite", "archive_profile")
                    cell = await archive.run(
                        "sqlite",
                        url,
                        1000,
                        p.load_rate,
                        p.feed_sqlite,
                        duration_s=p.archive_duration_s,
                        warmup_s=p.warmup_s,
                        profile=path,
                    )
                    frames = cell.pop("profile")
                    context = {k: cell[k] for k in ("feed", "ingest_rate", "sustained_rate")}
                elif name == "startup":
                    frames, context = await scale.profile_startup(max(p.scale_sizes), path)
                else:
                    raise ValueError(f"unknown profile {name!r}")
                table = profiling.STARTUP if name == "startup" else profiling.SERVING
                self.results["profiles"][name] = {
                    "context": context,
                    "frames": frames,
                    "components": profiling.components(path, table),
                }
                self.keep_profile(name, path)
                say(f"profile {name}: recorded")
            except Exception as e:
                self.results["profiles"][name] = self.error(f"profile {name}", e)


async def main_async(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    run = Run(args, plan)
    t = time.monotonic()
    try:
        for name in args.only.split(","):
            say(f"== {name}")
            await getattr(run, name)()
        await run.profiles()
    finally:
        run.results["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        run.results["duration_s"] = round(time.monotonic() - t, 1)
        run.close()
    return run.results


def save(results: dict[str, Any], out: Path, latest: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stamp = results["started"].replace(":", "").replace("+0000", "Z").replace("+00:00", "Z")
    path = out / f"{stamp}.json"
    results["targets"] = report.judge(results)
    text = json.dumps(results, indent=1, default=str)
    path.write_text(text)
    if latest:
        (out / "latest.json").write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    args, plan = parse(argv)
    if args.report is not None:
        print(report.tables(json.loads(args.report.read_text())))
        return 0
    results = asyncio.run(main_async(args, plan))
    path = save(results, args.out, not args.no_latest)
    print(report.tables(results))
    print(f"\nraw numbers: {path}")
    return 1 if results["errors"] else 0
