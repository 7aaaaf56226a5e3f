"""Procedures users submit as jobs: parameters, the resources they lock, and their steps.

Parameters are typed (float64, int, bool, string, float64[]) with optional ``min``/``max``;
a submitted value is checked against them before the job exists (see
:func:`labctl.ioc.procedure.convert_param`): finite numbers only unless ``allow_nonfinite``,
ints within 64 bits, arrays of at most ``max_items`` numbers, strings of at most ``max_length``.

A step is one of a fixed set of kinds (set, ramp, wait, read, sleep, repeat, log),
configured as data; :mod:`labctl.ioc.procedure` checks a procedure against the site and
:mod:`labctl.ioc.jobs` runs it. A procedure may also declare ``cleanup`` steps, a
``finally`` block that runs however the job ends (done, failed, cancelled, stopped by an
interlock or by the server's shutdown, and at the next start after a crash unless
``cleanup_after_crash`` is false), within ``cleanup_timeout_s``.
"""

from __future__ import annotations

from typing import Any, Literal

from labctl.ioc.config.base import Model, PositiveSeconds
from pydantic import Field, model_validator


class ParamConfig(Model):
    """A procedure parameter."""

    type: Literal["float64", "int", "bool", "string", "float64[]"] = "float64"
    default: Any = None
    """Value when the submitter gives none (no default: the parameter is required)."""
    description: str = ""
    min: float | None = None
    max: float | None = None
    allow_nonfinite: bool = False
    """Accept NaN and infinities (float64 and float64[]); by default a submitted value must be finite."""
    max_items: int = Field(1000, ge=1, le=100_000)
    """The most elements a float64[] value may have."""
    max_length: int = Field(1024, ge=1, le=65_536)
    """The longest string value (characters)."""


class SetStep(Model):
    """Write a PV. ``value`` is a number/string/list, or an expression over parameters in ``=...``."""

    pv: str
    value: Any


class RampStep(Model):
    """Move a PV to a target at a rate, writing every ``step_s``."""

    pv: str
    to: Any
    """Target (a value or ``=expression``)."""
    rate: float = Field(gt=0)
    """Units per second."""
    step_s: PositiveSeconds = 1.0


class WaitStep(Model):
    """Wait until a condition over PVs holds (fails the job after ``timeout_s``)."""

    until: str
    """Expression over ``inputs`` and the parameters, e.g. ``t < sp * 1.05``."""
    inputs: dict[str, str] = {}
    """Expression variable -> PV name."""
    timeout_s: PositiveSeconds
    hold_s: float = Field(0.0, ge=0)
    """The condition must hold this long without interruption."""


class ReadStep(Model):
    """Read PVs into the job's results."""

    pvs: tuple[str, ...]
    label: str = ""
    """Tag for the results (may use ``{param}`` placeholders)."""


class RepeatStep(Model):
    """Run ``steps`` once per value in ``values``, binding each to ``var``."""

    var: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    values: Any
    """A list, or ``=expression`` naming a float64[] parameter."""
    steps: tuple[Step, ...]


class Step(Model):
    """One step: exactly one of the keys."""

    set: SetStep | None = None
    ramp: RampStep | None = None
    wait: WaitStep | None = None
    read: ReadStep | None = None
    sleep: float | str | None = None
    """Seconds to wait: a number, or an ``=expression`` over the parameters (``"=settle_s"``)."""
    repeat: RepeatStep | None = None
    log: str | None = None
    """A line for the job's log (``{param}`` placeholders allowed)."""

    @model_validator(mode="after")
    def _one(self) -> Step:
        given = [k for k in ("set", "ramp", "wait", "read", "sleep", "repeat", "log") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a step has exactly one of set, ramp, wait, read, sleep, repeat, log; got {given or 'none'}")
        if isinstance(self.sleep, str) and not self.sleep.startswith("="):
            raise ValueError(f"sleep: expected seconds or an '=expression', got {self.sleep!r}")
        if isinstance(self.sleep, (int, float)) and not self.sleep >= 0:
            raise ValueError(f"sleep: expected seconds >= 0, got {self.sleep!r}")
        return self

    @property
    def kind(self) -> str:
        """The step's key."""
        return next(k for k in ("set", "ramp", "wait", "read", "sleep", "repeat", "log") if getattr(self, k) is not None)


RepeatStep.model_rebuild()


class ProcedureConfig(Model):
    """A procedure users submit as jobs: parameters, the resources it locks, its steps."""

    description: str = ""
    resources: tuple[str, ...] = ()
    """Resources the job must hold (locked for its whole run)."""
    params: dict[str, ParamConfig] = {}
    steps: tuple[Step, ...]
    cleanup: tuple[Step, ...] = ()
    """Steps that always run when the job ends, however it ends (a ``finally`` block): leave heaters
    and outputs off. A failing cleanup step is logged and the next one still runs; cleanup never
    pauses for a held queue."""
    cleanup_timeout_s: PositiveSeconds = 30.0
    """The longest the cleanup may take (also what the server's shutdown waits for it)."""
    cleanup_after_crash: bool = True
    """Run the cleanup at the next start when the server died (kill -9, power) while the job ran,
    once the job's resources can be locked (false: the job is only marked failed)."""
    roles: tuple[str, ...] = ("operator", "expert", "admin")
    """Roles allowed to submit it."""

