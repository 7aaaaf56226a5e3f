"""Access rules (pure): reported user and host -> roles -> identity -> access rights."""

from __future__ import annotations

from caproto import AccessRights
from labctl.ioc.build import build_database
from labctl.server.ca.access import AccessRules, Client, access_rights
from labctl.server.ca.config import CAAccessConfig, CAAccessRule
from labctl.server.site import parse_site

ACCESS = CAAccessConfig(
    user_groups={"operators": ("alice", "bob"), "experts": ("carol", "ops-*")},
    host_groups={"control_room": ("cr-ws1", "CR-WS2", "10.0.1.*")},
    rules=(
        CAAccessRule(users=("operators",), hosts=("control_room",), roles=("operator",)),
        CAAccessRule(users=("experts",), roles=("expert",)),
        CAAccessRule(users=("dave",), hosts=("lab-*",), roles=("viewer", "operator")),
    ),
)


def test_no_rules_means_read_only_for_everyone():
    rules = AccessRules(CAAccessConfig())
    assert rules.roles_for("alice", "cr-ws1") == frozenset()


def test_groups_patterns_and_hosts_that_fold_case():
    rules = AccessRules(ACCESS)
    assert rules.roles_for("alice", "cr-ws1") == {"operator"}
    assert rules.roles_for("bob", "CR-WS1") == {"operator"}  # host names compare case-insensitively
    assert rules.roles_for("bob", "cr-ws2") == {"operator"}
    assert rules.roles_for("alice", "10.0.1.17") == {"operator"}
    assert rules.roles_for("alice", "home-laptop") == frozenset()  # right user, wrong host
    assert rules.roles_for("Alice", "cr-ws1") == frozenset()  # user names are case-sensitive
    assert rules.roles_for("ops-night", "anywhere") == {"expert"}  # hosts default to any
    assert rules.roles_for("dave", "lab-3") == {"viewer", "operator"}


def test_matching_rules_add_up():
    cfg = CAAccessConfig(
        rules=(CAAccessRule(users=("erin",), roles=("operator",)), CAAccessRule(hosts=("lab-*",), roles=("expert",)))
    )
    rules = AccessRules(cfg)
    assert rules.roles_for("erin", "lab-1") == {"operator", "expert"}
    assert rules.roles_for("erin", "home") == {"operator"}


def test_a_client_that_reports_no_name_matches_nothing():
    rules = AccessRules(CAAccessConfig(rules=(CAAccessRule(roles=("operator",)),)))  # "everyone"
    assert rules.roles_for("anyone", "anywhere") == {"operator"}
    assert rules.roles_for(None, "anywhere") == frozenset()
    assert rules.roles_for("anyone", None) == frozenset()
    assert rules.roles_for("", "anywhere") == frozenset()


def test_identity_of_a_client():
    rules = AccessRules(ACCESS)
    who = rules.identity(Client("alice", "cr-ws1", "10.0.0.3"))
    assert (who.user, who.roles, who.protocol, who.host) == ("alice", frozenset({"operator"}), "ca", "cr-ws1")
    anonymous = rules.identity(Client(None, None, "10.0.0.3"))
    assert (anonymous.user, anonymous.roles, anonymous.host) == ("", frozenset(), "10.0.0.3")


def test_rights_follow_the_role_policy_and_the_pv():
    site = parse_site(
        """
site: t
roles:
  cryo: {write: [cryostat]}
resources:
  - {name: cryostat, lockable: false}
pvs:
  - {name: CRYO:SP, type: float64, writable: true, initial: 1.0, resource: cryostat}
  - {name: CRYO:T, type: float64, initial: 1.0, resource: cryostat}
  - {name: MAG:SP, type: float64, writable: true, initial: 0.0}
"""
    )
    db = build_database(site)
    rules = AccessRules(CAAccessConfig(rules=(CAAccessRule(users=("carol",), roles=("cryo",)),)))
    carol = rules.identity(Client("carol", "lab-1"))
    mallory = rules.identity(Client("mallory", "lab-1"))
    rw = AccessRights.READ | AccessRights.WRITE
    assert access_rights(db, "CRYO:SP", carol) == rw
    assert access_rights(db, "CRYO:T", carol) == AccessRights.READ  # read-only PV
    assert access_rights(db, "MAG:SP", carol) == AccessRights.READ  # another resource
    assert access_rights(db, "CRYO:SP", mallory) == AccessRights.READ
