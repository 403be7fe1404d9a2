"""How each kind of backend captures a session's state, logs in elsewhere and restores it."""
