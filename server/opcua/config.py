"""The OPC UA endpoint's section of the site file (``server.opcua``)."""

from __future__ import annotations

from typing import Literal

from labctl.ioc.config.base import Model
from pydantic import Field


class OpcUaConfig(Model):
    """The OPC UA endpoint."""

    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(4840, ge=0, le=65535)
    """TCP port; 0 picks a free one."""
    security: tuple[Literal["None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"], ...] = (
        "None",
        "Basic256Sha256_Sign",
        "Basic256Sha256_SignAndEncrypt",
    )
    """Security policies offered. Drop ``None`` outside a localhost demo."""
    anonymous: bool = True
    """Allow anonymous (read-only) sessions."""
