"""Site files: valid ones load; each malformed one is refused naming file, line, key and problem."""

from __future__ import annotations

import textwrap

import pytest

from ioc.config import load_site, parse_site
from ioc.errors import ConfigError

GOOD = """
site: lab1
resources:
  - {name: cryostat, lockable: true}
users:
  - name: alice
    roles: [operator]
    password_hash: "scrypt$16384$8$1$00112233445566778899aabbccddeeff$0011223344556677889900112233445566778899001122334455667788990011"
simulations:
  cryo: {model: cryostat}
instruments:
  - name: bridge
    driver: lakeshore372
    simulation: cryo
    lock_resource: cryostat
    pvs:
      - {name: "CRYO:MXC:TEMP", type: float64, unit: K, channel: "temperature:6", alarm: {high: 0.05, hihi: 0.1, hysteresis: 0.002}}
      - {name: "CRYO:HTR:RANGE", type: enum, states: [OFF, LOW, HIGH], writable: true, channel: "range:0"}
pvs:
  - {name: "CRYO:MXC:TEMP_MK", type: float64, unit: mK, expr: "t * 1000", inputs: {t: "CRYO:MXC:TEMP"}}
  - {name: "LAB:NOTE", type: string, writable: true, initial: ""}
"""


def test_a_good_site_loads():
    site = parse_site(GOOD, "good.yaml")
    assert site.site == "lab1"
    assert [pv.name for _, pv in site.iter_pvs()] == ["CRYO:MXC:TEMP", "CRYO:HTR:RANGE", "CRYO:MXC:TEMP_MK", "LAB:NOTE"]
    inst = site.instruments[0]
    assert site.resource_of(inst, inst.pvs[0]) == "cryostat"
    assert inst.pvs[1].states == ("OFF", "LOW", "HIGH")  # YAML 1.2 booleans: OFF/ON stay text
    assert set(site.all_roles) >= {"viewer", "operator", "expert", "admin"}


def test_the_demo_site_loads():
    site = load_site("config/demo.yaml")
    assert site.instruments


def bad(replace: str, by: str) -> str:
    assert replace in GOOD, replace
    return GOOD.replace(replace, by, 1)


MALFORMED = [
    # (site text, words every message must contain)
    (bad("site: lab1", "site: 'lab 1'"), ["site:", "site", "should match pattern"]),
    (bad("site: lab1\n", "site: lab1\ncolour: blue\n"), ["colour", "unknown key"]),
    (bad("type: float64, unit: K", "type: float32, unit: K"), ["instruments[0].pvs[0].type", "float32"]),
    (bad("unit: K,", "unit: [K],"), ["instruments[0].pvs[0].unit", "string"]),
    (bad("{high: 0.05, hihi: 0.1", "{high: 0.5, hihi: 0.1"), ["instruments[0].pvs[0].alarm", "ordered"]),
    (bad("states: [OFF, LOW, HIGH]", "states: []"), ["instruments[0].pvs[1]", "enum PV needs 'states'"]),
    (bad("    driver: lakeshore372\n", ""), ["instruments[0].driver", "required key is missing"]),
    (bad("simulation: cryo", "simulation: fridge"), ["instruments[0].simulation", "unknown simulation 'fridge'"]),
    (bad("lock_resource: cryostat", "lock_resource: magnet"), []),  # an instrument may name a new group
    (bad("roles: [operator]", "roles: [wizard]"), ["users[0].roles", "unknown role 'wizard'"]),
    (bad('password_hash: "scrypt$', 'password_hash: "plain$'), ["users[0].password_hash", "should match pattern"]),
    (bad('inputs: {t: "CRYO:MXC:TEMP"}', 'inputs: {t: "CRYO:MXC:TMP"}'), ["pvs[0].inputs.t", "unknown PV 'CRYO:MXC:TMP'"]),
    (bad('name: "LAB:NOTE"', 'name: "CRYO:MXC:TEMP"'), ["pvs[1].name", "duplicate PV name"]),
    (bad('"CRYO:MXC:TEMP_MK", type: float64, unit: mK, expr', '"CRYO:MXC:TEMP_MK", type: float64, writable: true, unit: mK, expr'), ["pvs[0]", "cannot be writable"]),
    (bad("{name: cryostat, lockable: true}", "{name: cryostat, lockable: maybe}"), ["resources[0].lockable", "boolean"]),
    (bad('channel: "range:0"}', 'channel: "range:0", drive: [5, 1]}'), ["instruments[0].pvs[1]", "drive limits need a numeric PV"]),
    (bad("simulation: cryo\n", "simulation: cryo\n    resource: GPIB0::1::INSTR\n"), ["instruments[0]", "excludes"]),
    (bad("unit: K, channel", "unit: K, resource: nowhere, channel"), ["instruments[0].pvs[0].resource", "unknown resource 'nowhere'"]),
    (bad("site: lab1", "site: [lab1"), ["not valid YAML"]),
    ("- just\n- a list\n", ["expected a mapping"]),
]


@pytest.mark.parametrize(("text", "words"), MALFORMED, ids=[f"case{i}" for i in range(len(MALFORMED))])
def test_malformed_sites_are_refused_naming_the_key(text, words):
    if not words:  # the control case: this one is valid
        parse_site(text, "site.yaml")
        return
    with pytest.raises(ConfigError) as e:
        parse_site(text, "site.yaml")
    msg = str(e.value)
    assert msg.startswith("site.yaml: "), msg
    for w in words:
        assert w in msg, f"{w!r} not in:\n{msg}"
    # each problem line carries file:line:col
    for line in e.value.problems:
        assert line.startswith("site.yaml:"), line


def test_problem_lines_point_at_the_line_of_the_key():
    text = bad("unit: K,", "unit: 12,")
    with pytest.raises(ConfigError) as e:
        parse_site(text, "site.yaml")
    (line,) = [p for p in e.value.problems if "unit" in p]
    lineno = next(i for i, t in enumerate(text.splitlines(), 1) if "unit: 12" in t)
    assert line.startswith(f"site.yaml:{lineno}:"), line


def test_all_problems_are_reported_at_once():
    text = bad("site: lab1\n", "site: lab1\nfoo: 1\nbar: 2\n")
    with pytest.raises(ConfigError) as e:
        parse_site(text, "x.yaml")
    assert len(e.value.problems) == 2
    assert "2 problems" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the site file"):
        load_site(tmp_path / "nope.yaml")


def test_safe_loading_refuses_python_tags(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text(textwrap.dedent("site: !!python/object/apply:os.system ['true']\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_site(p)
