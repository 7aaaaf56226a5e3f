"""A screen's call to the server that answers after the screen was taken down is dropped, not a crash on quitting."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from labctl.clients.tui.screens.base import session_work
from textual.app import App, ComposeResult
from textual.screen import Screen
from textual.widgets import Static
from textual.worker import WorkerState

from tests.helpers import wait_for


class Shown(Static):
    """A Static that calls ``when_gone`` as it is taken off its screen."""

    when_gone: Callable[[], None] = staticmethod(lambda: None)

    def on_unmount(self) -> None:
        self.when_gone()


class Waiting(Screen):
    """A screen whose worker waits for its 'server', then shows the answer (as the alarms screen does)."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = asyncio.Event()
        self.asked = asyncio.Event()

    def compose(self) -> ComposeResult:
        yield Shown("", id="shown")

    @session_work(exclusive=True, group="fetch")
    async def fetch(self) -> None:
        self.asked.set()
        await self.answer.wait()
        self.query_one("#shown", Static).update("the answer")

    @session_work(group="bug")
    async def look_for_what_never_was(self) -> None:
        self.query_one("#never", Static)


class Host(App):
    def on_mount(self) -> None:
        self.push_screen(Waiting())  # over the default screen, which stays when it is popped


async def test_an_answer_while_the_screen_is_taken_down_is_dropped():
    app = Host()
    async with app.run_test():
        screen = app.screen
        assert isinstance(screen, Waiting)
        worker = screen.fetch()
        await asyncio.wait_for(screen.asked.wait(), 10)
        shown = screen.query_one("#shown", Shown)
        seen: list[bool] = []

        def answer_now() -> None:  # the answer comes as the screen's widgets are removed, before the screen is gone
            seen.append(screen.is_attached)
            screen.answer.set()

        shown.when_gone = answer_now
        app.pop_screen()
        await asyncio.wait_for(worker.wait(), 10)  # raises WorkerFailed if the answer was not dropped
        assert worker.state is WorkerState.SUCCESS
        assert seen == [True], "the moment this test is about"
        await wait_for(lambda: not screen.is_attached, what="the screen gone")
    assert app.return_code in (None, 0)


async def test_a_missing_widget_on_a_screen_that_stays_is_still_an_error():
    app = Host()
    with pytest.raises(Exception, match="#never"):  # noqa: PT011 -- Textual re-raises the worker's error as its own
        async with app.run_test():
            screen = app.screen
            assert isinstance(screen, Waiting)
            await asyncio.wait_for(screen.look_for_what_never_was().wait(), 10)
