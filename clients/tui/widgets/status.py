"""The status line (connection, user, alarms) and the banner shown while disconnected."""

from __future__ import annotations

from labctl.clients.tui.link import LinkState, LinkStatus
from labctl.clients.tui.model import AlarmSummary, time_text
from labctl.clients.tui.widgets.pv_table import severity_style
from labctl.ioc.types import Severity
from textual.content import Content
from textual.widgets import Static

STATE_STYLES = {
    LinkState.CONNECTING: "$warning",
    LinkState.CONNECTED: "$success",
    LinkState.RECONNECTING: "bold $warning",
    LinkState.FAILED: "bold $error",
}


def status_content(status: LinkStatus, summary: AlarmSummary, pv_count: int, held: tuple[str, ...] = ()) -> Content:
    """The status line: ``● connected  demo · operator [operator] │ 47 PVs │ alarms ...``."""
    parts: list[Content] = [Content.styled(f"● {status.state.value}", STATE_STYLES[status.state])]
    if status.site:
        roles = f" [{', '.join(status.roles)}]" if status.roles else ""
        parts.append(Content(f"  {status.site} · {status.user or 'anonymous'}{roles}"))
    parts.append(Content(f"  │ {pv_count} PVs"))
    if summary.total_active or summary.total_unacked:
        style = severity_style(summary.highest) if summary.highest is not Severity.NO_ALARM else ""
        text = f"alarms: {summary.total_active} active ({summary.highest.name})"
        if summary.total_unacked:
            text += f", {summary.total_unacked} unacknowledged"
        parts += [Content("  │ "), Content.styled(text, style) if style else Content(text)]
    else:
        parts.append(Content("  │ no alarms"))
    if held:
        parts.append(Content(f"  │ my locks: {', '.join(held)}"))
    return Content("").join(parts)


def banner_content(status: LinkStatus) -> Content:
    """What the banner says while the link is not connected."""
    if status.state is LinkState.FAILED:
        return Content(f"Not connected: {status.reason}  (fix the user or password and start again; q quits)")
    if status.state is LinkState.CONNECTING and not status.reason:
        return Content(f"Connecting to {status.url} …")
    what = "Connection lost" if status.site else "Cannot connect"
    retry = f"; attempt {status.attempt}, next in {status.retry_in_s:g} s" if status.retry_in_s is not None else ""
    since = f" since {time_text(status.since)[:8]}" if status.site else ""
    return Content(f"{what}{since}: {status.reason or status.url}{retry}. Values shown are the last received.")


class StatusLine(Static):
    """One line at the bottom: connection state, who, PV count, alarm summary, my locks."""

    def show(self, status: LinkStatus, summary: AlarmSummary, pv_count: int, held: tuple[str, ...] = ()) -> None:
        """Redraw from the app's state."""
        self.update(status_content(status, summary, pv_count, held))


class Banner(Static):
    """A full-width banner at the top, visible only while the link is not connected."""

    def show(self, status: LinkStatus) -> None:
        """Show (or hide) the banner for this link status."""
        visible = status.state is not LinkState.CONNECTED
        self.set_class(visible, "-visible")
        self.set_class(status.state is LinkState.FAILED, "-failed")
        if visible:
            self.update(banner_content(status))
