"""Long-lived tasks that never die silently: one rule for every loop the server runs.

Theory of operation. A server runs a handful of tasks for as long as it lives: one per
instrument link, the lease-expiry timer, the OPC UA publisher and event emitter, the
Channel Access update pump. A bug in any of them used to end the task quietly -- its
exception surfaced only at shutdown as "Task exception was never retrieved" -- while
the rest of the server went on as if nothing had happened (an instrument's PVs kept
their last value with NO_ALARM). A :class:`Supervisor` runs such a task instead:

* it names the task (``asyncio`` task name and every log line);
* when the task's coroutine raises, it logs the traceback **once** per distinct failure
  (the same exception type and message again is one DEBUG line, not another traceback),
  calls ``on_failure(error)`` so the owner can show the failure (an instrument marks its
  PVs INVALID), then either restarts the coroutine after a delay from a
  :class:`~labctl.backoff.Backoff` (``restart=True``, the default) or gives up and calls
  ``on_fatal(error)`` (the server stops: a task it cannot do without has failed);
* a coroutine that has run for longer than the backoff's longest delay, or that calls
  :meth:`Supervisor.healthy`, counts as recovered: the backoff starts again from its
  shortest delay and the next failure is logged with its traceback again;
* a coroutine that returns ends supervision (the task decided it was done), and
  cancellation (:meth:`Supervisor.stop`) is never a failure.

The task's own result is always retrieved, so nothing reaches asyncio's "never
retrieved" path. The helper is protocol-free and clock-free but for ``asyncio.sleep``
and the loop's monotonic time, so :mod:`labctl.ioc.links` uses it as well as the server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from labctl.backoff import Backoff

log = logging.getLogger("labctl.supervision")

#: run() -> the coroutine to supervise (called again for every restart).
RunFn = Callable[[], Awaitable[None]]


class Supervisor:
    """Runs one long-lived coroutine, logs its failures once and restarts it with backoff."""

    def __init__(
        self,
        name: str,
        run: RunFn,
        *,
        backoff: Backoff | None = None,
        restart: bool = True,
        on_failure: Callable[[BaseException], None] | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.name = name
        self.backoff = backoff if backoff is not None else Backoff(0.5, 30.0)
        """Delays between restarts (reset once the coroutine is healthy again)."""
        self.restart = restart
        """Restart after a failure (True) or give up and call ``on_fatal`` (False)."""
        self.failures = 0
        """How many times the coroutine has failed since the supervisor started."""
        self.last_error = ""
        """``Type: message`` of the latest failure not followed by recovery ("" when healthy)."""
        self._run = run
        self._on_failure = on_failure
        self._on_fatal = on_fatal
        self._log = logger if logger is not None else log
        self._task: asyncio.Task[None] | None = None

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The supervising task (None before :meth:`start` and after :meth:`stop`)."""
        return self._task

    @property
    def running(self) -> bool:
        """Whether the supervising task is alive."""
        return self._task is not None and not self._task.done()

    def start(self) -> asyncio.Task[None]:
        """Start supervising in a task of the running loop; return that task."""
        if self.running:
            raise RuntimeError(f"{self.name}: already supervised")
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name=self.name)
        self._task.add_done_callback(_retrieve)
        return self._task

    async def stop(self) -> None:
        """Cancel the coroutine and wait until it has ended (it may swallow one cancellation)."""
        task, self._task = self._task, None
        if task is None:
            return
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)

    def healthy(self) -> None:
        """Note that the coroutine works again: reset the backoff; the next failure logs its traceback."""
        if self.last_error:
            self._log.info("%s: working again after %s", self.name, self.last_error)
        self.last_error = ""
        self.backoff.reset()

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self._run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the boundary for bugs of a long-lived task: reported here, once
                if loop.time() - started > self.backoff.max_s:
                    self.healthy()  # it ran well for a long while: a new failure, not the same one
                self.failures += 1
                signature = f"{type(e).__name__}: {e}"
                if not self.restart:
                    self._log.error("%s failed; it is not restarted", self.name, exc_info=e)
                elif signature != self.last_error:
                    self._log.error(
                        "%s failed; restarting in %.3g s", self.name, self.backoff.delay_s, exc_info=e
                    )
                else:
                    self._log.debug("%s failed again (%s); restarting in %.3g s", self.name, signature, self.backoff.delay_s)
                self.last_error = signature
                self._notify(self._on_failure, e, "on_failure")
                if not self.restart:
                    self._notify(self._on_fatal, e, "on_fatal")
                    return
            await asyncio.sleep(self.backoff.next())

    def _notify(self, fn: Callable[[BaseException], None] | None, error: BaseException, what: str) -> None:
        if fn is None:
            return
        try:
            fn(error)
        except Exception:  # the handler's own bug must not end supervision
            self._log.exception("%s: %s handler failed", self.name, what)


def supervise(name: str, run: RunFn, **kw: object) -> Supervisor:
    """Start a :class:`Supervisor` for ``run`` (keywords as its constructor's); return it."""
    sup = Supervisor(name, run, **kw)  # type: ignore[arg-type]
    sup.start()
    return sup


def _retrieve(task: asyncio.Task[None]) -> None:
    """Retrieve a finished supervising task's exception (a bug in the supervisor itself is logged, once)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("supervisor %s ended by an error", task.get_name(), exc_info=task.exception())
