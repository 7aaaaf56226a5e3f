"""Job ids unique in a site: blocks of ids each server reserves in the site's PostgreSQL database.

Theory of operation. Several servers archive their jobs into one ``job`` table, so a job
id must be unique in the site, and a server must be able to hand one out at once (a job is
submitted on the event loop) and while the database is away. Ids are therefore reserved
in blocks of :data:`~labctl.server.historian.schema.JOB_ID_BLOCK`:

* the sequence ``job_id_seq`` (increment one block, started above every id archived
  before it existed) gives each reservation the first id of a block no other server will
  get; the block is recorded in ``job_id_block`` with the server that reserved it
  (:func:`reserve_block`). A sequence needs no lock: servers reserving at once get
  different blocks.
* a server hands out the ids of its block in order (:class:`JobIds`), and reserves the
  next block in the background when fewer than :data:`LOW_WATER` are left, so a
  submission never waits for the database.
* at start, with the database reachable, it goes on in its newest block after the highest
  id it used there (:func:`newest_block`, :func:`highest_id`, its spooled jobs, and its
  cursor file), or reserves a new block;
* after every id it hands out, the block and the next id are written to a small cursor
  file in the state directory (``job-ids.json``, replaced atomically), so a server that
  starts while the database is away goes on where it stopped instead of reusing ids whose
  jobs are archived already. A server that starts while the database is away and has no
  cursor file (its first start) refuses submissions (``unavailable``) until it can
  reserve a block.

A SQLite archive belongs to one server: its jobs are numbered by the job manager itself,
from the highest id restored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from labctl.server.archive import HistorianError
from labctl.server.historian.schema import JOB_ID_BLOCK, job, job_id_block
from sqlalchemy import func, insert, select, text
from sqlalchemy.engine import Connection

log = logging.getLogger(__name__)

#: When fewer ids than this are left in the block in use, the next block is reserved.
LOW_WATER = JOB_ID_BLOCK // 10
#: The cursor file in the state directory.
CURSOR_FILE = "job-ids.json"
_RESERVE_ATTEMPTS = 10


@dataclass(frozen=True)
class Block:
    """Job ids ``first`` to ``last`` (inclusive), reserved by one server."""

    first: int
    last: int

    def __contains__(self, job_id: object) -> bool:
        return isinstance(job_id, int) and self.first <= job_id <= self.last


# ---- SQL (on a worker thread, in the caller's transaction) ---------------------------------------------


def reserve_block(conn: Connection, server: str, now_us: int) -> Block:
    """A new block of ids for ``server``, recorded in ``job_id_block``.

    A block that holds an archived job already (the sequence was reset by hand) is skipped.

    Raises:
        HistorianError: no free block after a few attempts.
    """
    for _ in range(_RESERVE_ATTEMPTS):
        first = int(conn.execute(text("SELECT nextval('job_id_seq')")).scalar_one())
        block = Block(first, first + JOB_ID_BLOCK - 1)
        taken = conn.execute(select(job.c.id).where(job.c.id.between(block.first, block.last)).limit(1)).first()
        if taken is None:
            conn.execute(insert(job_id_block).values(first_id=block.first, last_id=block.last, server=server, reserved_us=now_us))
            return block
        log.warning("historian: job ids %d-%d hold archived jobs already; reserving another block", block.first, block.last)
    raise HistorianError(f"no free block of job ids after {_RESERVE_ATTEMPTS} attempts (is job_id_seq behind the job table?)")


def newest_block(conn: Connection, server: str) -> Block | None:
    """The last block ``server`` reserved, or None."""
    row = conn.execute(
        select(job_id_block.c.first_id, job_id_block.c.last_id)
        .where(job_id_block.c.server == server)
        .order_by(job_id_block.c.first_id.desc())
        .limit(1)
    ).first()
    return None if row is None else Block(int(row.first_id), int(row.last_id))


def highest_id(conn: Connection, block: Block) -> int | None:
    """The highest archived job id within ``block`` (a block is one server's), or None."""
    found = conn.execute(select(func.max(job.c.id)).where(job.c.id.between(block.first, block.last))).scalar()
    return None if found is None else int(found)


# ---- the ids of one server (on the event loop) ----------------------------------------------------------


class JobIds:
    """The block a server hands its job ids out of, the next block once reserved, and the cursor file."""

    def __init__(self, state_dir: Path, database: str, server: str) -> None:
        self.path = Path(state_dir) / CURSOR_FILE
        self.database = database
        """The database's URL without password: a cursor of another database is not used."""
        self.server = server
        self.block: Block | None = None
        self.next = 0
        self.spare: Block | None = None
        """A block reserved ahead, used once :attr:`block` runs out."""

    # -- start-up

    def restore(self, block: Block | None, archived: int | None, used: Iterable[int]) -> None:
        """Go on in ``block`` (the server's newest, from the database) after every id used in it.

        ``archived``: the highest id archived in it; ``used``: the ids of the jobs restored
        (the spool's included). The cursor file counts too when it names the same block.
        """
        self.block = block
        if block is None:
            return
        seen = [i for i in used if i in block]
        if archived is not None:
            seen.append(archived)
        nxt = max(seen, default=block.first - 1) + 1
        cursor = self._read_cursor()
        if cursor is not None and cursor[0] == block:
            nxt = max(nxt, cursor[1])
        self.next = nxt

    def restore_offline(self, used: Iterable[int]) -> bool:
        """Without the database: go on in the block of the cursor file (True), or have none (False)."""
        cursor = self._read_cursor()
        if cursor is None:
            self.block = None
            return False
        block, nxt = cursor
        self.block = block
        self.next = max([nxt, *(i + 1 for i in used if i in block)])
        return True

    # -- handing out

    @property
    def left(self) -> int:
        """Ids left in the block in use (0 without one)."""
        return 0 if self.block is None else max(0, self.block.last - self.next + 1)

    @property
    def wants_block(self) -> bool:
        """Whether the next block should be reserved now."""
        return self.spare is None and self.left < LOW_WATER

    def add_block(self, block: Block) -> None:
        """A block just reserved: used at once if the current one is spent, else kept as the spare."""
        if self.left == 0:
            self.block, self.next = block, block.first
            self._write_cursor()
        else:
            self.spare = block

    def take(self) -> int | None:
        """The next id (recorded in the cursor file), or None when there is none left to hand out."""
        if self.left == 0:
            if self.spare is None:
                return None
            self.block, self.next, self.spare = self.spare, self.spare.first, None
        job_id = self.next
        self.next += 1
        self._write_cursor()
        return job_id

    # -- the cursor file

    def _read_cursor(self) -> tuple[Block, int] | None:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            if doc.get("database") != self.database or doc.get("server") != self.server:
                return None
            block = Block(int(doc["first"]), int(doc["last"]))
            return block, int(doc["next"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("historian: ignoring the job id cursor %s: %s", self.path, e)
            return None

    def _write_cursor(self) -> None:
        if self.block is None:
            return
        doc = {"database": self.database, "server": self.server, "first": self.block.first, "last": self.block.last, "next": self.next}
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(doc), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as e:  # the ids stay unique while the database is reachable; say so once per failure
            log.warning("historian: cannot write the job id cursor %s: %s", self.path, e)
            with contextlib.suppress(OSError):
                tmp.unlink()
