"""Site files: valid ones load; each malformed one is refused naming file, line, key and problem."""

from __future__ import annotations

import textwrap

import pytest
from labctl.ioc.errors import ConfigError
from labctl.server.site import load_site, parse_site

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


# ---- numbered PVs (range) ------------------------------------------------------------------

NUMBERED = """
site: lab1
pvs:
  - name: "DAQ:R{rack}:CH{ch:02d}"
    range: {rack: [1, 2], ch: [0, 15]}
    type: float64
    unit: V
    description: "rack {rack} channel {ch}"
    initial: 0.0
  - name: "DAQ:R{rack}:CH{ch:02d}:MV"
    range: {rack: [1, 2], ch: [0, 15]}
    type: float64
    expr: "v * 1000"
    inputs: {v: "DAQ:R{rack}:CH{ch:02d}"}
  - {name: "LAB:NOTE", type: string, writable: true, initial: ""}
"""


def test_a_range_entry_declares_numbered_pvs_in_order():
    site = parse_site(NUMBERED, "daq.yaml")
    names = [pv.name for _, pv in site.iter_pvs()]
    assert len(names) == 2 * 16 * 2 + 1
    assert names[:3] == ["DAQ:R1:CH00", "DAQ:R1:CH01", "DAQ:R1:CH02"]
    assert names[15:17] == ["DAQ:R1:CH15", "DAQ:R2:CH00"]  # the first variable is outermost
    assert names[-1] == "LAB:NOTE"
    by_name = {pv.name: pv for _, pv in site.iter_pvs()}
    assert by_name["DAQ:R2:CH07"].description == "rack 2 channel 7"
    assert by_name["DAQ:R2:CH07"].range is None and by_name["DAQ:R2:CH07"].unit == "V"
    assert by_name["DAQ:R2:CH07:MV"].inputs == {"v": "DAQ:R2:CH07"}
    assert site.pvs[0].count == 32


def test_numbered_pvs_build_a_database_with_their_own_names_and_inputs():
    from labctl.ioc.build import build_database

    db = build_database(parse_site(NUMBERED, "daq.yaml"))
    assert len(db.names("DAQ:*")) == 64
    info = db.info("DAQ:R1:CH03:MV")
    assert info.inputs == (("v", "DAQ:R1:CH03"),) and info.resource == "soft"
    db.post("DAQ:R1:CH03", 0.25)
    assert db.read("DAQ:R1:CH03:MV").value == 250.0
    assert db.info("DAQ:R2:CH15").description == "rack 2 channel 15"


def test_a_large_range_is_read_fast_and_expanded_lazily():
    text = 'site: big\npvs:\n  - {name: "BIG:{n:06d}", range: {n: [0, 199999]}, type: float64, initial: 0.0}\n'
    site = parse_site(text, "big.yaml")
    assert len(site.pvs) == 1 and site.pvs[0].count == 200_000
    last = None
    for _, pv in site.iter_pvs():
        last = pv.name
    assert last == "BIG:199999"


def numbered(replace: str, by: str) -> str:
    assert replace in NUMBERED, replace
    return NUMBERED.replace(replace, by, 1)


RANGE_MALFORMED = [
    # (site text, words every message must contain, the line the problem is on)
    (numbered("ch: [0, 15]}", "ch: [15, 0]}"), ["pvs[0]", "first <= last", "[15, 0]"], 4),
    (numbered("ch: [0, 15]}", "ch: [0, x]}"), ["pvs[0].range.ch", "integer"], 5),
    (numbered("{rack: [1, 2], ch: [0, 15]}", "{rack: [1, 2], ch: [0, 15], unit: [0, 1]}"), ["pvs[0]", "unused", "unit"], 4),
    (numbered('"DAQ:R{rack}:CH{ch:02d}"\n', '"DAQ:R{rack}:CH{chan:02d}"\n'), ["pvs[0]", "chan", "not a range variable"], 4),
    (numbered('"DAQ:R{rack}:CH{ch:02d}"\n', '"DAQ:R{rack}:CH{ch:5d}"\n'), ["pvs[0]", "not a valid PV name", "'DAQ:R1:CH    0'"], 4),
    (numbered('"DAQ:R{rack}:CH{ch:02d}"\n', '"DAQ:R{rack}:CH{ch!r}"\n'), ["pvs[0]", "not a range variable"], 4),
    (numbered('"DAQ:R{rack}:CH{ch:02d}"\n', '"DAQ:R{rack}:CH{ch:q}"\n'), ["pvs[0]", "Unknown format code"], 4),
    (numbered('"rack {rack} channel {ch}"', '"rack {rack} slot {slot}"'), ["pvs[0]", "description", "slot"], 4),
    (numbered('inputs: {v: "DAQ:R{rack}:CH{ch:02d}"}', 'inputs: {v: "DAQ:R{rack}:CH{ch:03d}"}'),
     ["pvs[1].inputs.v", "unknown PV 'DAQ:R1:CH000'", "31 more"], 14),
    (numbered('"DAQ:R{rack}:CH{ch:02d}:MV"', '"DAQ:R{rack}:CH{ch:02d}"'), ["pvs[1].name", "duplicate PV name 'DAQ:R1:CH00'", "pvs[0]", "31 more"], 10),
    (numbered('{name: "LAB:NOTE"', '{name: "LAB:{n}"'), ["pvs[2]", "needs 'range'"], 15),
    (numbered("{rack: [1, 2], ch: [0, 15]}", "{rack: [1, 2000], ch: [0, 999]}"), ["pvs[0]", "at most 1000000"], 4),
    (numbered("{rack: [1, 2], ch: [0, 15]}", "{}"), ["pvs[0]", "at least one variable"], 4),
    (numbered('"DAQ:R{rack}:CH{ch:02d}"\n', '"DAQ R{rack}:CH{ch:02d}"\n'), ["pvs[0]", "'DAQ R1:CH00'"], 4),
]


@pytest.mark.parametrize(("text", "words", "line"), RANGE_MALFORMED, ids=[f"range{i}" for i in range(len(RANGE_MALFORMED))])
def test_malformed_range_entries_are_refused_with_file_line_and_column(text, words, line):
    with pytest.raises(ConfigError) as e:
        parse_site(text, "daq.yaml")
    msg = str(e.value)
    for w in words:
        assert w in msg, f"{w!r} not in:\n{msg}"
    assert len(e.value.problems) == 1, msg  # one problem per entry, not one per number
    (problem,) = e.value.problems
    assert problem.startswith(f"daq.yaml:{line}:"), problem


def test_plain_pv_names_are_still_checked():
    with pytest.raises(ConfigError) as e:
        parse_site(numbered('{name: "LAB:NOTE"', '{name: "LAB NOTE"'), "daq.yaml")
    assert "expected a PV name" in str(e.value) and "'LAB NOTE'" in str(e.value)


def test_range_is_refused_under_an_instrument():
    text = bad('{name: "CRYO:HTR:RANGE", type: enum', '{name: "CRYO:HTR:RANGE{n}", range: {n: [0, 1]}, type: enum')
    with pytest.raises(ConfigError, match="'range' is for the top-level 'pvs'"):
        parse_site(text, "site.yaml")
