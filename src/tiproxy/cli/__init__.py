"""Command-line entry points: the tiproxy server, tiproxyctl and the playground."""
