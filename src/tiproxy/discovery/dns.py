"""Resolve DNS names to backends on an interval, as for a Kubernetes headless service.

Each configured name is `host:port`; a headless service answers with one address per ready pod,
so the set is the union of every name's addresses, each with its name's port. Names are resolved
together every `interval` seconds and the set is handed to the sink when it changes. A lookup
that fails keeps that name's last addresses (a flapping resolver must not empty the cluster) and
says why in `error`; a lookup that succeeds replaces them, even with none.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence

from tiproxy.discovery.base import BackendSink, DiscoveredBackend

log = logging.getLogger("tiproxy.discovery")

Resolver = Callable[[str, int], Awaitable[list[str]]]

# One name's answer; a resolver (or a DNS server) gone wrong must not grow the set without limit.
# A headless service has one address per pod: far below this.
MAX_ADDRESSES_PER_NAME = 256


def split_host_port(name: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); ValueError when it is neither."""
    host, sep, port_text = name.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"DNS discovery name {name!r} is not host:port")
    return host, int(port_text)


def join_host_port(ip: str, port: int) -> str:
    try:
        is_v6 = ipaddress.ip_address(ip).version == 6
    except ValueError:
        is_v6 = False
    return f"[{ip}]:{port}" if is_v6 else f"{ip}:{port}"


async def resolve_with_getaddrinfo(host: str, port: int) -> list[str]:
    """The host's TCP addresses, sorted, as the system resolver gives them."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return sorted({str(sockaddr[0]) for *_, sockaddr in infos})


class DNSNames:
    """A discovery source that re-resolves DNS names every `interval` seconds."""

    name = "dns"

    def __init__(
        self,
        names: Sequence[str],
        interval: float = 5.0,
        resolver: Resolver | None = None,
    ) -> None:
        if not names:
            raise ValueError("DNS discovery needs at least one name")
        self._names = {name: split_host_port(name) for name in names}
        self._interval = interval
        self._resolve = resolver or resolve_with_getaddrinfo
        self._timeout = max(interval, 1.0)  # a lookup may not hold up the next round
        self._known: dict[str, list[str]] = {}  # name -> its addresses at the last success
        self._last: dict[str, DiscoveredBackend] | None = None
        self.error = ""

    async def run(self, sink: BackendSink) -> None:
        while True:
            await self.refresh(sink)
            await asyncio.sleep(self._interval)

    async def refresh(self, sink: BackendSink) -> None:
        """Resolve every name once and hand the set to the sink if it changed."""
        failures = await asyncio.gather(*(self._lookup(name) for name in self._names))
        errors = [f for f in failures if f]
        self.error = "; ".join(errors)
        current: dict[str, DiscoveredBackend] = {}
        for name, (_, port) in self._names.items():
            for ip in self._known.get(name, ()):
                addr = join_host_port(ip, port)
                current[addr] = DiscoveredBackend(addr=addr)
        if current == self._last or (self._last is None and errors and not current):
            return  # unchanged, or nothing known yet because of errors: say nothing
        self._last = current
        log.info("dns discovery: %d backends: %s", len(current), sorted(current))
        sink.update(self.name, dict(current))

    async def _lookup(self, name: str) -> str:
        """Resolve one name into self._known; returns why it failed, or ""."""
        host, port = self._names[name]
        try:
            async with asyncio.timeout(self._timeout):
                answer = await self._resolve(host, port)
        except (OSError, TimeoutError, ValueError) as exc:
            reason = f"{name}: {exc.__class__.__name__}: {exc or 'no detail'}"
            log.warning("dns discovery: %s; keeping its last addresses", reason)
            return reason
        if len(answer) > MAX_ADDRESSES_PER_NAME:
            log.warning(
                "dns discovery: %s: %d addresses, keeping %d",
                name,
                len(answer),
                MAX_ADDRESSES_PER_NAME,
            )
        self._known[name] = sorted(set(answer))[:MAX_ADDRESSES_PER_NAME]
        return ""
