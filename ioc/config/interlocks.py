"""Interlocks in the site file: rules that watch PVs and the fixed actions a trip takes.

:mod:`labctl.ioc.interlocks` runs them as state machines.
"""

from __future__ import annotations

from typing import Any, Literal

from labctl.ioc.config.base import Model, Name
from pydantic import Field, model_validator


class SafeValue(Model):
    """Drive a PV to a value when an interlock trips, and keep it there while the interlock is engaged."""

    pv: str
    value: Any
    """The safe value, as a write of the PV takes it (a number, a state name or index...)."""
    hold: bool = True
    """Keep the PV at its safe value while the interlock is engaged (TRIPPED, CLEARING,
    RESET_NEEDED): a write of any other value is refused, from everyone, and if the
    instrument reports another value the safe one is written again. ``false``: driven once
    on trip, then writable (``labctl check`` warns unless ``why_writable`` says why)."""
    why_writable: str = ""
    """With ``hold: false``: why writing this PV while the interlock is engaged is safe."""


class InterlockActions(Model):
    """What a tripped interlock does. Fixed kinds, configured as data: nothing else can run."""

    hold_queue: bool = False
    """Hold the job queue: running jobs pause at their next step, queued ones wait."""
    refuse_writes: tuple[str, ...] = ()
    """Resources whose PVs nobody may write while engaged (the server's own actors excepted)."""
    set: tuple[SafeValue, ...] = ()
    """PVs driven to a safe value on trip (heater off), and held there while engaged."""


class InterlockConfig(Model):
    """A rule that watches PVs and protects the apparatus.

    Either the *level* form -- ``pv`` with ``warn`` / ``trip`` / ``resume`` thresholds in
    ``direction`` -- or the *condition* form -- an expression over ``inputs`` in
    ``condition`` (and optionally ``clear``).
    """

    name: Name
    description: str = ""
    pv: str | None = None
    direction: Literal["above", "below"] = "above"
    warn: float | None = None
    """Level form: beyond this, warn (no action)."""
    trip: float | None = None
    """Level form: beyond this for ``for_s``, trip."""
    resume: float | None = None
    """Level form: back beyond this (on the safe side) for ``clear_for_s``, release (default: ``trip``)."""
    condition: str | None = None
    """Condition form: trip while this expression over ``inputs`` is true for ``for_s``."""
    warn_condition: str | None = None
    clear: str | None = None
    """Condition form: release when this is true for ``clear_for_s`` (default: ``not condition``)."""
    inputs: dict[str, str] = {}
    invalid_trips: bool = True
    """An INVALID input counts as the trip condition (a dead sensor is not a safe sensor)."""
    for_s: float = Field(0.0, ge=0)
    """Grace period: the trip condition must hold this long."""
    clear_for_s: float = Field(0.0, ge=0)
    """The release condition must hold this long."""
    reset: Literal["auto", "manual"] = "auto"
    """``manual``: after clearing, an authorised person must reset it."""
    reset_roles: tuple[str, ...] = ("expert", "admin")
    actions: InterlockActions = InterlockActions()

    @model_validator(mode="after")
    def _form(self) -> InterlockConfig:
        level = self.pv is not None
        cond = self.condition is not None
        if level == cond:
            raise ValueError("an interlock needs either 'pv' with 'trip' (level form) or 'condition' with 'inputs'")
        if level:
            if self.trip is None:
                raise ValueError("a level interlock needs 'trip'")
            sign = 1 if self.direction == "above" else -1
            if self.warn is not None and sign * (self.warn - self.trip) > 0:
                raise ValueError(f"'warn' must come before 'trip' when rising {self.direction} ({self.warn} vs {self.trip})")
            if self.resume is not None and sign * (self.resume - self.trip) > 0:
                raise ValueError(f"'resume' must be on the safe side of 'trip' ({self.resume} vs {self.trip})")
            if self.inputs or self.clear or self.warn_condition:
                raise ValueError("'inputs', 'clear' and 'warn_condition' belong to the condition form")
        else:
            if not self.inputs:
                raise ValueError("a condition interlock needs 'inputs' (expression variable -> PV name)")
            if self.warn is not None or self.trip is not None or self.resume is not None:
                raise ValueError("'warn', 'trip' and 'resume' belong to the level form (with 'pv')")
        return self

    @property
    def watched(self) -> list[str]:
        """The PVs the rule reads."""
        return [self.pv] if self.pv else list(self.inputs.values())

