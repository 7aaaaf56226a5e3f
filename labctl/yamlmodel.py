"""YAML files into validated pydantic models, every problem with its file, line, column and key.

Theory of operation. Site files (:mod:`labctl.ioc.config.loader`) and control-room layouts
(:mod:`labctl.clients.gui.layout`) are read the same way, by :func:`parse_model`:

1. the text is loaded with the safe loader (libyaml's when present) and **YAML 1.2
   booleans**: only ``true``/``false`` (any case) are booleans, so ``OFF``, ``ON``,
   ``yes`` and ``no`` stay the strings they look like (enum states, titles, labels);
2. the data is validated into a pydantic model; ``cross_check()`` of the model, when it
   has one, adds problems that span several keys as (key path, message) pairs;
3. only when there is a problem is the text composed again, in pure Python, to find the
   line and column of each key (a large site file parses fast), and every problem
   becomes one line ``site.yaml:14:7 instruments[0].pvs[2].unit: expected a string, got 12``.
   All of them are raised together in one :class:`~labctl.ioc.errors.ConfigError`.

A missing key is reported at its parent (:func:`at_key` falls back to the nearest
enclosing key the file has). A user of this module passes the schema's name for its
messages and, if it needs to, its own ``describe`` for the pydantic errors it words
differently (the layout's panel types), falling back to :func:`describe`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path as FilePath
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from labctl.ioc.errors import ConfigError

Path = tuple[Any, ...]
"""A key path: mapping keys and list indexes, ``('pvs', 3, 'unit')``."""
M = TypeVar("M", bound=BaseModel)
#: (pydantic error, the loaded data) -> (key path, message)
Describe = Callable[[Mapping[str, Any], Any], tuple[Path, str]]


# ---- loaders ----------------------------------------------------------------------------


def _yaml12_booleans(loader: type) -> type:
    loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    return loader


@_yaml12_booleans
class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The safe loader (libyaml's when present) with YAML 1.2 booleans: ``states: [OFF, ON]`` stays text."""


@_yaml12_booleans
class PositionLoader(yaml.SafeLoader):
    """The same rules in pure Python, composing nodes with line and column (for error messages)."""


def load(text: str) -> Any:
    """The data of a YAML text, with YAML 1.2 booleans (raises yaml.YAMLError)."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 -- Loader is a SafeLoader


# ---- key positions ----------------------------------------------------------------------


def key_positions(node: yaml.Node, path: Path = (), out: dict[Path, tuple[int, int]] | None = None) -> dict[Path, tuple[int, int]]:
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


class LazyPositions(dict):
    """Key path -> (line, column), composed from the text only when an error needs a position."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self._text: str | None = text

    def _load(self) -> None:
        if self._text is not None:
            node = yaml.compose(self._text, Loader=PositionLoader)
            self._text = None
            if node is not None:
                key_positions(node, (), self)

    def __contains__(self, key: object) -> bool:
        self._load()
        return super().__contains__(key)

    def __getitem__(self, key: Any) -> tuple[int, int]:
        self._load()
        return super().__getitem__(key)


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


# ---- validation errors ------------------------------------------------------------------


def clean_loc(loc: Iterable[Any]) -> Path:
    """A pydantic error location without the parts that are no key of the file.

    pydantic names union members (``tuple[float, float]``, ``int | None``) and function
    validators (``function-after[...]``) in ``loc``; neither is in the file.
    """
    return tuple(p for p in loc if isinstance(p, int) or not any(c in str(p) for c in "[]|") and "function-" not in str(p))


def describe(err: Mapping[str, Any], schema: str) -> tuple[Path, str]:
    """The key path and one sentence for a pydantic error (``schema`` names the file kind: "site file")."""
    loc = clean_loc(err["loc"])
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        return loc, f"unknown key (not part of the {schema} schema)"
    if kind == "missing":
        return loc, "required key is missing"
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind in ("enum", "literal_error"):
        return loc, f"{msg}, got {got!r}"
    msg = msg[0].lower() + msg[1:]
    if got is not None and not isinstance(got, (dict, list)) and kind not in ("value_error", "assertion_error"):
        return loc, f"{msg}, got {got!r}"
    return loc, msg


def parse_model(
    text: str,
    source: str,
    model: type[M],
    *,
    schema: str,
    top_keys: str,
    describe_error: Describe | None = None,
) -> M:
    """Validate a YAML text into ``model``; raise ConfigError listing every problem as ``file:line:col key: message``.

    Args:
        text: the YAML.
        source: the file's name, at the head of each line.
        model: the pydantic model of the whole file.
        schema: what the file is, for messages ("site file", "layout").
        top_keys: what the top-level mapping holds, for a file that is not one ("site keys").
        describe_error: words a pydantic error as (key path, message); default :func:`describe`.
    """
    try:
        data = load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(source, [f"{source}{where} not valid YAML: {e.problem or e}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError(source, [f"{source}: not valid YAML: {e}"]) from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise ConfigError(source, [f"{source}: expected a mapping of {top_keys} at the top level, got {got}"])
    positions = LazyPositions(text)
    try:
        result = model.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            path, message = describe_error(err, data) if describe_error is not None else describe(err, schema)
            lines.append(f"{at_key(source, path, positions)}: {message}")
        raise ConfigError(source, list(dict.fromkeys(lines))) from None
    cross_check = getattr(result, "cross_check", None)
    problems = cross_check() if callable(cross_check) else []
    if problems:
        raise ConfigError(source, [f"{at_key(source, p, positions)}: {m}" for p, m in problems])
    return result


def read_text(path: str | FilePath, what: str) -> str:
    """The text of a file; ConfigError ``<path>: cannot read the <what>: <why>`` when it cannot be read."""
    p = FilePath(path)
    try:
        return p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(p), [f"{p}: cannot read the {what}: {e.strerror or e}"]) from None
