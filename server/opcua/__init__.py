"""The OPC UA front-end: the process database served with asyncua.

Modules, outside in:

* :mod:`server.opcua.service` -- the :class:`~server.opcua.service.OpcUaService` the
  server starts: endpoints, security policies, certificate, start and stop.
* :mod:`server.opcua.address_space` -- PVs as variable nodes (NodeIds, browse paths,
  data types, EngineeringUnits, EURange, EnumStrings) and readings as DataValues.
* :mod:`server.opcua.publisher` -- one database subscription feeding every client.
* :mod:`server.opcua.writes` -- Write requests through the core write path, refusals
  mapped to StatusCodes by one table.
* :mod:`server.opcua.history` -- HistoryRead (raw and processed) served from the historian.
* :mod:`server.opcua.control` -- the control layer's nodes and methods: Part 100 locks of
  the resources, jobs, alarms, interlocks and the audit trail, for the calling session.
* :mod:`server.opcua.events` -- alarm conditions, interlock and lease events.
* :mod:`server.opcua.sessions` -- per-session answers (UserAccessLevel, who am I, why was
  my write refused) and login checks asyncua has no hook for.
* :mod:`server.opcua.users` -- accounts, passwords, certificates, anonymous access.
* :mod:`server.opcua.units` -- unit symbols to UNECE codes.
* :mod:`server.opcua.pki` -- the server certificate, made once and kept.
"""

from server.opcua.service import OpcUaService

__all__ = ["OpcUaService"]
