"""EPICS base's own Channel Access tools (caget, caput, camonitor, cainfo), run against a test server.

* :func:`find_tools` looks for them where ``scripts/install-epics-base.sh`` installs them
  (``$LABCTL_EPICS_PREFIX/bin``, default ``/usr/local/lib/labctl-epics/bin``), then on PATH.
  Missing tools skip the test with the command that installs them -- or, under ``CI=true``,
  fail it (a missing test dependency is an error there).
* :class:`EpicsTools` runs them as subprocesses of the test's event loop (the server runs in
  the same loop, so nothing blocks it), each pinned to one server: ``EPICS_CA_ADDR_LIST``
  127.0.0.1 only, ``EPICS_CA_AUTO_ADDR_LIST=NO``, ``EPICS_CA_SERVER_PORT`` the server's port,
  and a repeater port of their own; every run has a timeout and its output is returned whole.
  No ``caRepeater`` is on their PATH (libca would start one, shared between tests).
* :class:`Camonitor` runs ``camonitor`` and hands out its lines as they come, each awaited
  with a timeout, never slept for.
* :func:`fields` parses ``caget -d``'s "Key: value" lines into a dict.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import free_port
from tests.pg.availability import skip_or_fail

TOOLS = ("caget", "caput", "camonitor", "cainfo")
DEFAULT_PREFIX = "/usr/local/lib/labctl-epics"
INSTALL = "bash scripts/install-epics-base.sh (as root; or: bash scripts/install-test-deps.sh)"
#: How long one tool may run. Their own CA timeout (``-w``) is shorter.
RUN_TIMEOUT_S = 30.0
#: The tools' CA timeout (``caget -w``): connecting on loopback takes milliseconds, but the
#: machine may be busy. A read the server answers ECA_GETFAIL makes caget wait this long.
CA_TIMEOUT_S = 5.0


def tools_dir() -> tuple[Path | None, str]:
    """The directory holding all four tools, or (None, why and what to run)."""
    prefix = Path(os.environ.get("LABCTL_EPICS_PREFIX") or DEFAULT_PREFIX)
    if all(os.access(prefix / "bin" / t, os.X_OK) for t in TOOLS):
        return prefix / "bin", ""
    found = [shutil.which(t) for t in TOOLS]
    if all(found) and len({Path(f).parent for f in found if f}) == 1:
        return Path(found[0]).parent, ""  # type: ignore[arg-type]
    return None, f"EPICS base's CA tools ({', '.join(TOOLS)}) not found in {prefix / 'bin'} or on PATH; run: {INSTALL}"


def find_tools() -> Path:
    """The tools' directory; skips the test (fails it under CI=true) when they are missing."""
    bindir, why = tools_dir()
    if bindir is None:
        skip_or_fail(why)
    assert bindir is not None
    return bindir


@dataclass(frozen=True)
class Run:
    """One finished tool run."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """stdout and stderr together (caget writes CA exceptions to stderr)."""
        return self.stdout + self.stderr

    def __str__(self) -> str:
        return f"$ {' '.join(self.args)}\n(exit {self.returncode})\n{self.output}"


def fields(text: str) -> dict[str, str]:
    """``caget -d``/``cainfo`` output as {key: value} ("    Units:            K" -> {"Units": "K"})."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("    ") and ":" in line:
            key, _, value = line.strip().partition(":")
            out.setdefault(key.strip(), value.strip())
    return out


class EpicsTools:
    """The tools, pinned to the server on ``port`` of 127.0.0.1."""

    def __init__(self, bindir: Path, port: int) -> None:
        self.bindir = bindir
        self.port = port
        env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
        env.update(
            {
                "EPICS_CA_ADDR_LIST": "127.0.0.1",
                "EPICS_CA_AUTO_ADDR_LIST": "NO",
                "EPICS_CA_SERVER_PORT": str(port),
                "EPICS_CA_REPEATER_PORT": str(free_port(socket.SOCK_DGRAM)),
                # only the system's programs: no caRepeater next to the tools is found
                "PATH": os.pathsep.join(p for p in ("/usr/bin", "/bin") if Path(p).is_dir()),
            }
        )
        self.env = env

    async def run(self, tool: str, *args: str, timeout: float = RUN_TIMEOUT_S) -> Run:
        """Run ``tool args...`` to its end (killed after ``timeout``, which fails the test)."""
        argv = (str(self.bindir / tool), *args)
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=self.env, cwd="/"
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            out, err = await proc.communicate()
            raise AssertionError(
                f"{tool} {' '.join(args)} did not end within {timeout} s:\n{out.decode(errors='replace')}"
                f"{err.decode(errors='replace')}"
            ) from None
        return Run((tool, *args), proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))

    async def caget(self, *args: str, wait_s: float = CA_TIMEOUT_S) -> Run:
        """``caget -w <wait_s> args...``."""
        return await self.run("caget", "-w", f"{wait_s:g}", *args)

    async def caput(self, *args: str) -> Run:
        """``caput -w <timeout> args...``."""
        return await self.run("caput", "-w", f"{CA_TIMEOUT_S:g}", *args)

    async def cainfo(self, *args: str) -> Run:
        """``cainfo -w <timeout> args...``."""
        return await self.run("cainfo", "-w", f"{CA_TIMEOUT_S:g}", *args)

    @asynccontextmanager
    async def camonitor(self, *args: str) -> AsyncIterator[Camonitor]:
        """``camonitor args...`` running for the block; killed at its end."""
        argv = (str(self.bindir / "camonitor"), "-w", f"{CA_TIMEOUT_S:g}", *args)
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=self.env, cwd="/"
        )
        monitor = Camonitor(proc)
        try:
            yield monitor
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


class Camonitor:
    """A running ``camonitor``: its output lines, each awaited with a timeout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    async def line(self, timeout: float = 10.0) -> str:
        """The next line camonitor prints."""
        assert self.proc.stdout is not None
        try:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"camonitor printed nothing within {timeout} s; so far:\n" + "\n".join(self.lines)
            ) from None
        if not raw:
            raise AssertionError("camonitor ended; its output:\n" + "\n".join(self.lines))
        line = raw.decode(errors="replace").rstrip("\n")
        self.lines.append(line)
        return line

    async def until(self, predicate: Callable[[str], bool], timeout: float = 10.0) -> str:
        """The next line for which ``predicate(line)`` holds (earlier lines are kept in :attr:`lines`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            line = await self.line(max(0.01, deadline - loop.time()))
            if predicate(line):
                return line
