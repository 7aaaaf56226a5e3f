"""Where a client's password comes from: ``LABCTL_PASSWORD``, else a prompt on a terminal.

Theory of operation. Every client command (``labctl get``, ``labctl tui``, ``labctl gui``...)
takes a user name as an option and its password from the environment or a prompt, never
from the command line, where it would land in the shell history and the process list.
:func:`password_for` is that rule, in one place. Without a terminal to prompt on, a
command that must have the password raises :class:`NoPassword` (kind ``usage``, as a
wrong argument: exit status 2); the display passes ``required=False`` and asks in a dialog instead.
"""

from __future__ import annotations

import getpass
import os
import sys

from labctl.clients.errors import ClientError

#: The environment variable a password is taken from.
PASSWORD_ENV = "LABCTL_PASSWORD"


class NoPassword(ClientError):
    """A user was given but no password can be had (no ``LABCTL_PASSWORD``, no terminal to prompt on)."""

    kind = "usage"


def password_for(user: str | None, *, required: bool = True) -> str | None:
    """The password of ``user``: ``LABCTL_PASSWORD``, else a prompt when standard input is a terminal.

    Args:
        user: the user name; None or empty logs in anonymously (no password: None).
        required: without a terminal, raise NoPassword (True) or return None (False: the
            caller asks some other way).

    Raises:
        NoPassword: ``required`` and neither the variable nor a terminal gives a password.
    """
    if not user:
        return None
    password = os.environ.get(PASSWORD_ENV)
    if password is not None:
        return password
    if not sys.stdin.isatty():
        if required:
            raise NoPassword(f"no password for user {user!r}: set {PASSWORD_ENV} or run on a terminal to be prompted")
        return None
    return getpass.getpass(f"password for {user}: ")
