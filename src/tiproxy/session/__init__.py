"""Per-session logic without I/O: connection phase, command inspection."""
