"""Errors the client library raises, drawn as a tree::

    ClientError                     base; ``str()`` is one line a person understands
    ├── ConnectError                unreachable, login refused, or the security is not offered
    ├── NoSuchPV (KeyError)         the server has no PV of that name
    ├── PutRefused                  the server refused (or failed) a write
    ├── RequestTimeout (TimeoutError)   the server did not answer in time
    ├── CommandRefused              the server refused (or failed) a control call
    │   ├── AccessDenied            the user's roles do not allow it (BadUserAccessDenied)
    │   └── LockUnavailable         the resource is locked by someone else (BadLocked)
    ├── LockWaitTimeout (TimeoutError)  a queued lock request was not granted in time
    └── ConnectionLost              the connection broke (while monitoring, or mid-request)

A refusal (:class:`PutRefused`, :class:`CommandRefused`) carries the server's StatusCode
name and number (``status``, ``code``) and its reason, which the server keeps per session
in ``Objects/<site>/Session/LastWriteRefusal`` and ``.../LastCallRefusal``.
"""

from __future__ import annotations


class ClientError(Exception):
    """Base of the errors this library raises; ``str()`` is one line a person understands."""


class ConnectError(ClientError):
    """The server cannot be reached, refused the login, or does not offer the security asked for."""


class NoSuchPV(ClientError, KeyError):
    """The server has no PV of that name."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(name)

    def __str__(self) -> str:
        return f"no PV named {self.name!r}"


class PutRefused(ClientError):
    """The server refused (or failed) a write. ``status`` is its StatusCode name, ``reason`` its sentence."""

    def __init__(self, pv: str, status: str, code: int, reason: str) -> None:
        self.pv = pv
        self.status = status
        self.code = code
        self.reason = reason
        super().__init__(f"{pv}: write refused ({status}): {reason}")


class RequestTimeout(ClientError, TimeoutError):
    """The server did not answer in time."""


class CommandRefused(ClientError):
    """The server refused (or failed) a control call: ``command`` is the method, ``status`` its StatusCode name, ``reason`` its sentence."""

    def __init__(self, command: str, status: str, code: int, reason: str) -> None:
        self.command = command
        self.status = status
        self.code = code
        self.reason = reason
        super().__init__(f"{reason} ({status})")


class AccessDenied(CommandRefused):
    """The user's roles do not allow it (BadUserAccessDenied)."""


class LockUnavailable(CommandRefused):
    """The resource is locked by someone else (BadLocked); the reason names the holder and until when."""


class LockWaitTimeout(ClientError, TimeoutError):
    """A queued lock request was not granted in time (the request is withdrawn)."""


class ConnectionLost(ClientError):
    """The connection to the server broke while monitoring."""
