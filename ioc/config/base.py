"""The base of every site-file model, and the field types several sections share.

Every model is frozen and forbids unknown keys, so a typo in a site file is an error
that names the key, never a setting silently ignored.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


class Model(BaseModel):
    """Base of all config models: frozen, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


Name = Annotated[str, Field(pattern=IDENT.pattern, description="an identifier")]
PositiveSeconds = Annotated[float, Field(gt=0)]
