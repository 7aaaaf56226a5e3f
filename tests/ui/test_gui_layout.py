"""Display layouts: the schema, its error messages, grid placement, the default layout; the ``labctl gui`` command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from labctl.clients.gui.layout import ChartPanel, ValuesPanel, default_layout, load_layout, parse_layout, wants_log
from labctl.clients.values import Metadata
from labctl.ioc.errors import ConfigError
from labctl.ioc.types import PVType, Reading
from labctl.server.cli import main

ROOT = Path(__file__).resolve().parents[2]
DEMO_LAYOUT = ROOT / "config" / "layouts" / "demo.yaml"


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_layout(text, "wall.yaml")
    return e.value.problems


def test_gui_layout_example_file_is_valid():
    layout = load_layout(DEMO_LAYOUT)
    assert layout.columns == 3
    assert [p.type for p in layout.panels][:2] == ["chart", "values"]
    chart = layout.panels[0]
    assert isinstance(chart, ChartPanel) and chart.log and chart.span_s == 1800 and chart.colspan == 2
    assert chart.pvs[3].pv == "CRYO:MXC:TEMP" and chart.pvs[3].color == "#ff5252"
    assert "CRYO:MXC:TEMP" in layout.pv_names() and "LAB:SAMPLE" in layout.pv_names()
    assert len(layout.cells()) == len(layout.panels)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("panels:\n  - {type: chrt, pvs: [A:B]}\n", "wall.yaml:2:6 panels[0].type: unknown panel type 'chrt'; expected one of chart, values, locks, jobs, interlocks"),
        ("panels:\n  - {pvs: [A:B]}\n", "wall.yaml:2:5 panels[0]: a panel needs a 'type': one of chart, values, locks, jobs, interlocks"),
        ("panels:\n  - type: chart\n    pvs: [A:B]\n    spam_s: 60\n", "wall.yaml:4:5 panels[0].spam_s: unknown key (not part of the layout schema)"),
        ("panels:\n  - type: chart\n    pvs: [A:B, 12]\n", "wall.yaml:3:16 panels[0].pvs[1]: expected a PV name or a mapping with a 'pv' key, got 12"),
        ("panels:\n  - type: chart\n    pvs: ['two words']\n", "wall.yaml:3:11 panels[0].pvs[0]: expected a PV name (colon-separated, e.g. CRYO:MXC:TEMP), got 'two words'"),
        ("panels:\n  - type: chart\n    pvs: [{pv: A:B, color: 'not a colour'}]\n", "wall.yaml:3:21 panels[0].pvs[0].color: expected a colour: #rrggbb or a name, got 'not a colour'"),
        ("panels:\n  - type: values\n    pvs: [{pv: A:B, format: '.2q'}]\n", "wall.yaml:3:21 panels[0].pvs[0].format: not a number format spec"),
        ("panels:\n  - {type: chart, pvs: []}\n", "wall.yaml:2:19 panels[0].pvs: list should have at least 1 item after validation, not 0"),
        ("panels:\n  - {type: chart, pvs: [A:B], span_s: -5}\n", "wall.yaml:2:31 panels[0].span_s: input should be greater than 0, got -5"),
        ("columns: 2\npanels:\n  - {type: jobs, colspan: 3}\n", "wall.yaml:3:18 panels[0].colspan: 3 columns do not fit in a grid of 2"),
        ("columns: 2\npanels:\n  - {type: jobs, row: 0, col: 1}\n  - {type: locks, row: 0, col: 1}\n", "wall.yaml:4:19 panels[1].row: overlaps panels[0]"),
        ("panels:\n  - {type: jobs, row: 1}\n", "wall.yaml:2:5 panels[0]: give both row and col, or neither"),
        ("title: x\n", "wall.yaml:1:1 panels: required key is missing"),
        ("panels: [\n", "wall.yaml:2:1 not valid YAML"),
        ("- just a list\n", "wall.yaml: expected a mapping of layout keys"),
    ],
)
def test_gui_layout_errors_name_file_line_and_key(text, expected):
    found = problems(text)
    assert any(p.startswith(expected) for p in found), found


def test_gui_layout_reports_every_problem_at_once():
    found = problems("columns: 0\npanels:\n  - {type: chart, pvs: [A:B], bogus: 1}\n  - {type: values, pvs: [A:B], columns: 99}\n")
    assert [p.split(" ")[1].rstrip(":") for p in found] == ["columns", "panels[0].bogus", "panels[1].columns"]


def test_gui_layout_places_panels_in_reading_order_around_fixed_ones():
    layout = parse_layout(
        "columns: 3\npanels:\n"
        "  - {type: chart, pvs: [A:B], colspan: 2}\n"
        "  - {type: values, pvs: [A:B]}\n"
        "  - {type: jobs, row: 0, col: 2, rowspan: 2}\n"
        "  - {type: locks}\n"
        "  - {type: interlocks, colspan: 3}\n"
    )
    assert layout.cells() == [(0, 0, 1, 2), (1, 0, 1, 1), (0, 2, 2, 1), (1, 1, 1, 1), (2, 0, 1, 3)]


def _meta(name: str, unit: str, path: str, *, type_: PVType = PVType.FLOAT64, writable: bool = False) -> Metadata:
    return Metadata(name=name, type=type_, unit=unit, path=path, writable=writable)


def test_gui_default_layout_groups_charts_by_instrument_and_unit():
    metas = [
        _meta("CRYO:MXC:TEMP", "K", "lab/bridge/t6"),
        _meta("CRYO:50K:TEMP", "K", "lab/bridge/t1"),
        _meta("CRYO:MXC:RES", "Ohm", "lab/bridge/r6"),
        _meta("CRYO:MXC:HTR", "%", "lab/bridge/h"),
        _meta("CRYO:MXC:SETP", "K", "lab/bridge/sp", writable=True),
        _meta("CRYO:IVC:PRES", "mbar", "lab/gauge/p1"),
        _meta("LAB:NOTE", "", "lab/soft/LAB:NOTE", type_=PVType.STRING),
        _meta("ALARM:HIGHEST", "", "lab/soft/ALARM:HIGHEST", type_=PVType.ENUM),
        _meta("ARB:CRYOSTAT:OWNER", "", "lab/soft/x", type_=PVType.STRING),
        _meta("ILK:MXC_WARM:STATE", "", "lab/soft/y", type_=PVType.ENUM),
    ]
    readings = {"CRYO:MXC:TEMP": Reading(0.01, 0.0), "CRYO:50K:TEMP": Reading(45.0, 0.0)}
    layout = default_layout(metas, readings, title="lab")
    charts = [p for p in layout.panels if isinstance(p, ChartPanel)]
    assert [c.title for c in charts] == ["bridge (K, Ohm)", "bridge (%)", "gauge (mbar)"]
    temps = charts[0].pvs
    assert [(e.pv, e.log) for e in temps] == [("CRYO:MXC:TEMP", True), ("CRYO:50K:TEMP", True), ("CRYO:MXC:RES", None)]
    assert charts[2].pvs[0].log  # pressures: log axis
    values = next(p for p in layout.panels if isinstance(p, ValuesPanel))
    assert values.pvs[0].pv == "CRYO:MXC:TEMP" and "CRYO:MXC:SETP" not in [e.pv for e in values.pvs]
    assert [p.type for p in layout.panels[-3:]] == ["locks", "interlocks", "jobs"]
    assert "ALARM:HIGHEST" not in layout.pv_names()


def test_gui_log_axis_heuristic():
    assert wants_log("mbar", [])
    assert wants_log("K", [0.01, 50.0])
    assert not wants_log("K", [1.0, 50.0])
    assert not wants_log("V", [-1.0, 500.0])


def test_gui_command_refuses_a_malformed_layout_before_opening_a_window(tmp_path, capsys):
    bad = tmp_path / "wall.yaml"
    bad.write_text("panels:\n  - type: chart\n    pvs: [A:B]\n    colour: red\n")
    assert main(["gui", "--layout", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:4:5 panels[0].colour: unknown key (not part of the layout schema)" in err


def test_gui_command_is_registered_without_loading_qt():
    code = (
        "import sys; from server.cli import build_parser; p = build_parser(); "
        "a = p.parse_args(['gui', '--url', 'opc.tcp://h:1', '--user', 'u', '--layout', 'l.yaml', '--large']); "
        "assert (a.url, a.user, str(a.layout), a.large) == ('opc.tcp://h:1', 'u', 'l.yaml', True), a; "
        "assert not [m for m in sys.modules if m.startswith(('PySide6', 'pyqtgraph'))], 'Qt imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


# ---- one loader for layouts and site files ----------------------------------------------------------


def test_a_layout_and_a_site_read_on_off_yes_the_same_way(tmp_path):
    """YAML 1.2 booleans in both: ON/OFF/yes/no stay text, only true/false are booleans."""
    from labctl.server.site import parse_site

    from labctl.yamlmodel import load

    layout = parse_layout(
        "title: ON\nbanner: false\npanels:\n"
        "  - {type: values, title: off, pvs: [{pv: 'LAB:MODE', label: yes}, {pv: 'LAB:VALVE', label: no}]}\n",
        "wall.yaml",
    )
    assert layout.title == "ON" and layout.banner is False
    values = layout.panels[0]
    assert isinstance(values, ValuesPanel) and values.title == "off"
    assert [e.label for e in values.pvs] == ["yes", "no"]

    site = parse_site(
        "site: lab\n"
        "pvs:\n"
        "  - {name: 'LAB:MODE', type: enum, states: [OFF, ON], initial: ON, description: yes, writable: true}\n"
        "  - {name: 'LAB:NOTE', type: string, initial: no, writable: false}\n",
        "site.yaml",
    )
    mode, note = site.pvs
    assert mode.states == ("OFF", "ON") and mode.initial == "ON" and mode.description == "yes" and mode.writable is True
    assert note.initial == "no" and note.writable is False
    assert load("[ON, off, yes, No, true, FALSE]") == ["ON", "off", "yes", "No", True, False]


def test_layout_and_site_problems_share_one_format(tmp_path):
    """The same mistake -- an unknown key, a file that is no mapping, a file that cannot be read -- reads alike in both."""
    from labctl.server.site import load_site, parse_site

    assert problems("panels:\n  - {type: locks, colour: red}\n") == [
        "wall.yaml:2:19 panels[0].colour: unknown key (not part of the layout schema)"
    ]
    with pytest.raises(ConfigError) as site_error:
        parse_site("site: lab\ncolour: red\n", "site.yaml")
    assert site_error.value.problems == ["site.yaml:2:1 colour: unknown key (not part of the site file schema)"]

    assert problems("") == ["wall.yaml: expected a mapping of layout keys (title, columns, panels...) at the top level, got an empty file"]
    with pytest.raises(ConfigError) as site_error:
        parse_site("- a\n", "site.yaml")
    assert site_error.value.problems == ["site.yaml: expected a mapping of site keys at the top level, got list"]

    missing = tmp_path / "none.yaml"
    for load, what in ((load_layout, "layout file"), (load_site, "site file")):
        with pytest.raises(ConfigError) as e:
            load(missing)
        assert e.value.problems == [f"{missing}: cannot read the {what}: No such file or directory"]
