"""Where a key of a YAML file is: line and column for error messages, shared by every file format.

A validation error names a key path (``instruments[2].pvs[0].unit``); :func:`key_positions`
maps each path of a composed YAML document to its 1-based (line, column), and
:func:`at_key` turns a path into ``file:line:col key.path``, falling back to the nearest
enclosing key that the file has (a missing key is reported at its parent).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import yaml

Path = tuple[Any, ...]


def key_positions(
    node: yaml.Node, path: Path = (), out: dict[Path, tuple[int, int]] | None = None
) -> dict[Path, tuple[int, int]]:
    """Key path -> (line, column) of every node under ``node`` (a key's own position for a mapping entry)."""
    if out is None:
        out = {}
    out[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            key_positions(value, path + (key.value,), out)
            out[path + (key.value,)] = (key.start_mark.line + 1, key.start_mark.column + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key_positions(item, path + (i,), out)
    return out


def dotted(path: Iterable[Any]) -> str:
    """``('pvs', 3, 'unit')`` -> ``pvs[3].unit``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "(top level)"


def locate(path: Path, positions: Mapping[Path, tuple[int, int]]) -> str:
    """``:line:col`` of ``path`` or of its nearest enclosing key in the file; empty if none."""
    p = tuple(path)
    while p and p not in positions:
        p = p[:-1]
    if p in positions:
        line, col = positions[p]
        return f":{line}:{col}"
    return ""


def at_key(source: str, path: Path, positions: Mapping[Path, tuple[int, int]]) -> str:
    """``source:line:col key.path``, the head of an error message about ``path``."""
    return f"{source}{locate(path, positions)} {dotted(path)}"
