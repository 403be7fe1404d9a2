"""Free local ports for the servers the playground, the tests and the benchmarks start.

A port picked to be bound later must not be one the kernel hands out to outgoing connections:
under a busy test (thousands of client connections) an established connection can sit on it by
the time a server binds it, and a listener setting SO_REUSEADDR still may not share a port with
a connection that did not (rsync's SST daemon then dies at once). So ports come from outside
net.ipv4.ip_local_port_range.

Standard library only: the installed package must not depend on test libraries.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

from tiproxy.playground.install import LauncherError

HOST = "127.0.0.1"

_EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
_LOWEST_PICKED_PORT = 10000  # below: well-known and commonly configured services
_PICK_ATTEMPTS = 100


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing holds right now, outside the ephemeral range:
    below net.ipv4.ip_local_port_range (or above it, where the range starts low), chosen at
    random and proved free by binding it without SO_REUSEADDR."""
    low, high = _ephemeral_range()
    below, above = (_LOWEST_PICKED_PORT, low - 1), (high + 1, 65535)
    first, last = max(below, above, key=lambda span: span[1] - span[0])
    for _ in range(_PICK_ATTEMPTS):
        # no room outside the range (a system that made it everything): the kernel's choice
        port = random.randint(first, last) if last - first >= _PICK_ATTEMPTS else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            picked: int = sock.getsockname()[1]
            return picked
    raise LauncherError(f"no free port on {HOST} after {_PICK_ATTEMPTS} tries")


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range of local ports for outgoing connections (Linux's default elsewhere)."""
    try:
        low, high = map(int, Path(_EPHEMERAL_RANGE_FILE).read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high
