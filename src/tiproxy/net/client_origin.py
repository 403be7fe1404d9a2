"""Who a session's client is: its address, and the PROXY protocol header it may start with.

Theory of operation
-------------------
A session's peer is the client socket's address, unless `[proxy] proxy-protocol` was on when the
client connected: then the client (a load balancer in front of the proxy) must start with a
PROXY protocol header (protocol/proxyproto.py), and the address it names is the client's from
then on, in the log, the API and the backend's headers. While the header is incomplete its
bytes wait in `_pp`; once judged `_pp` is None. `_origin` is the (client, proxy) address pair
that every backend connection of the session names in its own PROXY header
(`backend_header`), or None when the protocol is off.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from tiproxy.protocol import proxyproto
from tiproxy.protocol.errors import ProtocolError

if TYPE_CHECKING:
    from tiproxy.net.server import ProxyServer

log = logging.getLogger("tiproxy.session")

Addresses = tuple[tuple[str, int], tuple[str, int]]


class ClientOrigin:
    """Mixed into Session (net/relay.py), whose attributes it uses."""

    # Provided by Session.
    id: int
    peer: str
    _pp: bytearray | None
    _origin: Addresses | None

    if TYPE_CHECKING:  # provided by Session (net/relay.py): declared for the type checker only
        def _protocol_error(self, e: ProtocolError) -> None: ...

    def _origin_fields(self, server: ProxyServer, transport: asyncio.Transport) -> None:
        """From the socket, as the session starts."""
        self.peer = _peer(transport)
        if server.config().proxy.proxy_protocol:
            self._pp, self._origin = bytearray(), _addresses(transport)
        else:
            self._pp, self._origin = None, None

    def _client_proxy_header(self, data: bytes) -> bytes:
        """The client's PROXY header, if it starts with one: the client's address is then the
        one it names. Returns what follows it."""
        assert self._pp is not None
        buf = self._pp
        buf += data
        try:
            parsed = proxyproto.parse(bytes(buf))
        except ProtocolError as e:
            self._pp = None
            self._protocol_error(e)
            return b""
        if parsed is None:
            return b""  # not enough bytes to tell yet
        header, used = parsed
        self._pp = None
        if header is not None and header.source is not None and self._origin is not None:
            self._origin = (header.source, header.destination or self._origin[1])
            log.info("session %d: PROXY header from %s: client %s:%d", self.id, self.peer,
                     *header.source)
            self.peer = f"{header.source[0]}:{header.source[1]}"
        return bytes(buf[used:])

    def backend_header(self) -> bytes | None:
        """What every backend connection of this session starts with: a PROXY header naming
        the client, when `[proxy] proxy-protocol = "v2"` was set as it connected; else None."""
        return proxyproto.build(*self._origin) if self._origin is not None else None


def _addresses(transport: asyncio.Transport) -> Addresses | None:
    """(peer, local) of a TCP connection; None for another kind of socket."""
    peer, local = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
    if not (isinstance(peer, tuple) and isinstance(local, tuple)):
        return None
    return (str(peer[0]), int(peer[1])), (str(local[0]), int(local[1]))


def _peer(transport: asyncio.Transport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)
