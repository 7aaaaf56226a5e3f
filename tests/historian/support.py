"""Helpers of the historian tests: the test site, synthetic time, databases."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from labctl.ioc.build import build_database
from labctl.ioc.database import Database
from labctl.server.site import parse_site

SITE = """
site: archive_test
roles:
  cryo_operator: {write: [cryostat]}
users:
  - {name: alice, roles: [cryo_operator]}
resources:
  - {name: cryostat, lockable: false}
pvs:
  - {name: "CRYO:TEMP", type: float64, unit: K, writable: true, initial: 4.2, resource: cryostat,
     deadband: {archive: 0.5}}
  - {name: "CRYO:RAW", type: float64, writable: true, initial: 0.0, resource: cryostat}
  - {name: "CRYO:COUNT", type: int, writable: true, initial: 0, resource: cryostat}
  - {name: "CRYO:VALVE", type: bool, writable: true, initial: false, resource: cryostat}
  - {name: "CRYO:MODE", type: enum, states: [OFF, COOL, WARM], writable: true, initial: OFF, resource: cryostat}
  - {name: "CRYO:NOTE", type: string, writable: true, initial: "", length: 100, resource: cryostat}
  - {name: "CRYO:TRACE", type: "float64[]", writable: true, initial: [0.0], resource: cryostat, allow_nan: true}
  - {name: "CRYO:DOUBLE", type: float64, expr: "t * 2", inputs: {t: "CRYO:RAW"}}
"""


def future_minute(offset_min: int = 2) -> float:
    """A minute boundary shortly after now: synthetic timestamps from here on are newer than
    the baseline readings a historian records at start (which carry the current time)."""
    return (math.floor(time.time() / 60) + offset_min) * 60.0


def make_db(site: str = SITE, clock: Callable[[], float] | None = None) -> Database:
    """The process database of a site file: soft and derived PVs, the real core."""
    return build_database(parse_site(site, "test-site.yaml"), clock=clock)
