"""labctl instrument drivers: pyvisa drivers, transports and simulations."""
