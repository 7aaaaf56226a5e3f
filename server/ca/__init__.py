"""EPICS Channel Access front-end: the process database served by caproto.

Modules, outside in:

* :mod:`labctl.server.ca.service` -- :class:`CAService`, the server's ``ca`` service: builds the
  channels, subscribes once to the database, runs the caproto server on the server's loop.
* :mod:`labctl.server.ca.context` -- caproto's asyncio server with labctl's binding, clean stop,
  put handling (ECA status per refusal) and access-rights refresh.
* :mod:`labctl.server.ca.channels` -- a PV as a caproto channel of its native DBR type, with
  EPICS event-mask delivery and the write path.
* :mod:`labctl.server.ca.metadata` -- DBR_CTRL metadata, record type and enum states of a PV.
* :mod:`labctl.server.ca.wire` -- text on the wire (UTF-8, clipped to DBR sizes) and put data
  decoded to Python.
* :mod:`labctl.server.ca.convert` -- values converted between a PV and the DBR types clients
  use, as an EPICS IOC converts them (puts and reads).
* :mod:`labctl.server.ca.fields` -- record fields (``.DESC``, ``.EGU``, ``.HIHI``, ``.SEVR``...).
* :mod:`labctl.server.ca.arbiter` -- lock commands for CA users (``ARB:<RES>:REQUEST``/``RELEASE``)
  and access rights that follow the lock.
* :mod:`labctl.server.ca.access` -- access rules (user and host groups, as in an EPICS ACF).
* :mod:`labctl.server.ca.env` -- ``EPICS_CAS_*`` settings and caproto's latency knobs.
* :mod:`labctl.server.ca.names` -- in a site, name searches over TCP answered for the PVs of the
  other servers (``EPICS_CA_NAME_SERVERS``), from the site directory.
"""

from labctl.server.ca.service import CAService

__all__ = ["CAService"]
