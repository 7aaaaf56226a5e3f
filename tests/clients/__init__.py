"""Client library and command-line tests against a real in-process server."""
