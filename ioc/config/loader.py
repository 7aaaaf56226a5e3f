"""Reading a site file: YAML to a validated model, every problem with its file, line and column.

Theory of operation: the YAML is loaded with the safe loader (libyaml's when present) with
YAML 1.2 booleans, and validated into a site model (the core's
:class:`~labctl.ioc.config.site.CoreSiteConfig`, or the complete site file the server
composes from it). Only when there is an error is the text composed again, in pure
Python, to find the line and column of each key (a large site parses fast). Each problem
becomes one line ``site.yaml:14:7 instruments[0].pvs[2].unit: expected a string, got 12``
and all of them are raised together in one :class:`~labctl.ioc.errors.ConfigError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from labctl.ioc.config.site import CoreSiteConfig
from labctl.ioc.errors import ConfigError
from labctl.ioc.yamlpos import at_key, key_positions
from pydantic import ValidationError

Site = TypeVar("Site", bound=CoreSiteConfig)


class _LazyPositions(dict):
    """Key path -> (line, column), composed only when an error needs a position (a large site parses fast)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self._text: str | None = text

    def _load(self) -> None:
        if self._text is not None:
            node = yaml.compose(self._text, Loader=_PositionLoader)
            self._text = None
            if node is not None:
                key_positions(node, (), self)

    def __contains__(self, key: object) -> bool:
        self._load()
        return super().__contains__(key)

    def __getitem__(self, key: Any) -> tuple[int, int]:
        self._load()
        return super().__getitem__(key)


def _describe(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        return "unknown key (not part of the site file schema)"
    if kind == "missing":
        return "required key is missing"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind in ("enum", "literal_error"):
        return f"{msg}, got {got!r}"
    if got is not None and not isinstance(got, (dict, list)) and kind not in ("value_error", "assertion_error"):
        return f"{msg[0].lower() + msg[1:]}, got {got!r}"
    return msg[0].lower() + msg[1:]


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic inserts union member tags (e.g. 'tuple[float, float]') into loc; drop them.
    return tuple(p for p in loc if isinstance(p, int) or not any(c in str(p) for c in "[]|"))


def _yaml12_booleans(loader: type) -> type:
    loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    return loader


@_yaml12_booleans
class SiteLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The safe loader (libyaml's when present) with YAML 1.2 booleans: ``states: [OFF, ON]`` stays text."""


@_yaml12_booleans
class _PositionLoader(yaml.SafeLoader):
    """The same rules in pure Python, composing nodes with line and column (for error messages)."""


def parse_site(text: str, source: str = "<site>", model: type[Site] = CoreSiteConfig) -> Site:
    """Validate the YAML text of a site file into ``model``; raise ConfigError listing every problem."""
    try:
        data = yaml.load(text, Loader=SiteLoader)  # noqa: S506 -- SiteLoader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(source, [f"{source}{where} not valid YAML: {e.problem or e}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError(source, [f"{source}: not valid YAML: {e}"]) from None
    positions = _LazyPositions(text)
    if not isinstance(data, dict):
        raise ConfigError(source, [f"{source}: expected a mapping of site keys at the top level, got {type(data).__name__}"])
    try:
        site = model.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = _clean_loc(err["loc"])
            lines.append(f"{at_key(source, loc, positions)}: {_describe(err)}")
        raise ConfigError(source, sorted(set(lines), key=lines.index)) from None
    problems = site.cross_check()
    if problems:
        raise ConfigError(source, [f"{at_key(source, p, positions)}: {m}" for p, m in problems])
    return site


def load_site(path: str | Path, model: type[Site] = CoreSiteConfig) -> Site:
    """Read and validate a site file into ``model``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(p), [f"{p}: cannot read the site file: {e.strerror or e}"]) from None
    return parse_site(text, str(p), model)
