"""The one policy: every action decided from (identity, action, target), and the README's role table is its table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from labctl.ioc.errors import Forbidden, PermissionDenied
from labctl.ioc.policy import PUBLIC, Action, Policy, Target
from labctl.ioc.types import Identity
from labctl.server.site import load_site

ROOT = Path(__file__).resolve().parents[2]
DEMO = load_site(ROOT / "config" / "demo.yaml")
POLICY = Policy(DEMO.all_roles)
ROLES = ("anonymous", "viewer", "operator", "expert", "admin")


def who(role: str, user: str | None = None) -> Identity:
    return Identity(user or role, frozenset() if role == "anonymous" else frozenset({role}), "test")


def demo_target(action: Action) -> Target:
    """The target the README's row is about: a demo resource, someone else's job, a demo procedure or interlock."""
    if action is Action.JOB_SUBMIT:
        (roles,) = {frozenset(p.roles) for p in DEMO.procedures.values()}  # the demo's procedures agree
        return Target("heater_sweep", roles=roles)
    if action is Action.INTERLOCK_RESET:
        (roles,) = {frozenset(i.reset_roles) for i in DEMO.interlocks}
        return Target("mxc_warm", roles=roles)
    return Target("cryostat", resource="cryostat", owner="someone else")


def readme_table() -> dict[Action, dict[str, bool]]:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- role-table -->")[1].split("<!-- /role-table -->")[0]
    rows = [line for line in block.strip().splitlines()[2:] if line.startswith("|")]
    out: dict[Action, dict[str, bool]] = {}
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        decisions = {role: {"yes": True, "no": False}[c] for role, c in zip(ROLES, cells[1:], strict=True)}
        for name in re.findall(r"`([a-z.]+)`", cells[0].split("(", 1)[1]):
            out[Action(name)] = decisions
    return out


def test_the_readme_role_table_is_the_policy():
    table = readme_table()
    assert set(table) == set(Action), f"actions missing from the README: {set(Action) - set(table)}"
    for action, decisions in table.items():
        for role, expected in decisions.items():
            assert POLICY.allows(who(role), action, demo_target(action)) is expected, (action, role)


@pytest.mark.parametrize("action", [Action.JOB_VIEW, Action.JOB_CANCEL])
def test_a_job_is_its_owners(action):
    target = Target("job:7", owner="olga")
    assert POLICY.allows(who("viewer", "olga"), action, target)
    assert not POLICY.allows(who("operator", "bob"), action, target)
    assert POLICY.allows(who("admin", "root"), action, target)


def test_a_refusal_is_typed_and_says_what_would_allow_it():
    with pytest.raises(Forbidden) as e:
        POLICY.decide(who("operator", "olga"), Action.LOCK_BREAK, Target("cryostat", resource="cryostat"))
    err = e.value
    assert (err.kind, err.action, err.target, err.user, err.needs) == ("forbidden", "lock.break", "cryostat", "olga", "the admin role")
    assert err.to_dict()["fields"] == {"user": "olga", "needs": "the admin role"}
    with pytest.raises(PermissionDenied) as w:  # a write refusal carries the PV, not the resource, in its PV field
        POLICY.decide(who("viewer"), Action.PV_WRITE, Target("CRYO:MXC:SETP", resource="cryostat"))
    assert (w.value.pv, w.value.resource, w.value.action) == ("CRYO:MXC:SETP", "cryostat", "write")


def test_public_actions_need_no_role_and_the_rest_need_one():
    for action in Action:
        allowed = POLICY.allows(who("anonymous"), action, demo_target(action))
        assert allowed is (action in PUBLIC), action


def test_no_module_outside_the_core_decides_permissions():
    """Adapters and the control layer ask the policy; none reads roles to decide (the core's own modules may)."""
    pattern = re.compile(r"set\([^)]*roles\)\s*&|&\s*set\([^)]*roles|\bin\s+[\w.]+\.roles\b|\.can\(|\.admin\b")
    offenders = []
    for folder in ("server", "clients", "drivers"):
        for path in (ROOT / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if pattern.search(code) and "policy" not in code and not code.strip().startswith("for "):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []
