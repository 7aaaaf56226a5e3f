"""Who may write what: lockable resources, roles (with the defaults every site has), users."""

from __future__ import annotations

import fnmatch
import re
from typing import Any

from labctl.ioc.config.base import Model, Name, PositiveSeconds
from pydantic import Field

PASSWORD_HASH = re.compile(r"^scrypt\$\d+\$\d+\$\d+\$[0-9a-f]{32}\$[0-9a-f]{64}$")

#: Roles every site has unless it redefines them.
DEFAULT_ROLES: dict[str, dict[str, Any]] = {
    "viewer": {"description": "reads PVs, history, locks, jobs, alarms and the audit trail; writes nothing"},
    "operator": {"description": "writes the apparatus, acknowledges alarms", "write": ["*"], "acknowledge": True},
    "expert": {
        "description": "an operator who may also shelve alarms and reset interlocks",
        "write": ["*"],
        "acknowledge": True,
        "shelve": True,
    },
    "admin": {
        "description": "an expert who may also break locks and cancel anyone's jobs",
        "write": ["*"],
        "acknowledge": True,
        "shelve": True,
        "admin": True,
    },
}


class ResourceConfig(Model):
    """A named group of PVs that is locked and written as one."""

    name: Name
    description: str = ""
    lockable: bool = True
    """Only the lock holder may write the PVs of a lockable resource."""
    max_lease_s: PositiveSeconds = 3600.0
    """The longest lease one request may take."""


class RoleConfig(Model):
    """What a role may do."""

    description: str = ""
    write: tuple[str, ...] = ()
    """Resource names or glob patterns this role may write (``*`` for all)."""
    acknowledge: bool = False
    """May acknowledge alarms."""
    shelve: bool = False
    """May shelve alarms and reset interlocks."""
    admin: bool = False
    """May break locks, cancel anyone's jobs, and do everything else."""

    def may_write(self, resource: str) -> bool:
        """Whether this role grants writing PVs of ``resource``."""
        return self.admin or any(fnmatch.fnmatchcase(resource, pat) for pat in self.write)


class UserConfig(Model):
    """A user account. Passwords are stored only as salted hashes (``labctl passwd``)."""

    name: Name
    roles: tuple[str, ...] = ("viewer",)
    password_hash: str | None = Field(None, pattern=PASSWORD_HASH.pattern)
    """``scrypt$N$r$p$salt$hash`` as printed by ``labctl passwd``."""
    certificate: str | None = None
    """Path of the user's X.509 certificate (PEM or DER) for certificate login."""
    description: str = ""

