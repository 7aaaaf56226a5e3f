"""labctl instrument drivers: pyvisa drivers, transports and simulations.

Layout (each module's docstring gives its theory of operation):

* :mod:`drivers.transport` -- how command strings reach an instrument: VISA in a
  one-thread executor, an in-process simulation, and a fault-injecting wrapper.
* :mod:`drivers.base` -- the declarative base: ``control``/``measurement`` channel
  tables and :class:`~drivers.base.VisaDriver`, which implements
  :class:`ioc.driver.Driver`.
* :mod:`drivers.values` -- reply text to Python values and back.
* :mod:`drivers.lakeshore`, :mod:`drivers.keithley2400`, :mod:`drivers.tpg`,
  :mod:`drivers.scpi` -- the drivers; each documents its channel names.
* :mod:`drivers.cryostat` -- a dilution-refrigerator plant the Lake Shore 372 and TPG
  drivers can talk to.
* :mod:`drivers.registry` -- site-file configuration to drivers, transports and plants,
  and the checks the site-file checker runs.
* ``drivers/sim/<driver>.yaml`` -- pyvisa-sim definitions, one per driver.
"""
