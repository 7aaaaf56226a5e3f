"""Site-wide accounts: ``labctl user`` in the site's database, served to every server's OPC UA logins.

The account rules on their own (a user directory whose accounts are replaced), the
commands against a real PostgreSQL database (every change audited, every bad input a clear
error), then two servers taking their accounts from one database: a user added or
disabled on the command line is let in or refused on both within seconds, and an open
session of a disabled user is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging

import pytest
from asyncua import ua
from labctl.server.opcua.users import UserDirectory
from labctl.server.passwords import hash_password
from labctl.server.siteinfo import Account

from tests.helpers import wait_for
from tests.site.conftest import login, query, run_labctl

ALICE_PW = "alice-pw-1"


@pytest.fixture(scope="module")
def alice_hash() -> str:
    return hash_password(ALICE_PW)


# ---- the rules ------------------------------------------------------------------------------------


async def test_replacing_accounts_says_whose_sessions_end_and_refuses_a_disabled_login(alice_hash):
    directory = UserDirectory([], accounts_source="site database")
    assert directory.password_users  # offered even before any account exists
    alice = Account("alice", ("operator",), alice_hash)
    bob = Account("bob", ("viewer",), alice_hash)
    assert directory.replace_accounts([alice, bob]) == {}
    identity = await directory.login("alice", ALICE_PW, "10.0.0.1")
    assert identity.user == "alice" and identity.roles == {"operator"}
    ended = directory.replace_accounts([Account("alice", ("operator",), hash_password("new")), Account("bob", ("expert",), alice_hash)])
    assert ended == {"bob": "the account's roles changed to expert"}  # a new password leaves alice's sessions open
    ended = directory.replace_accounts([Account("alice", ("operator",), alice_hash, disabled=True)])
    assert ended == {"alice": "the account was disabled", "bob": "the account was removed"}
    refused = await directory.login("alice", ALICE_PW, "10.0.0.1")
    assert refused.reason == "account disabled" and refused.status == ua.StatusCodes.BadUserAccessDenied
    assert (await directory.login("bob", ALICE_PW, "10.0.0.1")).reason == "unknown user"
    directory.checker.close()


# ---- the commands ----------------------------------------------------------------------------------


async def test_user_commands_change_accounts_and_audit_every_change(pg_database):
    url = pg_database.url
    db = ("--historian-url", url)
    rc, out, err = await run_labctl("user", "add", "alice", "--roles", "operator,expert", "--description", "Alice A.", *db, "--stdin", stdin=f"{ALICE_PW}\n")
    assert rc == 0 and "added user 'alice' [operator, expert] with a password" in out, err
    rc, out, err = await run_labctl("user", "add", "robot", "--no-password", *db)
    assert rc == 0, err
    rc, out, _ = await run_labctl("user", "list", "--json", *db)
    accounts = {a["name"]: a for a in json.loads(out)}
    assert accounts["alice"]["roles"] == ["operator", "expert"] and accounts["alice"]["password"] is True
    assert accounts["robot"]["roles"] == ["viewer"] and accounts["robot"]["password"] is False
    me = getpass.getuser()
    assert accounts["alice"]["updated_by"].startswith(f"{me}@") and "password_hash" not in out and "scrypt" not in out
    stored = (await asyncio.to_thread(query, url, "SELECT password_hash FROM site_user WHERE name = 'alice'"))[0][0]
    assert stored.startswith("scrypt$") and ALICE_PW not in stored
    assert (await run_labctl("user", "passwd", "alice", "--stdin", *db, stdin="another-pw\n"))[0] == 0
    assert (await run_labctl("user", "roles", "alice", "viewer", *db))[0] == 0
    rc, out, _ = await run_labctl("user", "disable", "alice", "--reason", "left the group", *db)
    assert rc == 0 and "disabled" in out
    rc, out, _ = await run_labctl("user", "disable", "alice", *db)
    assert rc == 0 and "already disabled" in out  # nothing changed, nothing audited
    assert (await run_labctl("user", "enable", "alice", *db))[0] == 0
    rc, out, _ = await run_labctl("user", "list", *db)
    assert out.splitlines()[0].split()[:4] == ["NAME", "ROLES", "PASSWORD", "STATE"]
    assert out.splitlines()[1].split()[:4] == ["alice", "viewer", "yes", "enabled"]
    rows = await asyncio.to_thread(
        query, url, "SELECT action, user_name, protocol, target, old_value, new_value, reason FROM audit_event ORDER BY id"
    )
    assert [(r.action, r.target) for r in rows] == [
        ("user.add", "user:alice"), ("user.add", "user:robot"), ("user.passwd", "user:alice"), ("user.roles", "user:alice"),
        ("user.disable", "user:alice"), ("user.enable", "user:alice"),
    ]  # fmt: skip
    assert all(r.user_name == me and r.protocol == "cli" for r in rows)
    assert json.loads(rows[3].old_value) == ["operator", "expert"] and json.loads(rows[3].new_value) == ["viewer"]
    assert rows[4].reason == "left the group"
    assert not any("scrypt" in (r.old_value or "") + (r.new_value or "") for r in rows)


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        (["user", "add", "bad name"], "pw\n", "user name 'bad name' is not valid"),
        (["user", "add", "system"], "pw\n", "user name 'system' is reserved"),
        (["user", "add", "carol", "--roles", "operator,labctl"], "pw\n", "role name 'labctl' is reserved"),
        (["user", "add", "carol", "--roles", " , "], "pw\n", "no roles in"),
        (["user", "add", "carol"], "\n", "the password is empty"),
        (["user", "add", "alice"], "pw\n", "user 'alice' exists already"),
        (["user", "passwd", "nobody"], "pw\n", "no user 'nobody' in the site database"),
        (["user", "disable", "nobody"], "", "no user 'nobody' in the site database"),
    ],
)
async def test_user_commands_refuse_bad_input_with_a_clear_error(pg_database, argv, stdin, message):
    db = ("--historian-url", pg_database.url)
    assert (await run_labctl("user", "add", "alice", *db, "--stdin", stdin=f"{ALICE_PW}\n"))[0] == 0
    rc, out, err = await run_labctl(*argv, *db, stdin=stdin)
    assert rc == 1 and err.startswith("labctl user: ") and message in err, (out, err)
    rows = await asyncio.to_thread(query, pg_database.url, "SELECT name FROM site_user")
    assert [r.name for r in rows] == ["alice"]


async def test_user_commands_need_a_postgresql_database_and_never_take_a_password_argument(tmp_path, monkeypatch):
    monkeypatch.delenv("LABCTL_HISTORIAN_URL", raising=False)
    rc, _, err = await run_labctl("user", "list")
    assert rc == 1 and "--historian-url or LABCTL_HISTORIAN_URL" in err
    rc, _, err = await run_labctl("user", "list", "--historian-url", f"sqlite:///{tmp_path}/h.sqlite")
    assert rc == 1 and "PostgreSQL" in err and "site file" in err
    rc, _, err = await run_labctl("user", "add", "carol", "--password", "secret", "--historian-url", "postgresql+psycopg://u@h/d")
    assert rc == 2 and "unrecognized arguments" in err


async def test_roles_are_checked_against_a_site_file_when_given(pg_database, tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("site: lab\nroles:\n  cryo_tech: {write: [cryostat]}\n")
    db = ("--historian-url", pg_database.url)
    rc, _, err = await run_labctl("user", "add", "carol", "--roles", "cryo_tec", "--site", str(site), "--no-password", *db)
    assert rc == 1 and "role 'cryo_tec' is not defined in" in err and "cryo_tech" in err
    rc, _, err = await run_labctl("user", "add", "carol", "--roles", "cryo_tech", "--site", str(site), "--no-password", *db)
    assert rc == 0 and "warning" not in err
    rc, _, err = await run_labctl("user", "roles", "carol", "cryo_tech,shifter", *db)
    assert rc == 0 and "warning: role 'shifter' is not a default role" in err


# ---- two servers, one set of accounts ----------------------------------------------------------------------


async def _refused(url: str, user: str, password: str) -> bool:
    try:
        client = await login(url, user, password)
    except ua.UaStatusCodeError as e:
        return e.code == ua.StatusCodes.BadUserAccessDenied
    await client.disconnect()
    return False


async def _closed(client) -> bool:
    try:
        await client.get_node(ua.ObjectIds.Server_ServerStatus_State).read_value()
    except (ua.UaStatusCodeError, ConnectionError):
        return True
    return False


async def test_a_user_disabled_on_the_command_line_is_refused_on_every_server(pg_database, start_server, caplog):
    url = pg_database.url
    db = ("--historian-url", url)
    assert (await run_labctl("user", "add", "alice", "--roles", "operator", *db, "--stdin", stdin=f"{ALICE_PW}\n"))[0] == 0
    alpha = await start_server("alpha", ["A:X"], url, accounts="database")
    beta = await start_server("beta", ["B:X"], url, accounts="database")
    urls = [s.service("opcua").url for s in (alpha, beta)]
    sessions = [await login(u, "alice", ALICE_PW) for u in urls]
    try:
        # a user added while the servers run can log in on both within a refresh
        assert (await run_labctl("user", "add", "bob", *db, "--stdin", stdin="bob-pw\n"))[0] == 0
        for u in urls:
            client = await wait_for(lambda u=u: _login_or_none(u, "bob", "bob-pw"), timeout=5, what="bob let in")
            await client.disconnect()
        # disabled on the command line: refused everywhere, open sessions closed and audited
        caplog.set_level(logging.WARNING, logger="labctl.server.opcua.service")
        assert (await run_labctl("user", "disable", "alice", *db))[0] == 0
        for u in urls:
            await wait_for(lambda u=u: _refused(u, "alice", ALICE_PW), timeout=5, what=f"alice refused at {u}")
        for client in sessions:
            await wait_for(lambda client=client: _closed(client), timeout=5, what="alice's open session closed")
        assert sum("closing the session of alice" in r.getMessage() for r in caplog.records) == 2
        for server in (alpha, beta):
            await server.service("historian").flush()
        rows = await asyncio.to_thread(query, url, "SELECT action, reason FROM audit_event WHERE user_name = 'alice' AND action IN ('login', 'logout') ORDER BY id")
        assert [(r.action, r.reason) for r in rows if r.action == "logout"] == [("logout", "the account was disabled")] * 2
        assert [r.reason for r in rows if r.action == "login"][-2:] == ["account disabled"] * 2
        # enabled again: let in again
        assert (await run_labctl("user", "enable", "alice", *db))[0] == 0
        for u in urls:
            client = await wait_for(lambda u=u: _login_or_none(u, "alice", ALICE_PW), timeout=5, what="alice let in again")
            await client.disconnect()
    finally:
        for client in sessions:
            with contextlib.suppress(Exception):
                await client.disconnect()


async def _login_or_none(url: str, user: str, password: str):
    try:
        return await login(url, user, password)
    except ua.UaStatusCodeError:
        return None


async def test_a_server_started_while_the_database_is_away_uses_the_accounts_it_saved(pg_cluster_factory, start_server, caplog):
    cluster = pg_cluster_factory()
    url = cluster.url
    assert (await run_labctl("user", "add", "alice", "--historian-url", url, "--stdin", stdin=f"{ALICE_PW}\n"))[0] == 0
    alpha = await start_server("alpha", ["A:X"], url, accounts="database")
    accounts = alpha.service("accounts")
    assert [a.name for a in accounts.accounts] == ["alice"] and accounts.cache_path.stat().st_mode & 0o077 == 0
    await alpha.stop()
    await asyncio.to_thread(cluster.stop)
    caplog.set_level(logging.WARNING, logger="labctl.server.accounts")
    again = await start_server("alpha", ["A:X"], url, accounts="database")
    assert again.service("accounts").source == "cache"
    assert any("using the 1 accounts saved in" in r.getMessage() for r in caplog.records)
    client = await login(again.service("opcua").url, "alice", ALICE_PW)
    await client.disconnect()
    await asyncio.to_thread(cluster.start)
    await wait_for(lambda: again.service("accounts").source == "database", timeout=10, what="accounts read again")
