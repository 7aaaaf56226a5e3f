"""labctl as a lab installs it: the sdist and wheel built, the wheel installed with no extras
into a clean virtualenv outside the checkout, and used there.

Checks that the wheel holds only the ``labctl`` namespace (no top-level ``server`` or
``ioc`` to collide with a user's modules), that the base install finds its bundled demo
site and simulator files, serves them and answers a client, and that a command whose extra
is missing names the extra in one line.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.served import Served

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.timeout(600), pytest.mark.xdist_group("wheel")]  # one worker builds the wheel and its venvs


def run(cmd: list[str], cwd: Path, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """The sdist, and a wheel built from it (as ``python -m build`` does)."""
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], cwd=out)
    return out


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> Path:
    """A clean virtualenv outside the checkout with the wheel and the base lock (no extras)."""
    home = tmp_path_factory.mktemp("wheel-venv")
    run([sys.executable, "-m", "venv", str(home / "venv")], cwd=home)
    pip = [str(home / "venv/bin/python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    run([*pip, "--require-hashes", "-r", str(ROOT / "requirements.lock")], cwd=home)
    (wheel,) = dist.glob("labctl-*.whl")
    run([*pip, "--no-deps", str(wheel)], cwd=home)
    return home


def test_the_wheel_holds_only_the_labctl_namespace_and_its_data(dist):
    (wheel,) = dist.glob("labctl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"labctl"}
    for data in ("labctl/config/demo.yaml", "labctl/config/layouts/demo.yaml", "labctl/drivers/sim/keithley2400.yaml",
                 "labctl/clients/tui/app.tcss"):  # fmt: skip
        assert data in names
    assert not any(n.startswith(("labctl/tests", "labctl/bench")) for n in names)
    assert list(dist.glob("labctl-*.tar.gz")), "no sdist"


def test_every_package_folder_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for package, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
    assert found - listed == set(), "packages missing from [tool.setuptools] packages"


def test_outside_the_checkout_only_labctl_imports(venv):
    python = str(venv / "venv/bin/python")
    for name in ("server", "ioc", "clients", "drivers", "config"):
        p = run([python, "-c", f"import {name}"], cwd=venv, check=False)
        assert p.returncode != 0 and "ModuleNotFoundError" in p.stderr, name
    p = run([python, "-c", "from labctl import connect; from labctl.aio import connect as c; import labctl.server.cli; print('ok')"], cwd=venv)
    assert p.stdout.strip() == "ok"


def test_the_base_install_checks_and_serves_the_bundled_demo_and_answers_a_client(venv):
    labctl = str(venv / "venv/bin/labctl")
    p = run([labctl, "check"], cwd=venv)
    assert "OK -- site 'demo'" in p.stdout
    server = Served([labctl, "serve"], venv / "state", cwd=venv)
    try:
        server.wait_ready()
        p = run([labctl, "get", "CRYO:MXC:TEMP", "PSU:VOLT:SP", "--url", server.url, "--json"], cwd=venv, timeout=60)
        assert '"CRYO:MXC:TEMP"' in p.stdout
        assert server.stop() == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.stop()
    assert (venv / "state" / "history.sqlite").exists()
    assert not any("Traceback" in line for line in server.lines), "\n".join(server.lines)


@pytest.mark.parametrize(("command", "extra"), [("gui", "gui"), ("tui", "tui")])
def test_a_command_whose_extra_is_missing_names_it_in_one_line(venv, command, extra):
    p = run([str(venv / "venv/bin/labctl"), command], cwd=venv, check=False)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and f"'{extra}' extra" in lines[0] and f"labctl[{extra}]" in lines[0], p.stderr
