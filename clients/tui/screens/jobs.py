"""The jobs panel: the queue, what runs, my jobs; submit a procedure; a job's log and results.

Jobs are not PVs, so the panel asks the server (``Session.jobs``) when it comes to the
front, every :data:`REFRESH_S` seconds while it stays there, and on ``r``. Submitting
picks one of the server's procedures (``Session.procedures``) and fills its parameters,
prefilled with their defaults; the server checks them. Without the session's job calls
the panel says so and shows nothing else.
"""

from __future__ import annotations

import json
from typing import Any

from labctl.clients.errors import ClientError
from labctl.clients.session import Session
from labctl.clients.tui.model import time_text
from labctl.clients.tui.screens.base import LiveScreen, api, session_work
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.timer import Timer
from textual.widgets import Button, DataTable, Input, Label, OptionList, Static

#: Seconds between refreshes while the panel is in front.
REFRESH_S = 2.0
COLUMNS = (("ID", "id"), ("PROCEDURE", "procedure"), ("OWNER", "owner"), ("STATE", "state"), ("PRIO", "priority"),
           ("SUBMITTED", "submitted"), ("STARTED", "started"), ("ENDED", "ended"), ("RESOURCES", "resources"), ("ERROR", "error"))  # fmt: skip
STATE_STYLES = {"running": "bold $success", "queued": "$primary", "failed": "bold $error", "cancelled": "$warning", "done": ""}


def state_content(job: Any) -> Content:
    """A job's state word, coloured, with ``(paused)`` when held, ``(cleanup)`` while its cleanup runs, and what holds it."""
    notes = ["paused"] if getattr(job, "paused", False) else []
    if getattr(job, "phase", "") == "cleanup":
        notes.append("cleanup")
    if getattr(job, "waiting_reason", ""):
        notes.append(job.waiting_reason)
    text = job.state + (f" ({'; '.join(notes)})" if notes else "")
    style = STATE_STYLES.get(job.state, "")
    return Content.styled(text, style) if style else Content(text)


