"""Which backend a session goes to, and which backends sessions must leave.

New sessions go to the backend with the fewest sessions among those that accept. A backend that
refused a connection, or whose greeting was an error, is skipped until its retry time; the delay
doubles with each failure in a row (up to a minute) and resets on success, so a dead backend
costs one failed connect per period, not one per client.

A backend is draining when it is in `[proxy] fail-backend-list`, was drained through the API, or
left the configured list: it gets no new sessions and its sessions move away at their next safe
point. A removed backend is forgotten once its last session has left.
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

DRAIN_API = "drained"
DRAIN_FAIL_LIST = "fail-backend-list"
DRAIN_REMOVED = "removed from config"


@dataclass
class Backend:
    addr: str
    host: str
    port: int
    connections: int = 0
    failures: int = 0
    retry_at: float = 0.0
    last_error: str = ""
    drained_by: set[str] = field(default_factory=set)  # the reasons it is draining
    query_counts: Counter[str] = field(default_factory=Counter)

    @property
    def draining(self) -> bool:
        return bool(self.drained_by)

    @property
    def down(self) -> bool:
        return bool(self.failures) and time.monotonic() < self.retry_at

    @property
    def status(self) -> str:
        if self.draining:
            return "draining"
        return "down" if self.down else "healthy"


def split_addr(addr: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """"host:port" (the config has checked it); an empty host is `default_host`."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or default_host, int(port)


class Router:
    def __init__(self, addrs: list[str], fail_list: tuple[str, ...] = ()) -> None:
        self.backends: dict[str, Backend] = {}
        self.template: Greeting | None = None  # the last greeting a backend sent
        self.set_backends(addrs)
        self.set_fail_list(fail_list)

    def set_backends(self, addrs: list[str]) -> None:
        """The configured list changed: new ones join; those gone drain, then are forgotten."""
        for addr in addrs:
            backend = self.backends.get(addr)
            if backend is None:
                host, port = split_addr(addr)
                self.backends[addr] = Backend(addr, host, port)
            else:
                backend.drained_by.discard(DRAIN_REMOVED)
        for addr, backend in self.backends.items():
            if addr not in addrs and DRAIN_REMOVED not in backend.drained_by:
                backend.drained_by.add(DRAIN_REMOVED)
                log.info("backend %s left the config: draining", addr)
        self.forget_empty()

    def set_fail_list(self, addrs: tuple[str, ...]) -> None:
        for addr, backend in self.backends.items():
            if addr in addrs:
                backend.drained_by.add(DRAIN_FAIL_LIST)
            else:
                backend.drained_by.discard(DRAIN_FAIL_LIST)

    def drain(self, addr: str, drain: bool) -> Backend:
        backend = self.backends[addr]
        if drain:
            backend.drained_by.add(DRAIN_API)
        else:
            backend.drained_by.discard(DRAIN_API)
        log.info("backend %s %s", addr, "drained" if drain else "undrained")
        return backend

    def forget_empty(self) -> None:
        for addr in [a for a, b in self.backends.items()
                     if DRAIN_REMOVED in b.drained_by and b.connections <= 0]:
            del self.backends[addr]

    def candidates(self, exclude: Backend | None = None) -> list[Backend]:
        """Backends to try for a session, best first."""
        now = time.monotonic()
        ready = [
            b for b in self.backends.values()
            if b is not exclude and not b.draining and (not b.failures or now >= b.retry_at)
        ]
        return sorted(ready, key=lambda b: (b.connections, b.failures))

    def succeeded(self, backend: Backend, greeting: Greeting | None) -> None:
        backend.failures = 0
        backend.last_error = ""
        if greeting is not None:
            self.template = greeting

    def failed(self, backend: Backend, reason: str) -> None:
        backend.failures += 1
        backend.last_error = reason
        delay = min(RETRY_MAX, RETRY_FIRST * 2 ** (backend.failures - 1))
        backend.retry_at = time.monotonic() + delay
        log.warning("backend %s unavailable (%s); next try in %.0fs", backend.addr, reason, delay)
