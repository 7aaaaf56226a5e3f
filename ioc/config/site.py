"""The core's site model: what the process database is built from, and its cross-reference checks.

:class:`CoreSiteConfig` holds the sections the core reads (PVs, instruments, resources,
roles, users, tables, simulations, procedures, interlocks). Cross-references (a PV's
resource, a derived PV's inputs, a role named by a user) are checked after the per-field
validation, by :meth:`CoreSiteConfig.cross_check`, as (key path, message) pairs the loader
turns into ``file:line:col key.path: message`` lines. The complete site file adds the
server's sections (:class:`labctl.server.site.SiteConfig`) and extends the checks.

Names reserved for the server's internal actors (:data:`labctl.ioc.types.RESERVED_NAMES`:
``labctl``, ``system``...) are refused as role and user names wherever a site file
declares or grants them, so no site can give anyone an identity that reads like the
server's own (the authority itself is never granted by a name: ``Identity.internal``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from labctl.ioc.config.access import DEFAULT_ROLES, ResourceConfig, RoleConfig, UserConfig
from labctl.ioc.config.base import IDENT, Model, Name
from labctl.ioc.config.instruments import InstrumentConfig, SimulationConfig, TableConfig
from labctl.ioc.config.interlocks import InterlockConfig
from labctl.ioc.config.procedures import ProcedureConfig
from labctl.ioc.config.pvs import PVConfig
from labctl.ioc.expr import Expression, ExpressionError
from labctl.ioc.procedure import check_procedure
from labctl.ioc.types import RESERVED_NAMES, reserved

from labctl.yamlmodel import dotted


class CoreSiteConfig(Model):
    """The core's sections of a site file (the server adds its own: :class:`labctl.server.site.SiteConfig`)."""

    site: Name
    """Site name: the OPC UA namespace is ``urn:labctl:<site>``."""
    description: str = ""
    roles: dict[str, RoleConfig] = {}
    """Roles beyond (or redefining) viewer, operator, expert, admin."""
    users: tuple[UserConfig, ...] = ()
    resources: tuple[ResourceConfig, ...] = ()
    tables: dict[str, TableConfig] = {}
    simulations: dict[str, SimulationConfig] = {}
    instruments: tuple[InstrumentConfig, ...] = ()
    pvs: tuple[PVConfig, ...] = ()
    """PVs of no instrument: derived PVs (``expr``) and soft PVs (memory, with ``initial``).
    An entry with ``range`` stands for many PVs: read them through :meth:`iter_pvs`."""
    procedures: dict[str, ProcedureConfig] = {}
    """Procedures users submit as jobs."""
    interlocks: tuple[InterlockConfig, ...] = ()
    """Rules that watch PVs and protect the apparatus."""

    # ---- derived views -------------------------------------------------------------

    @property
    def all_roles(self) -> dict[str, RoleConfig]:
        """Default roles overlaid with the site's own."""
        merged = {k: RoleConfig(**v) for k, v in DEFAULT_ROLES.items()}
        merged.update(self.roles)
        return merged

    def iter_pvs(self) -> Iterator[tuple[InstrumentConfig | None, PVConfig]]:
        """Every PV with its instrument (None for soft and derived PVs)."""
        for inst in self.instruments:
            for pv in inst.pvs:
                yield inst, pv
        for entry in self.pvs:
            for pv in entry.expand():
                yield None, pv

    def resource_of(self, inst: InstrumentConfig | None, pv: PVConfig) -> str:
        """The resource a PV belongs to."""
        if pv.resource:
            return pv.resource
        return inst.default_resource if inst is not None else "soft"

    # ---- cross-reference checks ----------------------------------------------------

    def cross_check(self) -> list[tuple[tuple[Any, ...], str]]:
        """Problems that span several keys, as (key path, message)."""
        problems: list[tuple[tuple[Any, ...], str]] = []
        declared = {r.name for r in self.resources}
        implicit = {inst.default_resource for inst in self.instruments} | {"soft"}
        seen: dict[str, tuple[Any, ...]] = {}
        names = [i.name for i in self.instruments]
        for i, name in enumerate(names):
            if names.index(name) != i:
                problems.append((("instruments", i, "name"), f"duplicate instrument name {name!r}"))
        rnames = [r.name for r in self.resources]
        for i, name in enumerate(rnames):
            if rnames.index(name) != i:
                problems.append((("resources", i, "name"), f"duplicate resource name {name!r}"))
        for ii, inst in enumerate(self.instruments):
            if inst.simulation is not None and inst.simulation not in self.simulations:
                problems.append(
                    (("instruments", ii, "simulation"), f"unknown simulation {inst.simulation!r}; declared: {sorted(self.simulations)}")
                )
            for pi, pv in enumerate(inst.pvs):
                self._check_pv(pv, (pv.name,), ("instruments", ii, "pvs", pi), seen, declared | implicit, problems)
        for pi, entry in enumerate(self.pvs):
            path = ("pvs", pi)
            names = (fields["name"] for fields in entry.instances()) if entry.range else (entry.name,)
            self._check_pv(entry, names, path, seen, declared | implicit, problems)
            if entry.expr is None and entry.writable is False and entry.initial is None:
                problems.append((path, "a soft PV needs 'initial' or 'writable: true' (or 'expr' for a derived PV)"))
        for pi, entry in enumerate(self.pvs):
            for var in entry.inputs:
                if not IDENT.match(var) or "-" in var:
                    problems.append((("pvs", pi, "inputs", var), f"{var!r} is not a valid expression variable name"))
            unknown: dict[str, list[str]] = {}
            for fields in entry.instances() if entry.inputs else ():
                for var, src in fields.get("inputs", entry.inputs).items():
                    if src not in seen:
                        unknown.setdefault(var, []).append(src)
            for var, missing in unknown.items():  # one problem per input, however many numbers
                more = f" ({len(missing) - 1} more of this range are unknown too)" if len(missing) > 1 else ""
                problems.append((("pvs", pi, "inputs", var), f"unknown PV {missing[0]!r}{more}"))
        roles = self.all_roles
        for rname in self.roles:
            if reserved(rname):
                problems.append((("roles", rname), reserved_message("role", rname)))
        for pname, proc in self.procedures.items():
            problems.extend(check_procedure(pname, proc, set(seen)))
            for ri, res in enumerate(proc.resources):
                if res not in declared:
                    problems.append((("procedures", pname, "resources", ri), f"unknown resource {res!r}; declared: {sorted(declared)}"))
            for r in proc.roles:
                if r not in roles:
                    problems.append((("procedures", pname, "roles"), f"unknown role {r!r}; defined: {sorted(roles)}"))
        inames = [i.name for i in self.interlocks]
        for ii, ilk in enumerate(self.interlocks):
            path = ("interlocks", ii)
            if inames.index(ilk.name) != ii:
                problems.append((path + ("name",), f"duplicate interlock name {ilk.name!r}"))
            for pv in ilk.watched:
                if pv not in seen:
                    problems.append((path, f"unknown PV {pv!r}"))
            safe_pvs = [sv.pv for sv in ilk.actions.set]
            for si, sv in enumerate(ilk.actions.set):
                if sv.pv not in seen:
                    problems.append((path + ("actions", "set", si, "pv"), f"unknown PV {sv.pv!r}"))
                if safe_pvs.index(sv.pv) != si:
                    problems.append((path + ("actions", "set", si, "pv"), f"{sv.pv} has two safe values in this interlock"))
                if sv.hold and sv.why_writable:
                    problems.append((path + ("actions", "set", si, "why_writable"), "'why_writable' goes with 'hold: false'"))
            for ri, res in enumerate(ilk.actions.refuse_writes):
                if res not in declared | implicit:
                    problems.append((path + ("actions", "refuse_writes", ri), f"unknown resource {res!r}"))
            for r in ilk.reset_roles:
                if r not in roles:
                    problems.append((path + ("reset_roles",), f"unknown role {r!r}; defined: {sorted(roles)}"))
            for key in ("condition", "warn_condition", "clear"):
                src = getattr(ilk, key)
                if src is not None:
                    try:
                        Expression(src, list(ilk.inputs))
                    except ExpressionError as e:
                        problems.append((path + (key,), f"expression: {e}"))
        unames = [u.name for u in self.users]
        for ui, user in enumerate(self.users):
            if unames.index(user.name) != ui:
                problems.append((("users", ui, "name"), f"duplicate user name {user.name!r}"))
            if reserved(user.name):
                problems.append((("users", ui, "name"), reserved_message("user", user.name)))
            for r in user.roles:
                if r not in roles:
                    problems.append((("users", ui, "roles"), f"unknown role {r!r}; defined: {sorted(roles)}"))
        return problems

    @staticmethod
    def _check_pv(pv, names, path, seen, resources, problems) -> None:
        """The entry's resource is declared; each of its ``names`` is new."""
        taken = []
        for name in names:
            if name in seen:
                taken.append(name)
            else:
                seen[name] = path
        if taken:  # one problem per entry, however many numbers it has
            more = f"; {len(taken) - 1} more of its names are taken too" if len(taken) > 1 else ""
            problems.append((path + ("name",), f"duplicate PV name {taken[0]!r} (also at {dotted(seen[taken[0]])}){more}"))
        if pv.resource is not None and pv.resource not in resources:
            problems.append((path + ("resource",), f"unknown resource {pv.resource!r}; declared: {sorted(resources)}"))


def reserved_message(what: str, name: str) -> str:
    """The problem of a site naming a role or user like the server's internal actors."""
    return f"{what} name {name!r} is reserved for the server's internal actors (reserved: {sorted(RESERVED_NAMES)})"
