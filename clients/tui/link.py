"""The terminal UI's connection: the shared :class:`~labctl.clients.link.Link`, its samples batched per display tick.

Theory of operation. Connecting, subscribing the PVs the screens want, reconnecting with
backoff and telling a refused login apart are :mod:`labctl.clients.link`'s; the app runs
:meth:`Link.run` in an exclusive Textual worker, so every callback comes on the app's
own loop. What this adds is the hand-over to the screen: samples are not handed on one
by one, the newest reading of each PV waits in :attr:`Link.pending` until the app takes
the whole batch on its display tick (:meth:`Link.take`), so a burst of thousands of
changes costs one repaint, and a PV that changes faster than the screen keeps only its
latest value.

Nothing here touches the terminal; the app turns :class:`LinkStatus` into the status
line and the banner.
"""

from __future__ import annotations

from typing import Any

from labctl.clients import link as _link
from labctl.clients.link import LinkState, LinkStatus
from labctl.clients.values import Sample
from labctl.ioc.types import Reading

__all__ = ["Link", "LinkState", "LinkStatus"]


class Link(_link.Link):
    """The shared link, keeping the newest reading of each PV until the app's next tick."""

    def __init__(self, url: str, user: str | None = None, password: str | None = None, security: str = "auto", **kw: Any) -> None:
        super().__init__(url, user, password, security, **kw)
        self.pending: dict[str, Reading] = {}
        """Newest reading of each PV that changed since the last :meth:`take`."""
        self.on_sample = self._keep

    def _keep(self, sample: Sample) -> None:
        self.pending[sample.name] = sample.reading

    def take(self) -> dict[str, Reading]:
        """The readings that arrived since the last call (newest per PV)."""
        batch, self.pending = self.pending, {}
        return batch
