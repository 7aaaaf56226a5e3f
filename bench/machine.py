"""The machine a run measured: processors, memory, software versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sqlite3
import sys
from pathlib import Path

PACKAGES = (
    "asyncua",
    "caproto",
    "pyepics",
    "softioc",
    "epicscorelibs",
    "SQLAlchemy",
    "psycopg",
    "PyYAML",
    "numpy",
    "py-spy",
    "pydantic",
)


def describe() -> dict:
    """nproc, memory, CPU model, kernel, Python and package versions."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        import yaml

        libyaml = hasattr(yaml, "CSafeLoader")
    except ImportError:
        libyaml = False
    return {
        "nproc": os.cpu_count(),
        "memory_bytes": mem,
        "cpu_model": cpu,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "sqlite": sqlite3.sqlite_version,
        "libyaml": libyaml,
        "packages": versions,
    }
