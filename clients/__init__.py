"""labctl clients: the session library, the command line, the TUI and the GUI."""
