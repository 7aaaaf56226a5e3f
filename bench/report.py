"""Tables of a run's results, and its results judged against the targets (README, "Benchmarks").

:func:`tables` renders every scenario of a result dictionary as Markdown tables (they read
as well in a terminal); :func:`judge` compares the figures with the targets, each against
the baseline measured in the same run where the target is relative, and says by how much
a missed target is missed. ``python -m bench --report FILE.json`` prints both for a saved
run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from bench.stats import ms

#: Relative targets count as met within this fraction (the measurement window's edges
#: make delivered rates of servers that deliver everything differ by about this much).
RATE_TOLERANCE = 0.02
#: OPC UA fan-out p99 target: the publishing interval plus this.
OPCUA_FANOUT_MARGIN_S = 0.010
#: Write round trip p99 target: at most this many times the raw library's p99 in the same round, or this floor.
RT_FACTOR, RT_FLOOR_S = 2.0, 0.010
#: The raw library each protocol's write round trip is held against.
RT_BASELINE = {"ca": "softioc", "opcua": "asyncua"}
GiB = 2**30
MiB = 2**20


def _table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[("-" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def _k(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1000:.1f}k" if x >= 10_000 else f"{x:.0f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def fanout_table(cells: list[dict]) -> str:
    rows = []
    for c in cells:
        if "error" in c:
            rows.append(
                [
                    c["protocol"],
                    c["pvs"],
                    c["clients"],
                    _k(c.get("rate_offered")),
                    c["server"],
                    "ERROR: " + c["error"][:60],
                    *[""] * 8,
                ]
            )
            continue
        lat = c["latency"]
        rows.append(
            [
                c["protocol"] + (f" ({c['interval_ms']:.0f} ms)" if c.get("interval_ms") else ""),
                c["pvs"],
                c["clients"],
                _k(c["rate_offered"]),
                c["server"],
                _k(c["posted_rate"]),
                _k(c["delivered_rate"]),
                _k(c["per_client_rate"]),
                _pct(c["coverage"]),
                ms(lat.get("p50")),
                ms(lat.get("p99")),
                f"{c['server_cores']:.2f}",
                f"{c['clients_cores']:.2f}",
                f"{c['load']['foreign_cores']:.2f}",
            ]
        )
    return _table(
        [
            "protocol",
            "PVs",
            "clients",
            "offered/s",
            "server",
            "posted/s",
            "delivered/s",
            "per client/s",
            "coverage",
            "p50 ms",
            "p99 ms",
            "server cores",
            "client cores",
            "other load",
        ],
        rows,
    )


def roundtrip_table(cells: list[dict]) -> str:
    rows = []
    for c in cells:
        r = c.get("round", 1)
        if "error" in c:
            rows.append([r, c["protocol"], c["server"], "ERROR: " + c["error"][:60], "", "", "", "", "", ""])
            continue
        i = c["idle"]
        rows.append(
            [
                r,
                c["protocol"],
                c["server"],
                "idle",
                ms(i["latency"].get("p50")),
                ms(i["latency"].get("p99")),
                i["latency"].get("n", 0),
                i["failures"],
                "-",
                "-",
            ]
        )
        for lo in c["loaded"]:
            rows.append(
                [
                    r,
                    c["protocol"],
                    c["server"],
                    f"fan-out {_k(lo['rate_offered'])}/s",
                    ms(lo["latency"].get("p50")),
                    ms(lo["latency"].get("p99")),
                    lo["latency"].get("n", 0),
                    lo["failures"],
                    _k(lo["load"]["posted_rate"]),
                    ms(lo["load"]["latency"].get("p99")),
                ]
            )
    return _table(
        ["round", "protocol", "server", "load", "p50 ms", "p99 ms", "writes", "failed", "load posted/s", "load fan-out p99 ms"],
        rows,
    )


def archive_table(cells: list[dict]) -> str:
    rows = []
    for c in cells:
        if "error" in c:
            rows.append([c["backend"], "ERROR: " + c["error"][:70], *[""] * 8])
            continue
        n = c["counts"]
        rows.append(
            [
                c["backend"],
                f"{_k(c['feed_offered'])} -> {_k(c['feed']['posted_rate'])}",
                _k(c["ingest_rate"]),
                _k(c["sustained_rate"]),
                f"{c['drain_s']:.1f}",
                f"{_k(c['bare']['rows_per_s'])} ({c['bare']['method']})",
                n["expected"],
                n["rows"],
                n["dropped"],
                n["lost"],
                f"{_k(c['fanout']['posted_rate'])} / p99 {ms(c['fanout']['latency'].get('p99'))}",
            ]
        )
    return _table(
        [
            "backend",
            "feed offered -> put/s",
            "ingest/s (window)",
            "sustained/s",
            "drain s",
            "bare rows/s",
            "samples in",
            "rows archived",
            "dropped",
            "lost",
            "fan-out posted/s, p99 ms",
        ],
        rows,
    )


def scale_table(cells: list[dict], sitefile: list[dict]) -> str:
    rows = []
    for c in cells:
        if "error" in c:
            rows.append([c["server"], c["pvs"], "ERROR: " + c["error"][:60], "", "", "", ""])
            continue
        phases = c.get("phases") or {}
        slow = sorted(((v, k) for k, v in phases.items() if not k.startswith("before")), reverse=True)[:3]
        probes = ", ".join(f"{p} {v['first_value_s']:.1f} s" for p, v in c.get("answered", {}).items())
        rows.append(
            [
                c["server"],
                c["pvs"],
                f"{c['startup_s']:.1f}",
                f"{c['rss'] / MiB:.0f}",
                f"{c['peak_rss'] / MiB:.0f}",
                ", ".join(f"{k} {v:.1f}" for v, k in slow),
                probes,
            ]
        )
    out = _table(["server", "PVs", "start-up s", "RSS MiB", "peak MiB", "slowest phases (s)", "first value"], rows)
    if sitefile:
        srows = []
        for s in sitefile:
            if "error" in s:
                continue
            srows.append(
                [
                    s["pvs"],
                    "one numbered entry (range)",
                    f"{s['numbered_bytes'] / 1024:.1f} KiB",
                    f"{s['numbered_parse_site_s']:.2f}",
                ]
            )
            srows.append([s["pvs"], "listed one by one", f"{s['bytes'] / MiB:.1f} MiB", f"{s['parse_site_s']:.2f}"])
        out += (
            "\n\nReading the site file (labctl's start-up above reads the numbered form; parse_site: YAML, "
            "schema and cross-checks):\n\n" + _table(["PVs", "site file", "size", "parse_site s"], srows)
        )
    return out


def history_table(cells: list[dict]) -> str:
    rows = []
    for c in cells:
        if "error" in c:
            rows.append([c["backend_kind"], "ERROR: " + c["error"][:70], "", "", "", "", "", ""])
            continue
        for q in c["queries"]:
            rows.append(
                [
                    c["backend_kind"],
                    q["query"],
                    f"{q['interval_s']} s",
                    q["buckets"],
                    q["samples"],
                    ms(q["rollups_median_s"]),
                    ms(q["rollups_first_s"]),
                    ms(q["raw_median_s"]),
                    "yes" if q["agree"] else "NO",
                ]
            )
    out = _table(
        [
            "backend",
            "query",
            "bucket",
            "buckets",
            "samples",
            "labctl ms (median)",
            "first ms",
            "raw rows ms (baseline)",
            "agree",
        ],
        rows,
    )
    seeds = [
        f"{c['backend_kind']}: {c['seeded_rows']} rows in {c['seed_s']:.0f} s ({_k(c['seed_rows_per_s'])} rows/s, "
        f"{(c['database_bytes'] or 0) / MiB:.0f} MiB)"
        for c in cells
        if "error" not in c
    ]
    return out + ("\n\nSeeded through the historian's bulk path: " + "; ".join(seeds) if seeds else "")


def loginflood_table(cells: list[dict]) -> str:
    rows = []
    for c in cells:
        if "error" in c:
            rows.append(["ERROR: " + c["error"][:60], "", "", "", "", ""])
            continue
        for what, label in (("ca_get", "CA get"), ("opcua_read", "OPC UA read")):
            i, f = c["idle"][what], c["flood"][what]
            rows.append(
                [label, f"{i['p50_ms']:.2f}", f"{i['p99_ms']:.2f}", f"{f['p50_ms']:.2f}", f"{f['p99_ms']:.2f}", _ratio(f["p99_ms"], i["p99_ms"])]
            )
        rows.append([f"bad logins reaching the server ({c['flooders']} flooders)", "", "", "", f"{c['flood_rate_per_s']:.1f}/s", ""])
    return _table(["operation", "idle p50 ms", "idle p99 ms", "flood p50 ms", "flood p99 ms", "p99 flood/idle"], rows)


def _slowest(phases: dict[str, float] | None, n: int = 3) -> str:
    """The ``n`` longest start-up phases, longest first."""
    slow = sorted(((v, k) for k, v in (phases or {}).items() if not k.startswith("before")), reverse=True)[:n]
    return ", ".join(f"{k} {v:.1f}" for v, k in slow) or "-"


def site_carried(a: dict) -> str | None:
    """Whether an arrangement carried the offered rate: None if it did, else where it fell short.

    Short of posting: the pacers skipped updates (the servers' loops were short of CPU).
    Short of archiving: the historians committed fewer rows per second in the window than
    were posted, leaving a backlog that the final flush wrote (counted in sustained/s).
    """
    offered, posted, ingest = a["rate_offered"], a["posted_rate"], a["ingest_rate"]
    short = []
    if posted < offered * (1 - RATE_TOLERANCE):
        short.append(f"posted {_pct(posted / offered)} of it")
    if posted and ingest < posted * (1 - RATE_TOLERANCE):
        backlog = a.get("backlog")
        short.append(
            f"committed {_pct(ingest / posted)} of the posted rate"
            + ("" if backlog is None else f" ({_k(backlog)} behind at the window's end)")
        )
    return "; ".join(short) or None


def site_table(cells: list[dict]) -> str:
    """One row per arrangement (one server, the site), then one per server; then which did not carry the offered rate."""
    rows, servers, notes = [], [], []
    for c in cells:
        if "error" in c:
            rows.append([f"{c['servers']} x {c['pvs_per_server']}", "ERROR: " + c["error"][:70], *[""] * 15])
            continue
        for label, a in (("one server", c["one"]), ("site", c["site"])):
            n = a["counts"]
            db = a["database_cores"]
            short = site_carried(a)
            if short:
                notes.append(f"{label} ({a['servers']} x {a['pvs'] // a['servers']} PVs): {short}")
            cpu, db_cpu = a.get("startup_cpu_s"), a.get("startup_database_cpu_s")
            rows.append(
                [
                    f"{a['servers']} x {a['pvs'] // a['servers']}",
                    label,
                    f"{a['startup_s']:.1f}",
                    ("-" if cpu is None else f"{cpu:.0f}") + ("" if db_cpu is None else f" / {db_cpu:.0f}"),
                    "yes" if a["registered"] else "NO",
                    f"{_k(a['rate_offered'])} -> {_k(a['posted_rate'])}",
                    "NO" if short else "yes",
                    _k(a["ingest_rate"]),
                    _k(a["sustained_rate"]),
                    f"{a['drain_s']:.1f}",
                    n["posted"],
                    n["rows"],
                    n["dropped"],
                    n["lost"],
                    f"{a['rss_total_ready'] / MiB:.0f} -> {a['rss_total_end'] / MiB:.0f}",
                    f"{a['servers_cores']:.2f} / " + ("-" if db is None else f"{db:.2f}"),
                    ("" if "startup_load" not in a else f"{a['startup_load']['foreign_cores']:.2f} / ")
                    + f"{a['load']['foreign_cores']:.2f}",
                ]
            )
            for v in a["per_server"]:
                servers.append(
                    [
                        label,
                        v["name"],
                        v["pvs"],
                        f"{v['ready_s']:.1f}",
                        f"{v['startup_cpu_s']:.0f}" if "startup_cpu_s" in v else "-",
                        _k(v["posted_rate"]),
                        v["posted"],
                        v["rows"],
                        v["dropped"],
                        v["lost"],
                        f"{v['rss_ready'] / MiB:.0f}",
                        f"{v['rss_end'] / MiB:.0f}",
                        f"{v['cores']:.2f}",
                        _slowest(v.get("phases")),
                    ]
                )
    out = _table(
        [
            "servers x PVs",
            "arrangement",
            "start-up s",
            "start-up CPU s: servers / database",
            "registered",
            "offered -> posted/s",
            "carried",
            "ingest/s (window)",
            "sustained/s",
            "drain s",
            "samples posted",
            "rows archived",
            "dropped",
            "lost",
            "RSS MiB, all servers (ready -> end)",
            "cores: servers / database",
            "other load: start-up / window",
        ],
        rows,
    )
    if notes:
        out += (
            "\n\nThe offered rate was not carried (skipped updates are not dropped samples; sustained/s "
            "counts what was posted until its last row was committed):\n\n" + "\n".join(f"- {x}" for x in notes)
        )
    if servers:
        out += "\n\nPer server:\n\n" + _table(
            ["arrangement", "server", "PVs", "ready s", "start-up CPU s", "posted/s", "posted", "rows", "dropped",
             "lost", "RSS MiB ready", "RSS MiB end", "cores", "slowest start-up phases (s)"],
            servers,
        )  # fmt: skip
    return out


def profiles_text(profiles: dict) -> str:
    """Per profile: what ran, where each thread's time went, and its busiest functions."""
    parts = []
    for name, p in profiles.items():
        if "error" in p:
            parts.append(f"**{name}**: ERROR {p['error']}")
            continue
        ctx = p.get("context", {})
        lat = ctx.get("latency") or {}
        head = ", ".join(
            f"{k.replace('_', ' ')} " + (f"{v:.2f}" if "cores" in k else _k(v) if isinstance(v, float) else str(v))
            for k, v in ctx.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        )
        if lat:
            head += f", p50 {ms(lat.get('p50'))} ms, p99 {ms(lat.get('p99'))} ms"
        lines = [f"**{name}** ({head})" if head else f"**{name}**"]
        frames = p.get("frames", {}).get("threads", {})
        comps_by_thread = p.get("components") or {t: {} for t in frames}
        for thread, comps in comps_by_thread.items():
            share = frames.get(thread, {}).get("share_of_busy")
            lines.append(
                f"- thread {thread}"
                + (f" ({share * 100:.0f} % of busy samples)" if share is not None else "")
                + (": " + "; ".join(f"{c} {v:.0f} %" for c, v in comps.items()) if comps else "")
            )
            top = frames.get(thread, {}).get("self", [])[:6]
            if top:
                lines.append("  - busiest functions (self): " + "; ".join(f"{f} {v:.0f} %" for f, v in top))
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def tables(results: dict) -> str:
    """Every scenario of ``results`` as Markdown tables."""
    parts = []
    m = results.get("machine", {})
    if m:
        parts.append(
            f"Machine: {m['nproc']} cores ({m['cpu_model']}), {m['memory_bytes'] / GiB:.1f} GiB, "
            f"Python {m['python']}, kernel {m['kernel']}"
        )
    sections = [
        ("Fan-out", "fanout", lambda r: fanout_table(r["fanout"])),
        ("Write round trip", "roundtrip", lambda r: roundtrip_table(r["roundtrip"])),
        ("Archiving", "archive", lambda r: archive_table(r["archive"])),
        ("Scale", "scale", lambda r: scale_table(r["scale"], r.get("sitefile", []))),
        ("History", "history", lambda r: history_table(r["history"])),
        ("Login flood", "loginflood", lambda r: loginflood_table(r["loginflood"])),
        ("A site of several servers", "site", lambda r: site_table(r["site"])),
        ("Profiles (py-spy, separate repetitions)", "profiles", lambda r: profiles_text(r["profiles"])),
    ]
    for title, key, render in sections:
        if results.get(key):
            parts.append(f"### {title}\n\n{render(results)}")
    verdicts = judge(results)
    if verdicts:
        parts.append(
            "### Targets\n\n"
            + _table(
                ["target", "measured", "required", "met", "by"],
                [[v["target"], v["measured"], v["required"], "yes" if v["met"] else "NO", v["by"]] for v in verdicts],
            )
        )
    return "\n\n".join(parts)


def _ratio(measured: float, required: float) -> str:
    if not required:
        return "-"
    return f"{measured / required:.2f}x"


def roundtrip_targets(cells: list[dict]) -> list[dict]:
    """Write round trip p99 <= max(2 x the raw library's p99 in the same round, 10 ms), per protocol and load.

    One row per protocol and load over every round: each round's p99 and limit, the spread
    of labctl's p99 over the rounds, met only if every round met it, and the worst ratio.
    """
    phases: dict[tuple[str, str], dict[int, dict[str, float | None]]] = {}
    for c in cells:
        if c["server"] not in ("labctl", RT_BASELINE.get(c["protocol"])):
            continue
        role = "labctl" if c["server"] == "labctl" else "raw"
        if "error" in c:
            for phase in ("idle",):
                phases.setdefault((c["protocol"], phase), {}).setdefault(c.get("round", 1), {})[role] = None
            continue
        for phase, r in [("idle", c["idle"]), *((f"{_k(lo['rate_offered'])}/s", lo) for lo in c["loaded"])]:
            rounds = phases.setdefault((c["protocol"], phase), {})
            rounds.setdefault(c.get("round", 1), {})[role] = r["latency"].get("p99")
    out = []
    for (protocol, phase), rounds in phases.items():
        got, limits, ratios = [], [], []
        for _, r in sorted(rounds.items()):
            p99, raw = r.get("labctl"), r.get("raw")
            limit = max(RT_FACTOR * raw, RT_FLOOR_S) if raw is not None else RT_FLOOR_S
            got.append(p99)
            limits.append(limit)
            ratios.append(p99 / limit if p99 is not None else float("inf"))
        done = [g for g in got if g is not None]
        spread = f" (spread {ms(min(done))}-{ms(max(done))})" if len(done) > 1 else ""
        load = "idle" if phase == "idle" else f"under {phase} fan-out"
        out.append(
            {
                "target": f"write round trip {protocol.upper() if protocol == 'ca' else 'OPC UA'} {load}: p99 "
                f"<= max({RT_FACTOR:g} x {RT_BASELINE[protocol]}, {ms(RT_FLOOR_S)} ms)",
                "measured": " / ".join(ms(g) if g is not None else "failed" for g in got) + " ms" + spread,
                "required": " / ".join(ms(x) for x in limits) + " ms",
                "met": all(x <= 1.0 for x in ratios),
                "by": f"{max(ratios):.2f}x" if ratios and max(ratios) != float("inf") else "-",
            }
        )
    return out


def judge(results: dict) -> list[dict]:
    """Each target (README, "Benchmarks") against this run's figures (relative ones against this run's baselines)."""
    out: list[dict] = []

    def add(target: str, measured: str, required: str, met: bool, by: str) -> None:
        out.append({"target": target, "measured": measured, "required": required, "met": met, "by": by})

    cells = [c for c in results.get("fanout", []) if "error" not in c]
    by_key: dict[tuple, dict[str, dict]] = {}
    for c in cells:
        by_key.setdefault((c["protocol"], c["pvs"], c["clients"]), {})[c["server"]] = c
    for (protocol, n, k), servers in sorted(by_key.items()):
        lab = servers.get("labctl")
        if lab is None:
            continue
        base_name = "softioc" if protocol == "ca" else "asyncua"
        base = servers.get(base_name)
        p99 = lab["latency"].get("p99")
        limit = 0.020 if protocol == "ca" else (lab.get("interval_ms") or 100) / 1000 + OPCUA_FANOUT_MARGIN_S
        where = (
            f"{protocol.upper() if protocol == 'ca' else 'OPC UA'} fan-out {n} PVs x {k} client{'s' if k > 1 else ''}"
        )
        if base is not None:
            need = base["delivered_rate"]
            got = lab["delivered_rate"]
            add(
                f"{where}: delivered/s >= {base_name}",
                _k(got),
                _k(need),
                got >= need * (1 - RATE_TOLERANCE),
                _ratio(got, need),
            )
        if p99 is not None:
            add(f"{where}: p99", f"{ms(p99)} ms", f"<= {ms(limit)} ms", p99 <= limit, _ratio(p99, limit))
    for c in results.get("archive", []):
        if "error" in c:
            continue
        need = 100_000 if c["backend"] == "timescaledb" else 50_000
        add(
            f"archiving into {c['backend']}: sustained samples/s",
            _k(c["sustained_rate"]),
            f">= {_k(need)}",
            c["sustained_rate"] >= need,
            _ratio(c["sustained_rate"], need),
        )
        n = c["counts"]
        add(
            f"archiving into {c['backend']}: none dropped",
            f"{n['dropped']} of {n['expected']}",
            "0",
            n["dropped"] == 0 and n["lost"] == 0,
            f"{n['dropped']} dropped, {n['lost']} lost",
        )
    for c in results.get("scale", []):
        if "error" in c or c["server"] != "labctl" or c["pvs"] < 100_000:
            continue
        add(
            f"start-up with {c['pvs']} PVs, both protocols",
            f"{c['startup_s']:.1f} s",
            "< 10 s",
            c["startup_s"] < 10,
            _ratio(c["startup_s"], 10),
        )
        add(
            f"resident memory with {c['pvs']} PVs",
            f"{c['rss'] / MiB:.0f} MiB",
            "< 1024 MiB",
            c["rss"] < GiB,
            _ratio(c["rss"], GiB),
        )
    for row in roundtrip_targets(results.get("roundtrip", [])):
        add(**row)
    for c in results.get("history", []):
        if "error" in c:
            continue
        for q in c["queries"]:
            if q["query"] == "1 PV, month":
                t = q["rollups_median_s"]
                add(
                    f"history {c['backend_kind']}: 1 PV, month downsampled",
                    f"{ms(t)} ms",
                    "< 100 ms",
                    t < 0.1,
                    _ratio(t, 0.1),
                )
    for c in results.get("loginflood", []):
        if "error" in c:
            continue
        for what, label in (("ca_get", "CA get"), ("opcua_read", "OPC UA read")):
            idle, flood = c["idle"][what]["p99_ms"], c["flood"][what]["p99_ms"]
            add(
                f"{label} under a login flood: p99",
                f"{flood:.2f} ms",
                f"<= 2 x idle ({2 * idle:.2f} ms)",
                flood <= 2 * idle,
                _ratio(flood, 2 * idle),
            )
    for c in results.get("site", []):
        if "error" in c:
            continue
        one, many = c["one"], c["site"]
        where = f"site of {c['servers']} servers x {c['pvs_per_server']} PVs"
        for label, a in ((f"one server of {c['pvs']} PVs", one), (where, many)):
            n = a["counts"]
            add(
                f"{label}: none dropped",
                f"{n['dropped']} of {n['posted']}",
                "0",
                n["dropped"] == 0 and n["lost"] == 0,
                f"{n['dropped']} dropped, {n['lost']} lost",
            )
        add(
            f"{where}: every server up, every PV claimed once",
            "yes" if many["registered"] else "no",
            "yes",
            many["registered"],
            "-",
        )
        add(
            f"{where}: sustained samples/s >= one server",
            _k(many["sustained_rate"]),
            _k(one["sustained_rate"]),
            many["sustained_rate"] >= one["sustained_rate"] * (1 - RATE_TOLERANCE),
            _ratio(many["sustained_rate"], one["sustained_rate"]),
        )
    return out
