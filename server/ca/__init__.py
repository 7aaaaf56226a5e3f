"""EPICS Channel Access front-end: the process database served by caproto.

Modules, outside in:

* :mod:`server.ca.service` -- :class:`CAService`, the server's ``ca`` service: builds the
  channels, subscribes once to the database, runs the caproto server on the server's loop.
* :mod:`server.ca.context` -- caproto's asyncio server with labctl's binding, clean stop,
  put handling (ECA status per refusal) and access-rights refresh.
* :mod:`server.ca.channels` -- a PV as a caproto channel of its native DBR type, with
  DBR_CTRL metadata, EPICS event-mask delivery and the write path.
* :mod:`server.ca.fields` -- record fields (``.DESC``, ``.EGU``, ``.HIHI``, ``.SEVR``...).
* :mod:`server.ca.arbiter` -- lock commands for CA users (``ARB:<RES>:REQUEST``/``RELEASE``)
  and access rights that follow the lock.
* :mod:`server.ca.access` -- access rules (user and host groups, as in an EPICS ACF).
* :mod:`server.ca.env` -- ``EPICS_CAS_*`` settings and caproto's latency knobs.
"""

from server.ca.service import CAService

__all__ = ["CAService"]
