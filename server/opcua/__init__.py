"""The OPC UA front-end: the process database served with asyncua.

Modules, outside in:

* :mod:`labctl.server.opcua.service` -- the :class:`~labctl.server.opcua.service.OpcUaService` the
  server starts: endpoints, security policies, certificate, start and stop.
* :mod:`labctl.server.opcua.address_space` -- PVs as variable nodes (NodeIds, browse paths,
  folders, data types, EngineeringUnits, EURange, EnumStrings).
* :mod:`labctl.server.opcua.builders` -- the node builders: in bulk straight into asyncua's
  node table, or node by node through AddNodes.
* :mod:`labctl.server.opcua.values` -- readings as DataValues (value, quality, timestamps),
  PV types as Variant and DataTypes, access levels.
* :mod:`labctl.server.opcua.publisher` -- one database subscription feeding every client.
* :mod:`labctl.server.opcua.writes` -- Write requests through the core write path, refusals
  mapped to StatusCodes by one table.
* :mod:`labctl.server.opcua.history` -- HistoryRead (raw and processed) served from the historian.
* :mod:`labctl.server.opcua.site` -- on a server of a site: ``Objects/<site>/Site`` (the site's
  servers and ``FindOwners``), and the history of the other servers' PVs from the shared archive.
* :mod:`labctl.server.opcua.discovery` -- registration with OPC UA discovery servers (Part 12);
  a labctl server itself refuses RegisterServer (:mod:`labctl.server.opcua.processor`).
* :mod:`labctl.server.opcua.calls` -- the control layer's nodes, and its method calls routed,
  checked and answered for the calling session:
  :mod:`labctl.server.opcua.locking` (Part 100 locks of the resources, leases),
  :mod:`labctl.server.opcua.methods` (jobs, alarms, interlocks and the audit trail),
  :mod:`labctl.server.opcua.arguments` (signatures, argument checks, results).
* :mod:`labctl.server.opcua.control_events` -- alarm conditions, interlock and lease events.
* :mod:`labctl.server.opcua.sessions` -- per-session answers (UserAccessLevel, who am I, why was
  my write refused) and login checks asyncua has no hook for.
* :mod:`labctl.server.opcua.users` -- accounts, passwords, certificates, anonymous access.
* :mod:`labctl.server.opcua.units` -- unit symbols to UNECE codes.
* :mod:`labctl.server.opcua.pki` -- the server certificate, made for the server's ApplicationUri and kept;
  an operator's own certificate is used as supplied, or refused if it names another application.
"""

from labctl.server.opcua.service import OpcUaService

__all__ = ["OpcUaService"]
