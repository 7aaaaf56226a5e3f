"""Authority cannot be forged (issue 16, item 7).

The server's own actors (interlocks, jobs run on behalf of nobody, the server) are marked
``Identity.internal`` by code; no site-file role or user, no CA access rule and no
client-reported name can name or be granted that. These tests try: a site that declares
the reserved names, an identity with a role called ``system``, a CA client that reports the
internal actors' user name, and random CA clients against a rule set.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from labctl.ioc.arbiter import Arbiter, Lease, NoLease, Waiter
from labctl.ioc.config.access import ResourceConfig, RoleConfig
from labctl.ioc.errors import ConfigError, Forbidden, LockedBy, PermissionDenied
from labctl.ioc.policy import Action, Policy, Target
from labctl.ioc.types import INTERNAL_USER, RESERVED_NAMES, SYSTEM, Identity, internal_identity
from labctl.server.ca.access import AccessRules, Client
from labctl.server.ca.config import CAAccessConfig
from labctl.server.site import parse_site

BASE = """
site: t
resources: [{name: cryostat}]
pvs:
  - {name: "LAB:X", type: float64, writable: true, initial: 0, resource: cryostat}
"""


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("roles: {system: {write: ['*'], admin: true}}\n", "roles.system"),
        ("roles: {Internal: {write: ['*']}}\n", "roles.Internal"),
        ("users: [{name: labctl, roles: [viewer]}]\n", "users[0].name"),
        ("server: {ca: {access: {rules: [{users: ['*'], hosts: ['*'], roles: [system]}]}}}\n", "server.ca.access.rules[0].roles"),
    ],
)
def test_a_site_naming_an_internal_identity_is_refused(extra, key):
    with pytest.raises(ConfigError) as e:
        parse_site(BASE + extra, "t.yaml")
    (line,) = [p for p in e.value.problems if "reserved for the server's internal actors" in p]
    assert line.startswith("t.yaml:") and f" {key}: " in line


def test_labctl_check_refuses_reserved_names(tmp_path, capsys):
    from labctl.server.cli import main

    site = tmp_path / "t.yaml"
    site.write_text(BASE + "roles: {system: {admin: true}}\nusers: [{name: admin, roles: [system]}]\n")
    assert main(["check", str(site)]) == 2
    err = capsys.readouterr().err
    assert "roles.system: role name 'system' is reserved" in err


def test_a_role_called_system_grants_only_what_it_says():
    # Even if a role of that name reached the policy (it cannot through a site file), it grants its configuration only.
    policy = Policy({"system": RoleConfig(), "operator": RoleConfig(write=("*",))})
    forged = Identity("mallory", frozenset({"system"}), "ca", "evil")
    assert not policy.allows(forged, Action.LOCK_BREAK, Target("cryostat", resource="cryostat"))
    with pytest.raises(PermissionDenied):
        policy.check_write(forged, "LAB:X", "cryostat")
    with pytest.raises(Forbidden):
        policy.decide(forged, Action.INTERLOCK_RESET, Target("ilk", roles=frozenset({"expert"})))
    assert policy.allows(SYSTEM, Action.LOCK_BREAK, Target("cryostat", resource="cryostat"))
    arb = Arbiter([ResourceConfig(name="cryostat")])
    with pytest.raises(LockedBy):
        arb.check_write(forged, "LAB:X", "cryostat", 0.0)
    arb.check_write(internal_identity("interlock:x"), "LAB:X", "cryostat", 0.0)


def test_a_client_reporting_the_internal_user_name_is_not_the_internal_actor():
    arb = Arbiter([ResourceConfig(name="cryostat")])
    actor = internal_identity("job:3")
    lease, _ = arb.request("cryostat", actor, 0.0, duration_s=60, client="job:3")
    assert isinstance(lease, Lease) and lease.internal and lease.user == INTERNAL_USER
    impostor = AccessRules(CAAccessConfig(rules=({"roles": ["operator"]},))).identity(Client(INTERNAL_USER, "job:3"))
    assert impostor.user == INTERNAL_USER and not impostor.internal and impostor.roles == {"operator"}
    with pytest.raises(LockedBy) as e:  # cannot write under the internal actor's lease
        arb.check_write(impostor, "LAB:X", "cryostat", 1.0)
    assert e.value.owner == INTERNAL_USER
    assert not arb.holds(impostor, "cryostat", 1.0) and arb.holds(actor, "cryostat", 1.0)
    with pytest.raises(NoLease):  # nor release it by name (CA carries no token)
        arb.release_user("cryostat", INTERNAL_USER, 1.0)
    assert arb.token_of("cryostat", INTERNAL_USER, "job:3") is None
    queued, _ = arb.request("cryostat", impostor, 2.0, duration_s=60, client="job:3")  # nor renew it: it waits
    assert isinstance(queued, Waiter) and not queued.internal
    assert arb.holder("cryostat").token == lease.token
    arb.release_user("cryostat", INTERNAL_USER, 3.0, internal=True)
    assert arb.holder("cryostat").token == queued.token and not arb.holder("cryostat").internal


names = st.one_of(st.sampled_from(sorted(RESERVED_NAMES | {"alice", "operator", "*", ""})), st.text(max_size=12))


@settings(max_examples=300, deadline=None)
@given(user=st.one_of(st.none(), names), host=st.one_of(st.none(), names))
def test_no_ca_client_gains_more_than_its_rules_grant(user, host):
    cfg = CAAccessConfig(
        user_groups={"ops": ("alice", "labctl*")},
        host_groups={"cr": ("cr-*", "localhost")},
        rules=({"users": ["ops"], "hosts": ["cr"], "roles": ["operator"]}, {"users": ["*"], "hosts": ["*"], "roles": ["viewer"]}),
    )
    who = AccessRules(cfg).identity(Client(user, host))
    assert not who.internal and who.protocol == "ca"
    assert who.roles <= {"operator", "viewer"}
    if not user or not host:
        assert who.roles == frozenset()
    elif "operator" in who.roles:
        assert (user == "alice" or user.startswith("labctl")) and (host.lower().startswith("cr-") or host.lower() == "localhost")
    policy = Policy({"viewer": RoleConfig(), "operator": RoleConfig(write=("*",), acknowledge=True)})
    assert not policy.allows(who, Action.LOCK_BREAK, Target("cryostat", resource="cryostat"))
    assert not policy.allows(who, Action.INTERLOCK_RESET, Target("ilk", roles=frozenset({"expert"})))
