"""Run import-linter's contracts (pyproject.toml) over the ``labctl`` namespace.

labctl's folders are mapped into the ``labctl`` namespace by ``package-dir`` in
pyproject.toml; import-linter (grimp) finds a package's modules by walking its folder,
which cannot follow such a mapping. So this builds the namespace as a tree of symbolic
links in a temporary folder, from the same ``package-dir`` table, and runs
``lint-imports`` with that folder first on the path. Exit status: lint-imports'.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_view(into: Path) -> None:
    """Lay out ``into/labctl/...`` as symbolic links to the mapped folders."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(mapping.items(), key=lambda kv: kv[0].count(".")):
        target = into.joinpath(*package.split("."))
        if package == "labctl":
            target.mkdir(parents=True)
            for f in (ROOT / folder).glob("*.py"):
                (target / f.name).symlink_to(f)
        else:
            target.symlink_to(ROOT / folder, target_is_directory=True)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="labctl-lint-") as tmp:
        build_view(Path(tmp))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([tmp, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        lint = Path(sys.executable).with_name("lint-imports")
        return subprocess.call([str(lint), "--config", str(ROOT / "pyproject.toml")], env=env, cwd=tmp)


if __name__ == "__main__":
    sys.exit(main())
