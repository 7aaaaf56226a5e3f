"""The core's part of the site file: one YAML document that describes a whole labctl site.

Theory of operation: the YAML is composed (so every key keeps its line and column),
converted to Python data with the safe loader, and validated into frozen pydantic models
that forbid unknown keys. Cross-references (a PV's resource, a derived PV's inputs, a
role named by a user) are checked after the per-field validation. Every problem found
becomes one line ``site.yaml:14:7 instruments[0].pvs[2].unit: expected a string, got 12``
and all of them are raised together in one :class:`~labctl.ioc.errors.ConfigError`.

The modules here hold the sections the core reads, one concern each:
:mod:`~labctl.ioc.config.base` (the base model and shared field types),
:mod:`~labctl.ioc.config.pvs` (PVs, alarms, deadbands, numbered PVs),
:mod:`~labctl.ioc.config.instruments` (instruments, simulations, calibration tables),
:mod:`~labctl.ioc.config.access` (resources, roles, users),
:mod:`~labctl.ioc.config.procedures`, :mod:`~labctl.ioc.config.interlocks`,
:mod:`~labctl.ioc.config.site` (the core site model and its cross-reference checks) and
:mod:`~labctl.ioc.config.loader` (YAML to a model, with positions in every error).
The sections of the protocol adapters, the historian and the notifications belong to the
server, which composes them with the core site model into the complete site file
(:mod:`labctl.server.site`): a new adapter adds its section there, never here.

Layers above read these models; nothing here touches an instrument or a socket.
"""
