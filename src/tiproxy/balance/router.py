"""Which backend a new session goes to: the one with the fewest sessions among those that accept.

A backend that refused a connection, or whose greeting was an error, is skipped until its retry
time; the delay doubles with each failure in a row (up to a minute) and resets on success, so a
dead backend costs one failed connect per period, not one per client.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from tiproxy.protocol.packets import Greeting

log = logging.getLogger("tiproxy.router")

RETRY_FIRST = 1.0
RETRY_MAX = 60.0


@dataclass
class Backend:
    addr: str
    host: str
    port: int
    connections: int = 0
    failures: int = 0
    retry_at: float = 0.0
    last_error: str = ""
    query_counts: Counter[str] = field(default_factory=Counter)

    @property
    def status(self) -> str:
        return "down" if self.failures and time.monotonic() < self.retry_at else "healthy"


def split_addr(addr: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """"host:port" (the config has checked it); an empty host is `default_host`."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or default_host, int(port)


class Router:
    def __init__(self, addrs: list[str]) -> None:
        self.backends: dict[str, Backend] = {}
        self.template: Greeting | None = None  # the last greeting a backend sent
        self.set_backends(addrs)

    def set_backends(self, addrs: list[str]) -> None:
        """Replace the static list; backends that stay keep their counters."""
        fresh: dict[str, Backend] = {}
        for addr in addrs:
            host, port = split_addr(addr)
            fresh[addr] = self.backends.get(addr) or Backend(addr, host, port)
        self.backends = fresh

    def candidates(self) -> list[Backend]:
        """Backends to try for a new session, best first; those waiting to be retried last."""
        now = time.monotonic()
        ready = [b for b in self.backends.values() if not b.failures or now >= b.retry_at]
        return sorted(ready, key=lambda b: (b.connections, b.failures))

    def succeeded(self, backend: Backend, greeting: Greeting) -> None:
        backend.failures = 0
        backend.last_error = ""
        self.template = greeting

    def failed(self, backend: Backend, reason: str) -> None:
        backend.failures += 1
        backend.last_error = reason
        delay = min(RETRY_MAX, RETRY_FIRST * 2 ** (backend.failures - 1))
        backend.retry_at = time.monotonic() + delay
        log.warning("backend %s unavailable (%s); next try in %.0fs", backend.addr, reason, delay)
