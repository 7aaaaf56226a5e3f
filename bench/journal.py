"""The audit journal's cost and what a kill -9 loses: ``python -m bench.journal``.

Two measurements, each with its baseline in the same run:

1. **Write round trip with and without the journal.** An in-process server (historian on
   SQLite, OPC UA on loopback) and, in the same process, an OPC UA client of the library
   (user ``olga``): sequential ``put`` round trips to a soft PV, and the core's own
   ``Database.write``, in alternating blocks with the journal attached and detached
   (``db.journal = None``), so drift hits both alike; then ``CLIENTS`` clients writing
   at once (group commit: fsyncs per write).
2. **kill -9.** A ``labctl serve`` subprocess with the historian's default flush interval;
   ``CLIENTS`` clients write in a loop for ``BURST_S``; SIGKILL right after the last
   acknowledgement. Before restarting, the archive is read directly: acknowledged writes
   whose audit record it lacks (what the journal must bring back), and samples it lacks
   (the last acknowledged write's time minus the last archived sample's time per PV: the
   flush interval's loss). After the restart (the journal replayed): acknowledged writes
   still missing from the audit trail (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from labctl.clients.session import connect
from labctl.ioc.types import Identity
from labctl.server.app import Server
from labctl.server.passwords import hash_password
from labctl.server.site import parse_site

PASSWORD = "olga-pw"
CLIENTS = 4
BURST_S = 2.0
OP = Identity("olga", frozenset({"operator"}), "bench", "bench")


def site_text(state_dir: Path | None, password_hash: str, port: int | None) -> str:
    state = f'state_dir: "{state_dir}", ' if state_dir else ""
    opcua = f"{{host: 127.0.0.1, port: {port}, trust: auto}}" if port is not None else "{host: 127.0.0.1, trust: auto}"
    return f"""
site: journal_bench
server: {{{state}opcua: {opcua}, ca: {{enabled: false}}}}
users:
  - {{name: olga, roles: [operator], password_hash: "{password_hash}"}}
