"""The data plane's side of an upgrade (control/upgrade.py, net/handover.py): the old process
stops accepting and sends each session that can travel, at its next safe point, to the new
one, which listens on the same sockets; the new process takes them in, and until the old one
ends shows the sessions that stay there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING, cast

from tiproxy.client.leg import BackendLeg
from tiproxy.net.client_leg import ClientLeg
from tiproxy.net.handover import Departure, Receiver, SessionHandover, Staying, receiver_name
from tiproxy.views.interface import SessionView

if TYPE_CHECKING:
    from tiproxy.net.pool import BackendPool
    from tiproxy.net.relay import Session
    from tiproxy.net.server import ProxyServer

log = logging.getLogger("tiproxy.server")


class ServerUpgrade:
    """Mixed into ProxyServer (net/server.py), whose attributes it uses."""

    sessions: dict[int, Session]
    pool: BackendPool
    _servers: list[asyncio.Server]
    _shutting_down: bool
    _next_id: int
    _departure: Departure | None
    _receiver: Receiver | None
    _staying: Staying | None

    def listening(self) -> list[list[socket.socket]]:
        return [[s for server in self._servers for s in server.sockets]]

    async def max_session_id(self) -> int:
        return self._next_id

    def take_ids_from(self, first_id: int) -> None:
        """The new process of an upgrade: ids the old one gave out are never given again."""
        self._next_id = max(self._next_id, first_id)

    def hand_over(self, receivers: list[str]) -> None:
        """Stop accepting (the new process accepts on the same sockets) and send every
        session that can travel to the receivers, each at its next safe point."""
        for server in self._servers:
            server.close()
        self.pool.stop()  # the new process keeps its own
        self._departure = Departure(receivers, lambda: list(self.sessions.values()))
        for session in self.sessions.values():
            session.leaving = self._departure

    async def handed_over(self) -> None:
        if self._departure is not None:
            await self._departure.done.wait()

    async def open_receivers(self) -> list[str]:
        """The new process of an upgrade: take the sessions the old one hands over."""
        if self._receiver is None:  # (asked again, it is the same one)
            self._receiver = Receiver(receiver_name(os.getpid(), 0), self._adopt,
                                      self._note_staying)
        return [self._receiver.name]

    def _note_staying(self, staying: Staying) -> None:
        self._staying = staying
        for sid, _, client, _, why in staying.sessions:
            log.info("session %d (%s) stays with the previous process (pid %d): %s", sid,
                     client, staying.pid, why)

    def _staying_views(self) -> list[SessionView]:
        """The previous process's sessions that could not travel, while it runs."""
        staying = self._staying
        if staying is None:
            return []
        try:
            os.kill(staying.pid, 0)
        except ProcessLookupError:
            self._staying = None
            return []
        return [SessionView(id=sid, user=user, client=client, backend=backend, moving=False,
                            move_reason="", waiting=f"stays with the previous process (pid "
                            f"{staying.pid}) until it ends: {why}")
                for sid, user, client, backend, why in staying.sessions]

    async def _adopt(self, handover: SessionHandover, socks: list[socket.socket]) -> bool:
        if self._shutting_down:
            return False
        client_sock, backend_sock = socks
        loop = asyncio.get_running_loop()
        try:
            _, leg = await loop.create_connection(BackendLeg, sock=backend_sock)
            server = cast("ProxyServer", self)  # (the ProxyServer this is part of)
            await loop.connect_accepted_socket(lambda: ClientLeg(server, (handover, leg)),
                                               sock=client_sock)
        except OSError as e:
            log.warning("session %d could not be taken over: %s", handover.id, e)
            return False
        log.info("session %d taken over from the previous process", handover.id)
        return True
