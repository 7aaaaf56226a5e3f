"""The jobs of a site's other servers, mirrored from the shared database into this server's job manager.

Theory of operation. A server runs and restores only its own jobs; the others' are
records in the same ``job``, ``job_log`` and ``job_result`` tables. So that listing jobs
and reading a job's results work through any server of the site (``labctl jobs``,
``labctl job ID``: the protocols answer from the job manager, synchronously),
:class:`SiteJobs` reads the other servers' jobs every ``refresh_s`` and hands them to
:meth:`labctl.ioc.jobs.JobManager.set_others` as read-only records.

Each reading is one query for the job rows of the other servers (the newest
:data:`MIRRORED` of them) and, for the jobs whose row changed since the last reading
(every state change and log line rewrites the row), one query each for their log lines
and results *after* those already mirrored (both are append-only). The queries run on the
historian's query threads; a database that is away leaves the last mirror in place
(logged once) until it returns. A job of another server shows here within ``refresh_s``
of being archived there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from labctl.ioc.jobs import Job, JobManager
from labctl.server.archive import HistorianUnavailable
from labctl.server.historian.records import job_of
from labctl.server.historian.schema import job, job_log, job_result
from sqlalchemy import select, text
from sqlalchemy.engine import Connection

from labctl.supervision import Supervisor

if TYPE_CHECKING:
    from labctl.server.historian.service import Historian

log = logging.getLogger(__name__)

#: At most this many of the other servers' jobs are mirrored (the newest).
MIRRORED = 10_000


@dataclass
class _Mirrored:
    row: tuple
    logs: list[tuple] = field(default_factory=list)
    results: list[tuple] = field(default_factory=list)


@dataclass
class Reading:
    """What one reading of the database found: job rows, and log lines and results after those already mirrored."""

    rows: list[tuple]
    logs: dict[int, list[tuple]]
    results: dict[int, list[tuple]]


def read_others(conn: Connection, me: str, known: dict[int, tuple[tuple, int, int]], limit: int = MIRRORED) -> Reading:
    """The newest ``limit`` jobs of servers other than ``me``; new log lines and results of those that changed.

    ``known``: job id -> (its row, log lines, results) as mirrored so far.
    """
    rows = [tuple(r) for r in conn.execute(select(job).where(job.c.server != me).order_by(job.c.id.desc()).limit(limit))]
    changed = [r for r in rows if r[0] not in known or known[r[0]][0] != r]
    logs: dict[int, list[tuple]] = {}
    results: dict[int, list[tuple]] = {}
    if changed:
        ids = [r[0] for r in changed]
        n_logs = [known[i][1] if i in known else 0 for i in ids]
        n_results = [known[i][2] if i in known else 0 for i in ids]
        for table, counts, out in ((job_log, n_logs, logs), (job_result, n_results, results)):
            q = text(
                f"SELECT t.* FROM {table.name} t JOIN unnest(CAST(:ids AS bigint[]), CAST(:ns AS int[])) AS k(id, n) "
                "ON t.job_id = k.id AND t.n >= k.n ORDER BY t.job_id, t.n"
            )
            for r in conn.execute(q, {"ids": ids, "ns": counts}):
                out.setdefault(int(r[0]), []).append(tuple(r))
    return Reading(rows, logs, results)


class SiteJobs:
    """Keeps a job manager's :attr:`~labctl.ioc.jobs.JobManager.others` up to date (see the module docstring)."""

    def __init__(self, historian: Historian, jobs: JobManager, refresh_s: float) -> None:
        self.historian = historian
        self.jobs = jobs
        self.refresh_s = refresh_s
        self.me = historian.server_name
        self._mirror: dict[int, _Mirrored] = {}
        self._supervisor: Supervisor | None = None
        self._away = False
        self.refreshed = asyncio.Event()
        """Set after every reading that reached the database (tests wait on it)."""

    async def start(self) -> None:
        """Read now (in the background: the database may be away), then every ``refresh_s``."""
        self._supervisor = Supervisor(f"jobs of the site's other servers ({self.me})", self._loop, logger=log)
        self._supervisor.start()

    async def stop(self) -> None:
        """Stop reading (the last mirror stays)."""
        if self._supervisor is not None:
            await self._supervisor.stop()
            self._supervisor = None

    async def _loop(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.refresh_s)

    async def refresh(self) -> None:
        """Read the other servers' jobs now and hand them to the job manager."""
        known = {i: (m.row, _next_n(m.logs), _next_n(m.results)) for i, m in self._mirror.items()}
        try:
            reading = await self.historian._run(lambda conn: read_others(conn, self.me, known))
        except HistorianUnavailable as e:
            if not self._away:
                log.warning("jobs of the site's other servers: %s; showing those read before until it returns", e)
            self._away = True
            return
        if self._away:
            log.info("jobs of the site's other servers: the database is reachable again")
        self._away = False
        self.jobs.set_others(self._apply(reading))
        self.refreshed.set()

    def _apply(self, reading: Reading) -> dict[int, Job]:
        mirror: dict[int, _Mirrored] = {}
        out: dict[int, Job] = {}
        for row in reading.rows:
            job_id = row[0]
            m = self._mirror.get(job_id) or _Mirrored(row)
            m.row = row
            m.logs.extend(_after(m.logs, reading.logs.get(job_id, ())))
            m.results.extend(_after(m.results, reading.results.get(job_id, ())))
            mirror[job_id] = m
            j = job_of(row, m.logs, m.results)
            if j is not None:
                out[job_id] = j
        self._mirror = mirror
        return out


def _next_n(have: list[tuple]) -> int:
    """The number (``n``, the second column) after the last row mirrored."""
    return have[-1][1] + 1 if have else 0


def _after(have: list[Any], new: Sequence[tuple]) -> list[tuple]:
    """Rows of ``new`` after the last one mirrored, so none is mirrored twice."""
    n = _next_n(have)
    return [r for r in new if r[1] >= n]
