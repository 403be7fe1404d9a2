"""The proxy's data plane: the listener, the registry of sessions, and its view for the API."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

from tiproxy.api.interface import BackendView
from tiproxy.balance.router import Router, split_addr
from tiproxy.net.relay import ClientLeg

if TYPE_CHECKING:
    from tiproxy.config import Config
    from tiproxy.net.relay import Session

log = logging.getLogger("tiproxy.server")


class ProxyServer:
    """Accepts clients and keeps the sessions; implements the API's ProxyView."""

    def __init__(self, cfg: Config) -> None:
        self._config = cfg
        self.router = Router(list(cfg.proxy.backend_addrs))
        self.sessions: dict[int, Session] = {}
        self._next_id = 0
        self._servers: list[asyncio.AbstractServer] = []
        self._shutting_down = False
        self.port = 0

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for addr in self._config.proxy.listen_addrs:
            host, port = split_addr(addr, default_host="")
            server = await loop.create_server(
                lambda: ClientLeg(self), host or None, port, reuse_address=True, backlog=1024
            )
            self._servers.append(server)
            for sock in server.sockets:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.port = self.port or server.sockets[0].getsockname()[1]
            log.info("proxy listening on %s:%d", host, server.sockets[0].getsockname()[1])

    def begin_shutdown(self) -> None:
        """Health turns 502 so that load balancers stop sending clients; sessions go on."""
        self._shutting_down = True

    async def stop(self) -> None:
        self._shutting_down = True
        for server in self._servers:
            server.close()
        for session in list(self.sessions.values()):
            session.close("proxy shutting down", quiet=True)
        for server in self._servers:
            await server.wait_closed()

    def apply_config(self, cfg: Config) -> None:
        self._config = cfg
        self.router.set_backends(list(cfg.proxy.backend_addrs))

    # -- the registry ---------------------------------------------------------------------------

    def new_session_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def session_opened(self, session: Session) -> None:
        self.sessions[session.id] = session

    def session_closed(self, session: Session) -> None:
        self.sessions.pop(session.id, None)

    def over_capacity(self) -> bool:
        limit = self._config.proxy.max_connections
        return bool(limit) and len(self.sessions) > limit

    # -- ProxyView ------------------------------------------------------------------------------

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def connection_count(self) -> int:
        return len(self.sessions)

    def backends(self) -> list[BackendView]:
        return [
            BackendView(b.addr, b.status, b.connections, dict(b.query_counts))
            for b in self.router.backends.values()
        ]

    def config(self) -> Config:
        return self._config
