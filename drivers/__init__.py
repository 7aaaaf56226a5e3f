"""labctl instrument drivers: pyvisa drivers, transports and simulations.

Layout (each module's docstring gives its theory of operation):

* :mod:`labctl.drivers.transport` -- how command strings reach an instrument: VISA in a
  one-thread executor, an in-process simulation, and a fault-injecting wrapper.
* :mod:`labctl.drivers.base` -- the declarative base: ``control``/``measurement`` channel
  tables and :class:`~labctl.drivers.base.VisaDriver`, which implements
  :class:`labctl.ioc.driver.Driver`.
* :mod:`labctl.drivers.values` -- reply text to Python values and back, and
  :class:`~labctl.drivers.values.NoReading` for a channel with no reading now (switched off).
* :mod:`labctl.drivers.lakeshore`, :mod:`labctl.drivers.keithley2400`, :mod:`labctl.drivers.tpg`,
  :mod:`labctl.drivers.scpi` -- the drivers; each documents its channel names.
* :mod:`labctl.drivers.cryostat` -- a dilution-refrigerator plant, with a magnet on its 4 K
  plate, that the Lake Shore 372, Lake Shore 336 and TPG drivers can talk to.
* :mod:`labctl.drivers.sourcemeter`, :mod:`labctl.drivers.powersupply` -- a sample on a
  source-meter's terminals and a load on a supply, for the Keithley 2400 and ``scpi`` drivers.
* :mod:`labctl.drivers.registry` -- site-file configuration to drivers, transports and plants,
  and the checks the site-file checker runs.
* ``drivers/sim/<driver>.yaml`` -- pyvisa-sim definitions, one per driver.
"""