resources: [{{name: lab, lockable: false}}]
pvs:
""" + "".join(
        f'  - {{name: "LAB:SP{i}", type: float64, writable: true, initial: -1.0, resource: lab, autosave: false}}\n'
        for i in range(CLIENTS)
    )


def pct(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "n": len(xs),
        "p50_ms": round(1000 * statistics.median(xs), 3),
        "p99_ms": round(1000 * xs[min(len(xs) - 1, int(0.99 * len(xs)))], 3),
    }


async def latency(writes: int, blocks: int, password_hash: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="labctl-journal-bench-") as tmp:
        server = Server(parse_site(site_text(Path(tmp), password_hash, 0), "bench.yaml"))
        async with server:
            journal = server.db.journal
            assert journal is not None
            port = server.service("opcua").port  # type: ignore[attr-defined]
            url = f"opc.tcp://127.0.0.1:{port}"
            wire: dict[bool, list[float]] = {True: [], False: []}
            core: dict[bool, list[float]] = {True: [], False: []}
            async with await connect(url, "olga", PASSWORD) as s:
                for _ in range(20):  # warm up
                    await s.put("LAB:SP0", 0.0)
                k = 0
                for b in range(2 * blocks):
                    on = b % 2 == 0
                    server.db.journal = journal if on else None
                    for _ in range(writes // blocks):
                        k += 1
                        t = time.perf_counter()
                        await s.put("LAB:SP0", float(k))
                        wire[on].append(time.perf_counter() - t)
                        t = time.perf_counter()
                        await server.db.write("LAB:SP1", float(k), OP)
                        core[on].append(time.perf_counter() - t)
                server.db.journal = journal
            # concurrent writers: group commit
            sessions = [await connect(url, "olga", PASSWORD) for _ in range(CLIENTS)]
            try:
                conc: list[float] = []
                before_b, before_r = journal.batches, journal.records  # type: ignore[attr-defined]

                async def writer(i: int, s) -> None:
                    for k in range(writes // CLIENTS):
                        t = time.perf_counter()
                        await s.put(f"LAB:SP{i}", float(k))
                        conc.append(time.perf_counter() - t)

                t0 = time.perf_counter()
                await asyncio.gather(*(writer(i, s) for i, s in enumerate(sessions)))
                elapsed = time.perf_counter() - t0
                batches = journal.batches - before_b  # type: ignore[attr-defined]
                records = journal.records - before_r  # type: ignore[attr-defined]
            finally:
                for s in sessions:
                    await s.close()
    return {
        "opcua_put_with_journal": pct(wire[True]),
        "opcua_put_without_journal": pct(wire[False]),
        "core_write_with_journal": pct(core[True]),
        "core_write_without_journal": pct(core[False]),
        f"opcua_put_{CLIENTS}_clients_with_journal": {
            **pct(conc), "writes_per_s": round(len(conc) / elapsed), "records_per_fsync": round(records / max(batches, 1), 2),
        },
    }  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def kill9(password_hash: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="labctl-journal-kill-") as tmp:
        site = Path(tmp) / "site.yaml"
        site.write_text(site_text(None, password_hash, None))
        state = Path(tmp) / "var"

        def serve() -> tuple[subprocess.Popen, str]:
            port = free_port()
            proc = subprocess.Popen(
                [sys.executable, "-m", "labctl", "serve", str(site), "--state-dir", str(state), "--opcua-port", str(port), "--no-ca"],
                cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert proc.stderr is not None
            for line in proc.stderr:
                if "ready;" in line:
                    break
            else:
                raise RuntimeError("the server did not start")
            # keep reading its log, or a full pipe stops the server
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, f"opc.tcp://127.0.0.1:{port}"

        proc, url = serve()
        acked: list[tuple[str, float, float]] = []
        stop_at = time.monotonic() + BURST_S

        async def writer(i: int, s) -> None:
            k = 0
            while time.monotonic() < stop_at:
                k += 1
                await s.put(f"LAB:SP{i}", float(k))
                acked.append((f"LAB:SP{i}", float(k), time.time()))

        try:
            sessions = [await connect(url, "olga", PASSWORD) for _ in range(CLIENTS)]
            await asyncio.gather(*(writer(i, s) for i, s in enumerate(sessions)))
        finally:
            proc.send_signal(signal.SIGKILL)
        killed = time.time()
        proc.wait()
        for s in sessions:
            try:
                await asyncio.wait_for(s.close(), 2)
            except Exception:  # the server is dead: the session cannot close cleanly
                pass
        con = sqlite3.connect(state / "history.sqlite")
        audited = {(t, json.loads(v)) for t, v in con.execute("SELECT target, new_value FROM audit_event WHERE action = 'write'")}
        last_sample = dict(
            con.execute("SELECT p.name, max(s.time_us) FROM sample s JOIN pv p ON p.id = s.pv_id GROUP BY p.name")
        )
        archived = {
            (n, v) for n, v in con.execute("SELECT p.name, s.float_val FROM sample s JOIN pv p ON p.id = s.pv_id")
        }
        con.close()
        journal_bytes = sum(p.stat().st_size for p in (state / "journal").glob("audit-*.jsonl"))
        not_archived_audit = [a for a in acked if (a[0], a[1]) not in audited]
        not_archived_samples = [a for a in acked if (a[0], a[1]) not in archived]
        last_ack = {n: max(t for m, _, t in acked if m == n) for n in {a[0] for a in acked}}
        windows = [last_ack[n] - last_sample.get(n, 0) / 1e6 for n in last_ack]

        proc, url = serve()
        try:
            async with await connect(url, "olga", PASSWORD) as s:
                trail = await s.audit(killed - 3600)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        after = {(r["target"], r["new"]) for r in trail if r["action"] == "write" and r["accepted"]}
        missing_after = [a for a in acked if (a[0], a[1]) not in after]
    return {
        "acknowledged_writes": len(acked),
        "audit_records_not_in_archive_at_kill": len(not_archived_audit),
        "journal_bytes_at_kill": journal_bytes,
        "samples_not_in_archive_at_kill": len(not_archived_samples),
        "samples_lost_window_s_max": round(max(windows), 3),
        "audit_records_missing_after_restart": len(missing_after),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=2000, help="sequential writes per mode (default 2000)")
    parser.add_argument("--kills", type=int, default=3, help="kill -9 trials (default 3)")
    args = parser.parse_args()
    password_hash = hash_password(PASSWORD)
    print(json.dumps(await latency(args.writes, 10, password_hash), indent=1))
    for i in range(args.kills):
        print(f"kill -9 trial {i + 1}:", json.dumps(await kill9(password_hash)))


if __name__ == "__main__":
    asyncio.run(main())
