"""The client's socket as the event loop sees it (an asyncio.Protocol): it starts a Session for
each connection and hands it everything, unless this worker passes the connection on first to
the worker with the fewest sessions (workers/handoff.py).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

from tiproxy.net.relay import Session, compiled_client_feed

if TYPE_CHECKING:
    from tiproxy.client.leg import BackendLeg
    from tiproxy.net.handover import SessionHandover
    from tiproxy.net.server import ProxyServer


class ClientLeg(asyncio.Protocol):
    """The client's socket: hands everything to its Session."""

    def __init__(self, server: ProxyServer,
                 adopted: tuple[SessionHandover, BackendLeg] | None = None,
                 passed: bool = False) -> None:
        self.server = server
        self.session: Session | None = None
        self._adopted = adopted  # a session another process handed over (net/handover.py)
        self._passed = passed  # accepted by another worker, which passed it here

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._adopted is None and not self._passed \
                and self.server.hand_off(transport):
            transport.close()  # (the connection lives on in the worker it went to)
            return
        session = self.session = Session(self.server, cast(asyncio.Transport, transport),
                                         self._adopted)
        session.bound_writes(transport)
        feed = compiled_client_feed(session)
        if feed is not None:
            # The event loop calls the compiled path itself; the method below is its fallback.
            self.data_received = feed  # type: ignore[method-assign,assignment]
            transport.set_protocol(self)  # (uvloop keeps the data_received it was given)

    def data_received(self, data: bytes) -> None:
        self.session.client_data(data)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is not None:
            self.session.client_lost(exc)

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_backend_reading(True)

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.pause_backend_reading(False)
