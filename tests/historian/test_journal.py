"""The audit journal: an accepted write's record is on disk before the write returns, and survives a crash.

Real Servers (core, historian on SQLite, the journal) on a temporary state directory. A
crash is the historian stopping before the rest (nothing after reaches the archive), as in
``tests/system/test_restart.py``; the kill -9 of a ``labctl serve`` is in
``tests/system/test_journal_kill.py``.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from labctl.ioc.access import AuditRecord
from labctl.ioc.errors import Unavailable
from labctl.ioc.types import Identity
from labctl.server.app import Server
from labctl.server.journal import AuditJournal, AuditJournalService, decode, encode
from labctl.server.site import parse_site

from tests.helpers import wait_for

OP = Identity("olga", frozenset({"operator"}), "test", "hostA")


def make_server(state_dir: Path) -> Server:
    return Server(
        parse_site(
            f"""
site: journal_test
server: {{state_dir: "{state_dir}", opcua: {{enabled: false}}, ca: {{enabled: false}}}}
resources: [{{name: lab, lockable: false}}]
pvs:
  - {{name: "LAB:SP", type: float64, writable: true, initial: 0.0, resource: lab}}
  - {{name: "LAB:NOTE", type: string, writable: true, initial: "", length: 40, resource: lab}}
""",
            "journal.yaml",
        )
    )


def journal_of(server: Server) -> AuditJournalService:
    service = server.service("journal")
    assert isinstance(service, AuditJournalService)
    return service


def segments(state_dir: Path) -> list[Path]:
    return sorted((state_dir / "journal").glob("audit-*.jsonl"))


def journaled(state_dir: Path) -> list[AuditRecord]:
    return [decode(line) for p in segments(state_dir) for line in p.read_bytes().splitlines() if line]


async def test_a_write_returns_after_its_record_is_in_the_journal_file(tmp_path):
    state = tmp_path / "var"
    server = make_server(state)
    async with server:
        await server.db.write("LAB:SP", 1.5, OP)
        # Read the file as a crash would leave it: the record is there the moment write() returned.
        (record,) = [r for r in journaled(state) if r.action == "write"]
        assert (record.target, record.old, record.new, record.user, record.host, record.accepted) == (
            "LAB:SP", 0.0, 1.5, "olga", "hostA", True,
        )  # fmt: skip
        assert len(record.uid) == 32


async def test_concurrent_writes_share_fsyncs_and_all_are_journaled(tmp_path):
    state = tmp_path / "var"
    server = make_server(state)
    async with server:
        journal = journal_of(server).journal
        before = journal.batches
        values = [float(i) for i in range(200)]
        await asyncio.gather(*(server.db.write("LAB:SP", v, OP) for v in values))
        written = sorted(r.new for r in journaled(state) if r.action == "write")
        assert written == values
        assert journal.batches - before < len(values)  # group commit: fewer fsyncs than writes


async def test_records_of_a_crash_are_replayed_into_the_archive_once(tmp_path):
    state = tmp_path / "var"
    first = make_server(state)
    await first.start()
    history = first.service("historian")
    await first.db.write("LAB:SP", 1.0, OP)
    assert await history.flush()  # this one reached the archive before the crash
    await history.stop()  # the crash: what follows never reaches the archive
    await first.db.write("LAB:SP", 2.0, OP)
    await first.db.write("LAB:NOTE", "after the last flush", OP)
    await first.stop()
    left = journaled(state)
    assert {r.new for r in left if r.action == "write"} >= {1.0, 2.0, "after the last flush"}

    second = make_server(state)
    async with second:
        records = await second.service("historian").read_audit(target=None, action="write")
        assert [(r.target, r.new) for r in records] == [("LAB:SP", 1.0), ("LAB:SP", 2.0), ("LAB:NOTE", "after the last flush")]
        assert {r.uid for r in records} <= {r.uid for r in left}  # the journal's keys, so the replay added no duplicate
        assert not {r.uid for r in left} & {r.uid for r in journaled(state)}  # the replayed segments are gone


async def test_a_torn_last_line_is_skipped_and_the_rest_replayed(tmp_path):
    state = tmp_path / "var"
    (state / "journal").mkdir(parents=True)
    good = AuditRecord(1_700_000_000.0, "write", "olga", "opcua", "hostA", "LAB:SP", 0.0, 7.0, uid="a" * 32)
    line = encode(good)
    (state / "journal" / "audit-000000000003.jsonl").write_bytes(line + line[: len(line) // 2])
    server = make_server(state)
    async with server:
        records = await server.service("historian").read_audit(action="write")
        assert [(r.uid, r.target, r.new, r.user, r.host) for r in records] == [("a" * 32, "LAB:SP", 7.0, "olga", "hostA")]
        await wait_for(lambda: not (state / "journal" / "audit-000000000003.jsonl").exists(), what="replayed segment removed")


async def test_segments_the_historian_has_are_truncated(tmp_path):
    state = tmp_path / "var"
    server = make_server(state)
    async with server:
        service = journal_of(server)
        await server.db.write("LAB:SP", 3.0, OP)
        old = segments(state)
        await service._truncate(await service.journal.rotate())
        assert not set(old) & set(segments(state))
        await server.db.write("LAB:SP", 4.0, OP)
    assert segments(state) == []  # a clean stop leaves nothing to replay


async def test_writes_are_refused_while_the_journal_cannot_store_records_and_resume_after(tmp_path):
    state = tmp_path / "var"
    server = make_server(state)
    async with server:
        journal: AuditJournal = journal_of(server).journal
        await server.db.write("LAB:SP", 1.0, OP)
        directory = state / "journal"
        shutil.rmtree(directory)
        directory.write_text("not a directory")  # the next segment cannot be created
        await journal.rotate()
        # The write reached the PV but its record could not be made durable: not "accepted".
        try:
            await server.db.write("LAB:SP", 2.0, OP)
        except Unavailable as e:
            assert e.kind == "unavailable" and e.target == "LAB:SP"
        else:
            raise AssertionError("a write whose record is not durable was acknowledged")
        assert not journal.healthy
        # From now on refused before the instrument: the PV keeps its value.
        try:
            await server.db.write("LAB:SP", 3.0, OP)
        except Unavailable as e:
            assert e.action == "write"
        else:
            raise AssertionError("a write was accepted while the journal was broken")
        assert server.db.read("LAB:SP").value == 2.0
        directory.unlink()
        directory.mkdir()
        try:  # its refusal's record is journaled (unawaited): that batch succeeds and heals the journal
            await server.db.write("LAB:SP", 4.0, OP)
        except Unavailable:
            pass
        await wait_for(lambda: journal.healthy, what="the journal writing again")
        await server.db.write("LAB:SP", 5.0, OP)
        assert [r.new for r in journaled(state) if r.action == "write" and r.accepted] == [5.0]
