"""Fixtures for the driver tests: scripted instruments, pyvisa-sim copies, a fake clock.

* ``expected_protocol`` -- pymeasure's ``expected_protocol`` for our async drivers: the
  driver talks to a :class:`~tests.drivers.fakes.ScriptedTransport` that plays an
  instrument following a script of ``(command, reply)`` exchanges and fails the test on
  any other command.
* ``sim_file`` -- a private copy of a shipped pyvisa-sim definition. pyvisa caches one
  simulated library (and so the simulated devices' state) per file path for the whole
  process, so each test gets its own path and starts from the file's defaults.
* ``clock`` -- a :class:`~tests.drivers.fakes.FakeClock` the cryostat plant reads
  instead of the wall clock.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from labctl.drivers.base import VisaDriver
from labctl.drivers.registry import SIM_DIR
from labctl.drivers.transport import VisaTransport

from tests.drivers.fakes import FakeClock, ScriptedTransport


@pytest.fixture
def expected_protocol() -> Callable[..., contextlib.AbstractAsyncContextManager[Any]]:
    """``async with expected_protocol(LakeShore336, [(cmd, reply), ...]) as driver:``.

    The driver's link is open (no identity check is played unless scripted and
    ``connect=True``); on leaving the block every scripted exchange must have happened.
    """

    @contextlib.asynccontextmanager
    async def play(
        driver_cls: type[VisaDriver], script: Sequence[tuple[str, str | None]], *, connect: bool = False, **kwargs: Any
    ) -> AsyncIterator[VisaDriver]:
        transport = ScriptedTransport(script)
        driver = driver_cls("dut", transport, **kwargs)
        if connect:
            await driver.connect()
        else:
            await transport.open()
        yield driver
        transport.assert_done()

    return play


@pytest.fixture
def sim_file(tmp_path: Path) -> Callable[[str], Path]:
    """``sim_file("lakeshore336")``: a private copy of the shipped pyvisa-sim definition."""

    def copy(model: str, *, edit: Callable[[str], str] | None = None) -> Path:
        target = tmp_path / f"{model}.yaml"
        text = (SIM_DIR / f"{model}.yaml").read_text(encoding="utf-8")
        if edit is not None:
            text = edit(text)
        target.write_text(text, encoding="utf-8")
        return target

    return copy


@pytest.fixture
def sim_driver(sim_file: Callable[..., Path]) -> Callable[..., contextlib.AbstractAsyncContextManager[Any]]:
    """``async with sim_driver(LakeShore336, resource) as driver:`` a connected driver on pyvisa-sim."""

    @contextlib.asynccontextmanager
    async def run(
        driver_cls: type[VisaDriver],
        resource: str,
        *,
        model: str | None = None,
        edit: Callable[[str], str] | None = None,
        timeout_s: float = 2.0,
        connect: bool = True,
    ) -> AsyncIterator[VisaDriver]:
        transport = VisaTransport(
            "dut",
            resource,
            library="@sim",
            sim_file=sim_file(model or driver_cls.model, edit=edit),
            timeout_s=timeout_s,
            write_termination=driver_cls.write_termination,
            read_termination=driver_cls.read_termination,
            serial=driver_cls.serial_settings,
        )
        driver = driver_cls("dut", transport)
        try:
            if connect:
                await driver.connect()
            yield driver
        finally:
            await driver.close()

    return run


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock starting at t = 1000 s."""
    return FakeClock()
