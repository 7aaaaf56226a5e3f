"""Protocol adapters on loopback with real and independent clients (Channel Access, OPC UA)."""
