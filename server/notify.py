"""Alarm notification sinks: the log (always), webhooks and e-mail (by configuration).

Sending is blocking network I/O, so each sink sends in a worker thread; a sink that
fails logs one line and the alarm machinery goes on. Rate limiting happens before the
sinks (:class:`labctl.ioc.alarms.RateLimiter`), so a flapping PV cannot flood a mailbox; the
next message that goes out says how many were held back.

The site file's ``notifications`` section (:class:`NotificationsConfig`, with
:class:`WebhookConfig` and :class:`EmailConfig`) is defined here: only the server reads it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import smtplib
import urllib.request
from email.message import EmailMessage
from typing import Any, Literal

from labctl.ioc.alarms import AlarmEvent
from labctl.ioc.config.base import Model, PositiveSeconds
from labctl.ioc.types import Severity
from pydantic import Field

log = logging.getLogger("labctl.alarms")


class WebhookConfig(Model):
    """POST each alarm notification as JSON to a URL."""

    url: str = Field(pattern=r"^https?://")
    min_severity: Literal["MINOR", "MAJOR", "INVALID"] = "MAJOR"
    timeout_s: PositiveSeconds = 5.0


class EmailConfig(Model):
    """Send each alarm notification by e-mail (SMTP)."""

    smtp_host: str
    smtp_port: int = Field(25, gt=0, le=65535)
    sender: str
    to: tuple[str, ...] = Field(min_length=1)
    starttls: bool = False
    username: str | None = None
    password_env: str | None = None
    """Name of the environment variable holding the SMTP password (never the password itself)."""
    min_severity: Literal["MINOR", "MAJOR", "INVALID"] = "MAJOR"


class NotificationsConfig(Model):
    """Where alarm notifications go (the log always), and how often at most."""

    burst: int = Field(5, gt=0)
    """At most this many notifications per alarm source..."""
    window_s: PositiveSeconds = 60.0
    """...within this window."""
    global_burst: int = Field(50, gt=0)
    """At most this many notifications in all per window."""
    webhooks: tuple[WebhookConfig, ...] = ()
    email: EmailConfig | None = None


def payload(event: AlarmEvent, site: str, suppressed: int) -> dict[str, Any]:
    """The JSON body of a notification."""
    a = event.alarm
    return {
        "site": site,
        "event": event.kind,
        "source": a.source,
        "severity": a.latched.name,
        "current_severity": a.current.name,
        "status": a.status.name,
        "message": a.message,
        "guidance": a.guidance,
        "time": event.time,
        "user": event.user,
        "suppressed_before": suppressed,
    }


class Notifier:
    """Sends alarm notifications to the configured sinks."""

    def __init__(self, cfg: NotificationsConfig, site: str) -> None:
        self.cfg = cfg
        self.site = site
        self._pending: set[asyncio.Future[Any]] = set()
        self.sent = 0

    def notify(self, event: AlarmEvent, suppressed: int) -> None:
        """Log the event and hand it to every sink whose severity threshold it meets."""
        body = payload(event, self.site, suppressed)
        extra = f" ({suppressed} earlier notifications of this alarm were held back)" if suppressed else ""
        level = logging.WARNING if event.kind in ("raised", "changed") else logging.INFO
        log.log(level, "alarm %s: %s%s", event.kind, event.alarm.message, extra)
        self.sent += 1
        severity = event.alarm.latched
        loop = asyncio.get_running_loop()
        for hook in self.cfg.webhooks:
            if severity >= Severity[hook.min_severity]:
                self._track(loop.run_in_executor(None, _post, hook, body))
        mail = self.cfg.email
        if mail is not None and severity >= Severity[mail.min_severity]:
            self._track(loop.run_in_executor(None, _mail, mail, body))

    def _track(self, fut: asyncio.Future[Any]) -> None:
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)

    async def drain(self) -> None:
        """Wait for notifications in flight."""
        await asyncio.gather(*self._pending, return_exceptions=True)


def _post(hook: WebhookConfig, body: dict[str, Any]) -> None:
    req = urllib.request.Request(
        hook.url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=hook.timeout_s) as resp:  # noqa: S310 -- URL is from the site file, http(s) only
            resp.read()
    except OSError as e:
        log.warning("webhook %s failed: %s", hook.url, e)


def _mail(cfg: EmailConfig, body: dict[str, Any]) -> None:
    msg = EmailMessage()
    msg["Subject"] = f"[labctl {body['site']}] {body['severity']} {body['event']}: {body['source']}"
    msg["From"] = cfg.sender
    msg["To"] = ", ".join(cfg.to)
    text = f"{body['message']}\n\n{body['guidance']}\n" if body["guidance"] else f"{body['message']}\n"
    if body["suppressed_before"]:
        text += f"\n{body['suppressed_before']} earlier notifications of this alarm were held back.\n"
    msg.set_content(text)
    try:
        with smtplib.SMTP(cfg.smtp_host, cfg.smtp_port, timeout=10) as smtp:
            if cfg.starttls:
                smtp.starttls()
            if cfg.username:
                smtp.login(cfg.username, os.environ.get(cfg.password_env or "", ""))
            smtp.send_message(msg)
    except (OSError, smtplib.SMTPException) as e:
        log.warning("e-mail to %s failed: %s", ", ".join(cfg.to), e)
