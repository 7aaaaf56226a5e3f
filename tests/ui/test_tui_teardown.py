"""A screen's call to the server that answers after the screen was taken down is dropped, not a crash on quitting."""

from __future__ import annotations

import asyncio

import pytest
from labctl.clients.tui.screens.base import session_work
from textual.app import App, ComposeResult
from textual.screen import Screen
from textual.widgets import Static


class Waiting(Screen):
    """A screen whose worker waits for its 'server', then shows the answer (as the alarms screen does)."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = asyncio.Event()
        self.asked = asyncio.Event()

    def compose(self) -> ComposeResult:
        yield Static("", id="shown")

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
    async with app.run_test() as pilot:
        screen = app.screen
        assert isinstance(screen, Waiting)
        screen.fetch()
        await asyncio.wait_for(screen.asked.wait(), 10)
        shown = screen.query_one("#shown", Static)
        app.pop_screen()  # the screen's widgets are removed first ...
        for _ in range(100):
            if not shown.is_attached:
                break
            await asyncio.sleep(0)
        assert not shown.is_attached and screen.is_attached, "the moment this test is about"
        screen.answer.set()  # ... and the answer comes before the screen itself is gone
        for _ in range(5):
            await pilot.pause()
        assert not screen.is_attached
    assert app.return_code in (None, 0)


async def test_a_missing_widget_on_a_screen_that_stays_is_still_an_error():
    app = Host()
    with pytest.raises(Exception, match="#never"):  # noqa: PT011 -- Textual re-raises the worker's error as its own
        async with app.run_test() as pilot:
            screen = app.screen
            assert isinstance(screen, Waiting)
            screen.look_for_what_never_was()
            await pilot.pause()
            await pilot.pause()
