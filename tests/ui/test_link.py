"""The connection both interactive clients share (labctl.clients.link): real servers on loopback."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import pytest
from labctl.clients.credentials import NoPassword, password_for
from labctl.clients.errors import ConnectError, LoginRefused
from labctl.clients.link import Link, LinkState, LinkStatus
from labctl.clients.session import connect
from labctl.clients.values import Sample

from tests.helpers import free_port, wait_for
from tests.ui.conftest import TUI_DEMO_PASSWORDS

WAIT_S = 20.0


class Recorder:
    """What a link reports: every status, every sample, every missing name."""

    def __init__(self) -> None:
        self.statuses: list[LinkStatus] = []
        self.samples: list[Sample] = []
        self.missing: list[str] = []

    def link(self, url: str, user: str | None = "operator", password: str | None = None, **kw: Any) -> Link:
        if user and password is None:
            password = TUI_DEMO_PASSWORDS[user]
        kw.setdefault("reconnect_min_s", 0.05)
        kw.setdefault("reconnect_max_s", 0.2)
        return Link(
            url,
            user,
            password,
            "None",
            on_status=self.statuses.append,
            on_sample=self.samples.append,
            on_missing=self.missing.extend,
            **kw,
        )

    def states(self) -> list[LinkState]:
        return [s.state for s in self.statuses]

    def values(self, name: str) -> list[Any]:
        return [s.reading.value for s in self.samples if s.name == name]


async def stopped(link: Link, task: asyncio.Task) -> None:
    await link.close()
    assert task.done()


# ---- typed login refusal -------------------------------------------------------------------------


async def test_a_refused_login_is_a_login_refused(tui_demo):
    with pytest.raises(LoginRefused, match="login refused for user 'operator'"):
        await connect(tui_demo.url, "operator", "wrong-password", "None", timeout_s=5)


async def test_an_unreachable_server_is_not_a_login_refusal():
    with pytest.raises(ConnectError) as caught:
        await connect(f"opc.tcp://127.0.0.1:{free_port()}", "operator", "x", "None", timeout_s=5)
    assert not isinstance(caught.value, LoginRefused)


# ---- the link -------------------------------------------------------------------------------------


async def test_subscribes_the_wanted_set_and_restores_it_after_a_restart(tui_demo):
    rec = Recorder()
    link = rec.link(tui_demo.url)
    link.watch(["LAB:NOTE"])
    task = asyncio.create_task(link.run())
    try:
        await wait_for(lambda: rec.values("LAB:NOTE"), WAIT_S, "the current value first")
        status = link.status
        assert status.state is LinkState.CONNECTED and status.user == "operator" and status.site
        assert rec.states() == [LinkState.CONNECTED] and link.connects == 1
        tui_demo.srv.db.post("LAB:NOTE", "first")
        await wait_for(lambda: "first" in rec.values("LAB:NOTE"), WAIT_S, "a change")

        await tui_demo.stop()
        await wait_for(lambda: link.status.state is LinkState.RECONNECTING, WAIT_S, "the loss to be noticed")
        lost = link.status
        assert lost.attempt == 1 and lost.retry_in_s == 0.05 and lost.reason  # the shared backoff's first delay
        assert link.session is None

        server = await tui_demo.start()  # same port
        await wait_for(lambda: link.status.state is LinkState.CONNECTED, WAIT_S, "the reconnection")
        assert link.connects == 2 and link.status.attempt == 0 and link.status.retry_in_s is None
        attempts = [s.attempt for s in rec.statuses if s.state is LinkState.RECONNECTING]
        assert attempts == list(range(1, len(attempts) + 1)), "each retry counted once"
        assert all(s.since == lost.since for s in rec.statuses if s.state is LinkState.RECONNECTING), "the loss keeps its time"
        server.db.post("LAB:NOTE", "back again")
        await wait_for(lambda: "back again" in rec.values("LAB:NOTE"), WAIT_S, "the restored subscription")
    finally:
        await stopped(link, task)


async def test_a_refused_login_fails_once_and_is_not_retried(tui_demo):
    rec = Recorder()
    tries = 0

    async def counting_connect() -> Any:
        nonlocal tries
        tries += 1
        return await connect(tui_demo.url, "operator", "wrong-password", "None", timeout_s=5)

    link = rec.link(tui_demo.url, connector=counting_connect)
    await asyncio.wait_for(link.run(), WAIT_S)  # returns by itself
    assert rec.states() == [LinkState.FAILED] and tries == 1 and link.connects == 0
    assert "login refused for user 'operator'" in link.status.reason and link.status.retry_in_s is None


async def test_an_unreachable_server_is_retried_with_a_doubling_delay():
    rec = Recorder()
    link = rec.link(f"opc.tcp://127.0.0.1:{free_port()}", reconnect_min_s=0.01, reconnect_max_s=0.04)
    task = asyncio.create_task(link.run())
    try:
        await wait_for(lambda: len(rec.statuses) >= 4, WAIT_S, "four attempts")
        first = rec.statuses[:4]
        assert [s.state for s in first] == [LinkState.CONNECTING] * 4, "never connected: connecting, not reconnecting"
        assert [s.retry_in_s for s in first] == [0.01, 0.02, 0.04, 0.04]
        assert [s.attempt for s in first] == [1, 2, 3, 4]
        assert "connection refused" in first[0].reason
    finally:
        await stopped(link, task)


async def test_names_the_server_lacks_are_reported_and_the_rest_subscribed(tui_demo):
    rec = Recorder()
    link = rec.link(tui_demo.url)
    link.watch(["NO:SUCH:PV", "LAB:NOTE"])
    task = asyncio.create_task(link.run())
    try:
        await wait_for(lambda: rec.values("LAB:NOTE"), WAIT_S, "the PV the server has")
        assert rec.missing == ["NO:SUCH:PV"] and link.unknown == {"NO:SUCH:PV"}
    finally:
        await stopped(link, task)


async def test_changing_the_wanted_set_replaces_the_subscription(tui_demo):
    rec = Recorder()
    link = rec.link(tui_demo.url)
    link.watch(["LAB:NOTE"])
    task = asyncio.create_task(link.run())
    try:
        await wait_for(lambda: rec.values("LAB:NOTE"), WAIT_S, "the first set")
        link.watch(["PSU:VOLT:SP"])
        await wait_for(lambda: any(s.name == "PSU:VOLT:SP" for s in rec.samples), WAIT_S, "the second set")
        rec.samples.clear()
        tui_demo.srv.db.post("LAB:NOTE", "unwatched")
        tui_demo.srv.db.post("PSU:VOLT:SP", 1.25)
        await wait_for(lambda: 1.25 in rec.values("PSU:VOLT:SP"), WAIT_S, "a change of the watched PV")
        assert rec.values("LAB:NOTE") == [], "the old set is no longer subscribed"
    finally:
        await stopped(link, task)


async def test_session_work_that_reports_a_loss_makes_the_link_reconnect(tui_demo):
    rec = Recorder()
    seen: list[str] = []

    async def work(session: Any) -> str | None:
        seen.append(session.user)
        if len(seen) == 1:
            return "the work said so"
        await asyncio.Event().wait()  # the second session stays
        return None

    link = rec.link(tui_demo.url, on_session=work)
    task = asyncio.create_task(link.run())
    try:
        await wait_for(lambda: link.connects == 2 and link.status.state is LinkState.CONNECTED, WAIT_S, "the second session")
        assert seen == ["operator", "operator"]
        assert [s.reason for s in rec.statuses if s.state is LinkState.RECONNECTING] == ["the work said so"]
    finally:
        await stopped(link, task)


async def test_lost_drops_the_session_and_connects_again(tui_demo):
    rec = Recorder()
    link = rec.link(tui_demo.url)
    task = asyncio.create_task(link.run())
    try:
        await wait_for(lambda: link.status.state is LinkState.CONNECTED, WAIT_S, "connected")
        link.lost("a request failed")
        await wait_for(lambda: link.connects == 2 and link.status.state is LinkState.CONNECTED, WAIT_S, "the second session")
        assert [s.reason for s in rec.statuses if s.state is LinkState.RECONNECTING] == ["a request failed"]
    finally:
        await stopped(link, task)


# ---- the password, for every client command ---------------------------------------------------------


def test_the_password_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("LABCTL_PASSWORD", "s3cret")
    assert password_for("operator") == "s3cret"
    assert password_for(None) is None and password_for("") is None


def test_without_a_terminal_the_password_is_required_or_left_to_the_caller(monkeypatch):
    monkeypatch.delenv("LABCTL_PASSWORD", raising=False)
    r, w = os.pipe()
    with os.fdopen(r) as not_a_terminal, os.fdopen(w, "w"):
        monkeypatch.setattr(sys, "stdin", not_a_terminal)
        with pytest.raises(NoPassword, match="no password for user 'operator': set LABCTL_PASSWORD"):
            password_for("operator")
        assert password_for("operator", required=False) is None  # the display asks in a dialog
