"""labctl's benchmarks: what labctl costs on top of the libraries it stands on.

Run with ``make bench`` (``python -m bench``; ``--quick`` for a short run, ``--help`` for
the options). Not part of the test suite: nothing here asserts a time; every figure is
measured, printed in a table, and written with its raw numbers to ``bench/results/``.

Theory of operation. Every comparison is made within one run, on one machine, beside a
baseline doing the same work. Servers and clients each run in a process of their own
(no two share a GIL), on loopback, driven by the orchestrator over JSON lines on their
standard streams (:mod:`bench.wire`, :mod:`bench.proc`); every loop is bounded and every
process is stopped when the run ends, however it ends.

* Servers (:mod:`bench.serve`): labctl's own :class:`labctl.server.app.Server` on a site
  generated in memory (:mod:`bench.site`), serving Channel Access and OPC UA and
  archiving, as in production; plain caproto; plain asyncua; and an EPICS IOC with the C
  core (pythonSoftIOC). One pacer (:mod:`bench.driver`) plays the instrument driver in
  all of them: N PVs updated at a total rate, each update stamped when it is posted.
* Clients (:mod:`bench.ca_client`: libca through pyepics; :mod:`bench.ua_client`:
  asyncua) subscribe to every PV and time each update from that stamp (DBR_TIME,
  SourceTimestamp) to its arrival, with callbacks kept lean so the client is not the
  limit. :mod:`bench.rig` joins a server and its clients into one measurement window.
* Scenarios: :mod:`bench.fanout`, :mod:`bench.roundtrip` (with :mod:`bench.stages`: the
  server-side time of each step of a write), :mod:`bench.archive`, :mod:`bench.scale`
  (with :mod:`bench.sitefile`), :mod:`bench.history`, :mod:`bench.loginflood`,
  :mod:`bench.sitebench` (several servers archiving into one database); run, printed and
  saved by :mod:`bench.cli` and :mod:`bench.report`.
* :mod:`bench.profiling` records labctl with py-spy under the fan-out and archive loads
  and at start-up, in separate repetitions, so the tables say where the time goes.

The machine should be otherwise idle: each window records how many cores other
processes kept busy (:class:`bench.env.LoadMeter`).
"""
