"""The historian's section of the site file (``historian``): where and how samples are archived."""

from __future__ import annotations

from labctl.ioc.config.base import Model, PositiveSeconds
from pydantic import Field


class HistorianConfig(Model):
    """Where and how samples are archived."""

    enabled: bool = True
    url: str = "sqlite:///{state_dir}/history.sqlite"
    """SQLAlchemy URL: ``sqlite:///...`` or ``postgresql+psycopg://...``; ``{state_dir}`` is replaced."""
    batch_size: int = Field(5000, gt=0)
    batch_age_s: PositiveSeconds = 0.5
    spool_max_mb: float = Field(512.0, gt=0)
    retention_days: float | None = Field(None, gt=0)
