"""A connection to a backend: read packet by packet while the proxy talks to it, or relayed.

Two modes. Detached, every byte goes through a PacketSplitter and whole packets wait in a queue
for `read_packet` (the login, a migration's capture and restore, the proxy's own queries).
Attached, every chunk goes straight to its owner's hot path (a session's `backend_data`).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import replace
from typing import Protocol, cast

from tiproxy.protocol.constants import Capability
from tiproxy.protocol.errors import Origin
from tiproxy.protocol.framer import PacketSplitter
from tiproxy.protocol.packets import HandshakeResponse, build_handshake_response, frame

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 10.0
TLS_HANDSHAKE_TIMEOUT = 5.0


class Owner(Protocol):
    """What an attached leg hands its bytes and events to (net/relay.py's Session)."""

    def backend_data(self, data: bytes) -> None: ...
    def backend_lost(self, exc: Exception | None) -> None: ...
    def pause_client_reading(self, reason: str, pause: bool) -> None: ...


class BackendLeg(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.raw: asyncio.Transport | None = None  # the TCP transport under a TLS one
        self._session: Owner | None = None  # attached: chunks go to its hot path
        self._feed: object = None  # the owner's backend_feed, while it is data_received
        self._splitter = PacketSplitter(origin=Origin.BACKEND)
        self._packets: deque[tuple[int, bytes]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None

    @classmethod
    async def open(cls, host: str, port: int, timeout: float = CONNECT_TIMEOUT, *,
                   header: bytes | None = None) -> BackendLeg:
        """Connect; `header` (a PROXY protocol header) is the first thing sent."""
        leg = cls()
        # asyncio.timeout, not wait_for: that wraps the coroutine in a task of its own, which
        # costs a login more than the connect's own Python work (py-spy, churn without the pool).
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().create_connection(lambda: leg, host, port)
        if header:
            leg.write(header)
        return leg

    async def start_tls(self, ctx: ssl.SSLContext, server_hostname: str) -> None:
        """Upgrade to TLS after the SSLRequest (detached, nothing unread: the server sends
        nothing between its greeting and the TLS handshake). Raises OSError or ssl.SSLError."""
        assert self.transport is not None and self.session is None
        if self.closed or not self.clean:
            raise ConnectionError("backend connection closed before its TLS handshake")
        loop = asyncio.get_running_loop()
        tls = await loop.start_tls(self.transport, self, ctx, server_hostname=server_hostname,
                                   ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        if tls is None:
            raise ConnectionError("backend closed the connection during the TLS handshake")
        self.raw, self.transport = self.transport, tls

    async def ssl_request(self, response: HandshakeResponse, ctx: ssl.SSLContext,
                          server_hostname: str) -> int:
        """The proxy's own login over TLS: the SSLRequest (the response's first 32 bytes with
        CLIENT_SSL, sequence id 1), then the handshake; returns the sequence id of the
        handshake response that follows."""
        request = replace(response, capabilities=response.capabilities | Capability.SSL,
                          ssl_request_only=True)
        self.write(frame(build_handshake_response(request), 1))
        await self.start_tls(ctx, server_hostname)
        return 2

    @property
    def session(self) -> Owner | None:
        return self._session

    @session.setter
    def session(self, owner: Owner | None) -> None:
        """Attach (or detach, with None). An owner with a `backend_feed` (a session with the
        compiled path, net/_hotpath.c) has the event loop call it directly for each chunk.
        The owner let go of first reads nothing more from the socket itself (leave_direct)."""
        previous = self._session
        if previous is not None and previous is not owner:
            leave = getattr(previous, "leave_direct", None)
            if leave is not None:
                leave()
        self._session = owner
        feed = getattr(owner, "backend_feed", None)
        if feed is self._feed:
            return
        self._feed = feed
        if feed is not None:
            self.data_received = feed  # type: ignore[method-assign]
        else:
            self.__dict__.pop("data_received", None)
        if self.transport is not None:
            self.transport.set_protocol(self)  # (uvloop keeps the data_received it was given)

    @property
    def tls(self) -> bool:
        return self.transport is not None and \
            self.transport.get_extra_info("ssl_object") is not None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._session is not None:
            self._session.backend_data(data)
            return
        try:
            self._packets.extend(self._splitter.feed(data))
        except Exception as e:  # noqa: BLE001 - handed to the reader, which raises it
            self._error = e
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._error = exc or ConnectionError("backend closed the connection")
        if self._session is not None:
            self._session.backend_lost(exc)
        self._wake()

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_client_reading("backend", True)

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.pause_client_reading("backend", False)

    # -- detached mode ----------------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read_packet(self, timeout: float = READ_TIMEOUT) -> tuple[int, bytes]:
        """The next whole packet (sequence id, payload). Raises on close, error or timeout."""
        while not self._packets:
            if self._error is not None:
                raise self._error
            # One timer that fails the waiter, rather than wait_for's second future and
            # callbacks around it: a login reads three or four packets this way.
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(timeout, _time_out, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        return self._packets.popleft()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        if self.transport.is_closing():  # uvloop raises RuntimeError on a closed handle
            raise ConnectionError("backend connection closed")
        self.transport.write(data)

    def attach(self, session: Owner) -> None:
        """From now on chunks go to the session; bytes already read but not taken go first."""
        if self._packets:
            raise RuntimeError("attaching a backend with unread packets")
        self.session = session
        rest = self._splitter.take_rest()
        if rest:
            session.backend_data(rest)

    def detach(self) -> None:
        """Back to reading packet by packet (a migration's capture). Only between responses."""
        self.session = None

    @property
    def clean(self) -> bool:
        """Nothing read and not taken: the connection is between responses."""
        return not self._packets and not self._splitter.buffered and self._error is None

    @property
    def closed(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self, quit_first: bool = True) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if quit_first:
                self.transport.write(b"\x01\x00\x00\x00\x01")  # COM_QUIT
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no answer from the backend in time"))
