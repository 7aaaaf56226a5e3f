"""Password hashes in the site-file format, and ``labctl passwd``."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
from labctl.ioc.config.access import PASSWORD_HASH
from labctl.server.cli import main
from labctl.server.passwords import PasswordHashError, hash_password, parse_hash, verify_password
from labctl.server.site import load_site

DEMO = Path(__file__).resolve().parents[3] / "config" / "demo.yaml"


def test_hash_has_the_schema_format_and_verifies():
    encoded = hash_password("correct horse")
    assert PASSWORD_HASH.match(encoded)
    assert encoded.startswith("scrypt$16384$8$1$")
    assert verify_password("correct horse", encoded)
    assert not verify_password("correct horse!", encoded)
    assert hash_password("correct horse") != encoded, "a fresh salt every time"


@pytest.mark.parametrize(
    ("encoded", "words"),
    [
        ("bcrypt$1$2$3$00$00", "expected scrypt$N$r$p$salt$hash"),
        ("scrypt$1000$8$1$" + "0" * 32 + "$" + "0" * 64, "power of two"),
        ("scrypt$1048576$8$16$" + "0" * 32 + "$" + "0" * 64, "MiB"),
        ("scrypt$16384$8$1$" + "0" * 30 + "$" + "0" * 64, "16-byte salt"),
        ("scrypt$16384$8$1$" + "zz" * 16 + "$" + "0" * 64, "hex"),
    ],
)
def test_malformed_or_too_costly_hashes_are_refused(encoded, words):
    with pytest.raises(PasswordHashError, match=re.escape(words)):
        parse_hash(encoded)


def test_demo_accounts_use_their_documented_passwords():
    site = load_site(DEMO)
    users = {u.name: u for u in site.users}
    assert set(users) >= {"viewer", "operator", "expert", "admin"}
    for name in ("viewer", "operator", "expert", "admin"):
        assert verify_password(f"{name}-demo", users[name].password_hash), name
        assert users[name].roles == (name,)


def test_passwd_reads_stdin_and_prints_a_hash(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret\n"))
    assert main(["passwd", "--stdin"]) == 0
    encoded = capsys.readouterr().out.strip()
    assert PASSWORD_HASH.match(encoded) and verify_password("s3cret", encoded)


def test_passwd_refuses_an_empty_password(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert main(["passwd", "--stdin"]) == 1
    assert "empty" in capsys.readouterr().err


def test_passwd_takes_no_password_argument(capsys):
    with pytest.raises(SystemExit) as e:
        main(["passwd", "hunter2"])
    assert e.value.code == 2
