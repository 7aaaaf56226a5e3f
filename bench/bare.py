"""The archiving baseline: the same rows written with no historian around them.

:func:`bare_insert` writes ``rows`` sample rows shaped exactly like the historian's
(``pv_id, time_us, seq, float_val, num_val, str_val, array_val, severity, status,
received_us, inserted_us``) into a scratch table made like ``sample`` -- the same
columns, key and, on TimescaleDB, a hypertable with the same one-day chunks -- in
batches of ``batch`` rows, one transaction each: PostgreSQL by ``COPY ... FROM STDIN
(FORMAT BINARY)``, SQLite by ``executemany`` of a plain ``INSERT``. The rows are built
before the clock starts; what is timed is the database taking them. The difference to
the historian's own rate is what labctl adds: capture on the loop, the ingest thread,
rollup cells, the GIL shared with a serving process.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

SCRATCH = "bench_bare"
_PG_TYPES = ["int4", "int8", "int2", "float8", "int8", "text", "float8[]", "int2", "int2", "int8", "int8"]
_COLUMNS = "pv_id, time_us, seq, float_val, num_val, str_val, array_val, severity, status, received_us, inserted_us"


def make_rows(n: int, pvs: int = 1000, start_us: int | None = None) -> list[tuple]:
    """``n`` float samples over ``pvs`` PV ids (1..pvs), 1 us apart, as the historian writes them."""
    t = start_us if start_us is not None else time.time_ns() // 1000
    return [(1 + i % pvs, t + i, 0, float(i), None, None, None, 0, 0, t + i, t + i) for i in range(n)]


def bare_insert(engine: Engine, kind: str, rows: int, batch: int) -> dict[str, Any]:
    """Write ``rows`` rows into the scratch table; rows per second and the count read back."""
    data = make_rows(rows)
    with engine.begin() as conn:
        if kind == "postgresql":
            conn.execute(text(f"DROP TABLE IF EXISTS {SCRATCH}"))
            conn.execute(
                text(f"CREATE TABLE {SCRATCH} (LIKE sample INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES)")
            )
            hyper = conn.execute(text("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'")).scalar_one()
            if hyper:
                conn.execute(
                    text(
                        f"SELECT create_hypertable('{SCRATCH}', 'time_us', chunk_time_interval => 86400000000, "
                        "create_default_indexes => false)"
                    )
                )
        else:
            ddl = conn.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'sample'"
            ).scalar_one()
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {SCRATCH}")
            conn.exec_driver_sql(ddl.replace("sample", SCRATCH, 1))
    t = time.perf_counter()
    for k in range(0, len(data), batch):
        chunk = data[k : k + batch]
        with engine.begin() as conn:
            raw = conn.connection.driver_connection
            if kind == "postgresql":
                with raw.cursor() as cur, cur.copy(f"COPY {SCRATCH} ({_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(_PG_TYPES)
                    for r in chunk:
                        copy.write_row(r)
            else:
                marks = ", ".join("?" * 11)
                raw.executemany(f"INSERT INTO {SCRATCH} ({_COLUMNS}) VALUES ({marks})", chunk)
    seconds = time.perf_counter() - t
    with engine.begin() as conn:
        counted = conn.execute(text(f"SELECT count(*) FROM {SCRATCH}")).scalar_one()
        conn.execute(text(f"DROP TABLE {SCRATCH}"))
    return {
        "method": "COPY binary" if kind == "postgresql" else "executemany",
        "rows": rows,
        "batch": batch,
        "seconds": seconds,
        "rows_per_s": rows / seconds if seconds else 0.0,
        "counted": counted,
    }
