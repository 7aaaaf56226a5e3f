"""Reading a site file: YAML to a validated model, every problem with its file, line and column.

Theory of operation: :func:`labctl.yamlmodel.parse_model` does the work, as it does for the
display's layouts: the YAML is loaded with the safe loader and YAML 1.2 booleans
(``states: [OFF, ON]`` stays text), validated into a site model (the core's
:class:`~labctl.ioc.config.site.CoreSiteConfig`, or the complete site file the server
composes from it) and cross-checked; each problem becomes one line
``site.yaml:14:7 instruments[0].pvs[2].unit: expected a string, got 12`` and all of them
are raised together in one :class:`~labctl.ioc.errors.ConfigError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from labctl.ioc.config.site import CoreSiteConfig

from labctl import yamlmodel

Site = TypeVar("Site", bound=CoreSiteConfig)

#: The site file's YAML loader (YAML 1.2 booleans), for callers that load the text themselves.
SiteLoader = yamlmodel.Loader


def parse_site(text: str, source: str = "<site>", model: type[Site] = CoreSiteConfig) -> Site:
    """Validate the YAML text of a site file into ``model``; raise ConfigError listing every problem."""
    return yamlmodel.parse_model(text, source, model, schema="site file", top_keys="site keys")


def load_site(path: str | Path, model: type[Site] = CoreSiteConfig) -> Site:
    """Read and validate a site file into ``model``."""
    return parse_site(yamlmodel.read_text(path, "site file"), str(Path(path)), model)
