"""labctl process database: the protocol-, hardware- and storage-free core."""