def parse_param(text: str, spec: dict[str, Any]) -> Any:
    """A parameter typed as text, in the type the procedure declares (JSON otherwise)."""
    kind = str(spec.get("type", "")).lower()
    text = text.strip()
    if kind in ("float", "float64", "number"):
        return float(text)
    if kind in ("int", "integer"):
        return int(text, 0)
    if kind in ("bool", "boolean"):
        if text.lower() in ("true", "1", "on", "yes"):
            return True
        if text.lower() in ("false", "0", "off", "no"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if kind in ("str", "string", "text"):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


class JobsScreen(LiveScreen):
    """Jobs: queue and running, mine; submit, details, cancel."""

    BINDINGS = [
        Binding("s", "submit", "Submit"),
        Binding("enter", "details", "Details", show=False),
        Binding("c", "cancel_job", "Cancel job"),
        Binding("m", "toggle_mine", "Mine/all"),
        Binding("r", "refresh", "Refresh"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.mine = False
        self.jobs: list[Any] = []
        self._timer: Timer | None = None

    def compose_body(self) -> ComposeResult:
        with Vertical(id="jobs-body"):
            yield Static("", id="jobs-note")
            yield DataTable(id="jobs", cursor_type="row")

    def on_mount(self) -> None:
        table = self.query_one("#jobs", DataTable)
        for label, key in COLUMNS:
            table.add_column(label, key=key)
        table.focus()

    def on_screen_resume(self) -> None:
        super().on_screen_resume()
        self.refresh_jobs()
        if self._timer is None:
            self._timer = self.set_interval(REFRESH_S, self.refresh_jobs)
        else:
            self._timer.resume()

    def on_screen_suspend(self) -> None:
        if self._timer is not None:
            self._timer.pause()

    def set_session(self, session: Session | None) -> None:
        super().set_session(session)
        if session is not None and self.is_mounted:
            self.refresh_jobs()

    # ---- data --------------------------------------------------------------------------------

    @session_work(exclusive=True, group="jobs")
    async def refresh_jobs(self) -> None:
        """Fetch the job list."""
        note = self.query_one("#jobs-note", Static)
        jobs = api(self.session, "jobs")
        if self.session is None:
            return
        if jobs is None:
            note.update("This client cannot show jobs: its session has no job calls (Session.jobs, submit, job, cancel).")
            return
        try:
            found = await jobs(mine=self.mine)
        except ClientError as e:
            self.report(e, "jobs")
            return
        self.show_jobs(list(found))

    def show_jobs(self, jobs: list[Any]) -> None:
        """Lay out the jobs, newest first (the cursor stays on the same job)."""
        jobs = sorted(jobs, key=lambda j: j.id, reverse=True)
        self.jobs = jobs
        table = self.query_one("#jobs", DataTable)
        keep = self.current
        table.clear()
        for j in jobs:
            table.add_row(
                str(j.id),
                j.procedure,
                j.owner,
                state_content(j),
                str(j.priority),
                time_text(j.submitted_at)[:8],
                time_text(j.started_at)[:8],
                time_text(j.ended_at)[:8],
                ", ".join(j.resources),
                j.error,
                key=str(j.id),
            )
        ids = [j.id for j in jobs]
        if keep is not None and keep.id in ids:
            table.move_cursor(row=ids.index(keep.id), animate=False)
        running = sum(1 for j in jobs if j.state == "running")
        queued = sum(1 for j in jobs if j.state == "queued")
        whose = "my jobs" if self.mine else "all jobs"
        self.query_one("#jobs-note", Static).update(f"{whose}: {running} running, {queued} queued, {len(jobs)} listed")

    @property
    def current(self) -> Any | None:
        """The job under the cursor."""
        table = self.query_one("#jobs", DataTable)
        row = table.cursor_row
        return self.jobs[row] if self.jobs and 0 <= row < len(self.jobs) else None

    # ---- actions ------------------------------------------------------------------------------

    def action_refresh(self) -> None:
        """Fetch the jobs again."""
        self.refresh_jobs()

    def action_toggle_mine(self) -> None:
        """Show my jobs only, or everyone's."""
        self.mine = not self.mine
        self.refresh_jobs()

    @on(DataTable.RowSelected, "#jobs")
    def action_details(self) -> None:
        """Show the log and results of the job under the cursor."""
        job = self.current
        if job is not None and self.session is not None and api(self.session, "job") is not None:
            self.app.push_screen(JobDetailScreen(self.session, job.id))

    def action_cancel_job(self) -> None:
        """Cancel the job under the cursor."""
        job = self.current
        if job is not None:
            self.cancel_job(job.id)

    @session_work(exclusive=True, group="job-command")
    async def cancel_job(self, job_id: int) -> None:
        """Ask the server to cancel a job; show its refusal."""
        cancel = api(self.session, "cancel")
        if cancel is None:
            self.notify("this client cannot cancel jobs (its session has no cancel call)", severity="error")
            return
        try:
            await cancel(job_id)
        except ClientError as e:
            self.notify(f"cancel job {job_id}: {getattr(e, 'reason', None) or e}", severity="error", timeout=10)
            return
        self.notify(f"job {job_id} cancelled")
        self.refresh_jobs()

    def action_submit(self) -> None:
        """Choose a procedure, fill its parameters and submit it."""
        if self.session is None or api(self.session, "submit") is None or api(self.session, "procedures") is None:
            self.notify("this client cannot submit jobs (its session has no submit call)", severity="error")
            return

        def done(job_id: int | None) -> None:
            if job_id is not None:
                self.tell_submitted(job_id)
                self.refresh_jobs()

        self.app.push_screen(SubmitDialog(self.session), done)


    @session_work(group="submitted")
    async def tell_submitted(self, job_id: int) -> None:
        """Say the job was submitted, and what holds it if something does (an interlock, a lock)."""
        job = api(self.session, "job")
        reason = ""
        if job is not None:
            try:
                reason = getattr(await job(job_id), "waiting_reason", "")
            except ClientError:
                reason = ""
        if reason:
            self.notify(f"job {job_id} submitted but held: {reason}", severity="warning", timeout=10)
        else:
            self.notify(f"job {job_id} submitted")


class SubmitDialog(ModalScreen[int]):
    """Pick a procedure and its parameters; dismisses with the new job's id."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session
        self.procedures: list[Any] = []
        self.chosen: Any = None

    def compose(self) -> ComposeResult:
        with Vertical(id="submit-box", classes="dialog"):
            yield Static(Content.styled("Submit a procedure", "bold"))
            yield OptionList(id="submit-procedures")
            yield Static("", id="submit-description")
            yield VerticalScroll(id="submit-params")
            yield Static("", id="submit-message")
            with Horizontal(classes="buttons"):
                yield Button("Submit", id="submit-ok", variant="primary")
                yield Button("Cancel", id="submit-cancel")

    def on_mount(self) -> None:
        self.load_procedures()

    @session_work(exclusive=True, group="procedures")
    async def load_procedures(self) -> None:
        """Fetch the server's procedures."""
        procedures = api(self.session, "procedures")
        assert procedures is not None
        try:
            self.procedures = list(await procedures())
        except ClientError as e:
            self.query_one("#submit-message", Static).update(str(e))
            return
        options = self.query_one("#submit-procedures", OptionList)
        options.add_options([p.name for p in self.procedures])
        if self.procedures:
            options.highlighted = 0
        options.focus()

    @on(OptionList.OptionHighlighted, "#submit-procedures")
    async def _procedure(self, event: OptionList.OptionHighlighted) -> None:
        proc = self.procedures[event.option_index]
        self.chosen = proc
        text = proc.description + (f"\nneeds: {', '.join(proc.resources)}" if proc.resources else "")
        self.query_one("#submit-description", Static).update(text)
        box = self.query_one("#submit-params", VerticalScroll)
        await box.remove_children()
        widgets: list[Any] = []
        for name, spec in proc.params.items():
            default = spec.get("default")
            doc = " ".join(str(x) for x in (spec.get("type", ""), spec.get("description", "")) if x)
            widgets.append(Label(f"{name}  {doc}"))
            widgets.append(Input("" if default is None else str(default), id=f"param-{name}", classes="param"))
        widgets.append(Label("priority"))
        widgets.append(Input("0", id="submit-priority"))
        await box.mount_all(widgets)

    @on(Button.Pressed, "#submit-ok")
    @on(Input.Submitted)
    def _submit(self) -> None:
        proc = self.chosen
        if proc is None:
            return
        params: dict[str, Any] = {}
        try:
            for name, spec in proc.params.items():
                text = self.query_one(f"#param-{name}", Input).value
                if text.strip():
                    params[name] = parse_param(text, spec)
            priority = int(self.query_one("#submit-priority", Input).value or "0")
        except ValueError as e:
            self.query_one("#submit-message", Static).update(f"{e}")
            return
        self.submit(proc.name, params, priority)

    @session_work(exclusive=True, group="submit")
    async def submit(self, procedure: str, params: dict[str, Any], priority: int) -> None:
        """Send the job; show the server's refusal word for word."""
        submit = api(self.session, "submit")
        assert submit is not None
        try:
            job_id = await submit(procedure, params, priority=priority)
        except ClientError as e:
            self.query_one("#submit-message", Static).update(f"refused: {getattr(e, 'reason', None) or e}")
            return
        self.dismiss(job_id)

    @on(Button.Pressed, "#submit-cancel")
    def action_cancel(self) -> None:
        """Close without submitting."""
        self.dismiss(None)


class JobDetailScreen(ModalScreen[None]):
    """A job's state, log and results."""

    BINDINGS = [Binding("escape", "close", "Close"), Binding("r", "refresh", "Refresh")]

    def __init__(self, session: Session, job_id: int) -> None:
        super().__init__()
        self.session = session
        self.job_id = job_id
        self.detail: Any = None

    def compose(self) -> ComposeResult:
        with Vertical(id="job-box", classes="dialog"):
            yield Static(Content.styled(f"Job {self.job_id}", "bold"), id="job-title")
            yield Static("", id="job-summary")
            yield Label("log")
            yield DataTable(id="job-log", cursor_type="row")
            yield Label("results")
            yield DataTable(id="job-results", cursor_type="row")

    def on_mount(self) -> None:
        self.query_one("#job-log", DataTable).add_columns("TIME", "MESSAGE")
        self.query_one("#job-results", DataTable).add_columns("TIME", "PV", "VALUE", "SEVERITY", "STATUS", "LABEL")
        self.load()

    def action_refresh(self) -> None:
        """Fetch the job again."""
        self.load()

    def action_close(self) -> None:
        """Back to the jobs panel."""
        self.dismiss(None)

    @session_work(exclusive=True, group="job")
    async def load(self) -> None:
        """Fetch the job's detail."""
        job = api(self.session, "job")
        assert job is not None
        try:
            d = await job(self.job_id)
        except ClientError as e:
            self.query_one("#job-summary", Static).update(str(e))
            return
        self.detail = d
        params = ", ".join(f"{k}={v!r}" for k, v in d.params.items())
        lines = [f"{d.procedure}({params}) by {d.owner}, priority {d.priority}: " + state_content(d).plain]
        lines.append(f"submitted {time_text(d.submitted_at, date=True)}, started {time_text(d.started_at) or '-'}, ended {time_text(d.ended_at) or '-'}")
        if d.error:
            lines.append(f"error: {d.error}")
        self.query_one("#job-summary", Static).update("\n".join(lines))
        log = self.query_one("#job-log", DataTable)
        log.clear()
        for t, message in d.log:
            log.add_row(time_text(t), message)
        results = self.query_one("#job-results", DataTable)
        results.clear()
        for t, pv, value, severity, status, label in d.results:
            results.add_row(time_text(t), pv, repr(value), severity, status, label)
