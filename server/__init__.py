"""labctl server: protocol adapters, historian, authentication, wiring and the labctl command."""
