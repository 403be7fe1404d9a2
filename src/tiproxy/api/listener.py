"""The API port's connections: HTTPS with `[security.server-http-tls]`, plain HTTP otherwise.

With server-http-tls, one port serves both, as TiProxy's does: a connection whose first byte
is 0x16 (a TLS handshake record) is upgraded to TLS (client certificates verified and required
with `ca` unless `skip-ca`, `cert-allowed-cn` checked) and then served by aiohttp; any other
connection is served in plain HTTP, where only `GET /api/debug/health` answers (for load
balancers that probe without TLS; setting it is a write, over HTTPS) and every other route
says to use HTTPS (`plain_http_guard`). Without server-http-tls every connection is plain and
every route answers.

`APIConnection` is the protocol of each accepted socket until it knows which: it holds the first
bytes, then hands the transport (raw or TLS) and those bytes to aiohttp's request handler.

With `[api] proxy-protocol = "v2"` a connection may start with a PROXY protocol header (before
any TLS): the client it names is then the peer the write routes judge (`peer_of`), so that a
load balancer on this host does not make every request it forwards look like a loopback one.
Such a connection keeps its APIConnection between the transport and aiohttp, to forget the
client when it closes.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from tiproxy.config.model import TLSConfig
from tiproxy.protocol import proxyproto
from tiproxy.protocol.errors import ProtocolError
from tiproxy.tls.contexts import peer_cn_allowed
from tiproxy.tls.upgrade import start_server_tls

log = logging.getLogger("tiproxy.api")

TLS_RECORD_HANDSHAKE = 0x16
HANDSHAKE_TIMEOUT = 10.0
HEALTH_PATHS = frozenset({"/api/debug/health", "/api/debug/health/"})
_EARLY_LIMIT = 1024 * 1024  # bytes held while the TLS handshake runs (a client may pipeline)
# id(transport) -> the client a PROXY header named, while the connection is open
_PROXIED: dict[int, tuple[str, int]] = {}


def peer_of(transport: asyncio.BaseTransport) -> object:
    """The peer a request comes from: the client its PROXY header named, else the socket's."""
    return _PROXIED.get(id(transport)) or transport.get_extra_info("peername")


class APIConnection(asyncio.Protocol):
    """One accepted API connection, until it is handed to aiohttp."""

    def __init__(self, handler_factory: Callable[[], asyncio.Protocol],
                 tls: Callable[[], tuple[ssl.SSLContext | None, TLSConfig]],
                 proxy_protocol: bool = False) -> None:
        self._factory = handler_factory
        self._tls = tls
        self._pp_pending = proxy_protocol  # a PROXY header may still come first
        self._client: tuple[str, int] | None = None  # the client it named
        self._proxied_id: int | None = None
        self._raw: asyncio.Transport | None = None
        self._early = bytearray()
        self._handler: asyncio.Protocol | None = None
        self._upgrading = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._handler is not None:  # handed over: nothing more should come here
            self._handler.data_received(data)
            return
        self._early += data
        if self._pp_pending and not self._proxy_header():
            return
        if self._upgrading:  # the TLS handshake is under way: hold what comes, within a bound
            if len(self._early) > _EARLY_LIMIT:
                assert self._raw is not None
                self._raw.abort()
            return
        ctx, cfg = self._tls()
        if ctx is not None and self._early[0] == TLS_RECORD_HANDSHAKE:
            self._upgrading = True
            # Nothing more is read as plaintext: start_tls resumes reading through TLS.
            assert self._raw is not None
            self._raw.pause_reading()
            early, self._early = bytes(self._early), bytearray()
            asyncio.get_running_loop().create_task(self._upgrade(ctx, cfg, early))
        else:
            assert self._raw is not None
            self._hand_over(self._raw)

    def _proxy_header(self) -> bool:
        """Judge the PROXY header, if any; False while more bytes are needed (or it is bad,
        and the connection aborted) and when nothing follows it yet."""
        assert self._raw is not None
        try:
            parsed = proxyproto.parse(bytes(self._early))
        except ProtocolError as e:
            log.warning("API: %s refused: %s", self._raw.get_extra_info("peername"), e)
            self._raw.abort()
            return False
        if parsed is None:
            return False
        header, used = parsed
        self._pp_pending = False
        del self._early[:used]
        if header is not None and header.source is not None:
            self._client = header.source
        return bool(self._early)

    async def _upgrade(self, ctx: ssl.SSLContext, cfg: TLSConfig, early: bytes) -> None:
        raw = self._raw
        assert raw is not None
        try:
            tls = await start_server_tls(raw, ctx, early, HANDSHAKE_TIMEOUT)
        except (OSError, ssl.SSLError, TimeoutError) as e:
            log.info("API: TLS handshake failed: %s", e)
            raw.abort()
            return
        refusal = peer_cn_allowed(cfg, tls.get_extra_info("peercert"))
        if refusal is not None:
            log.warning("API: %s refused: %s", tls.get_extra_info("peername"), refusal)
            tls.abort()
            return
        self._hand_over(tls)

    def _hand_over(self, transport: asyncio.Transport) -> None:
        """aiohttp's handler takes the transport (raw or TLS) and the bytes held so far."""
        handler = self._factory()
        self._handler = handler
        if self._client is None:
            transport.set_protocol(handler)
        else:  # stays in between, to forget the client at the end
            self._proxied_id = id(transport)
            _PROXIED[self._proxied_id] = self._client
        handler.connection_made(transport)
        early, self._early = bytes(self._early), bytearray()
        if early:
            handler.data_received(early)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._proxied_id is not None:
            _PROXIED.pop(self._proxied_id, None)
        if self._handler is not None:
            self._handler.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    def eof_received(self) -> bool | None:
        if self._handler is not None:
            return self._handler.eof_received()
        return None


def plain_http_guard(https_configured: Callable[[], bool]) -> Any:
    """Middleware: with server-http-tls, plain HTTP serves only the health route."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        plain = transport is None or transport.get_extra_info("ssl_object") is None
        health_read = request.path in HEALTH_PATHS and request.method in ("GET", "HEAD")
        if plain and https_configured() and not health_read:
            return web.json_response(
                {"error": "this API is served over HTTPS (security.server-http-tls); plain "
                          "HTTP answers only /api/debug/health"}, status=400)
        return await handler(request)

    return guard
