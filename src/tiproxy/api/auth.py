"""Who may call the API's write routes: every method but GET and HEAD, by rule.

A write route re-points backends, drains them and moves every session; on TiProxy's default
address (0.0.0.0:3080) anyone who reaches the port could. A write request is let through when
- it carries `Authorization: Bearer <token>` with the token held in `[api] auth-token-file`; a
  caller that presents a token has it checked, from any peer, so a wrong one is always refused;
- or it carries no Authorization header and comes from a loopback peer (127.0.0.0/8, ::1,
  ::ffff:127.x.x.x) or from a peer whose client certificate the API's TLS verified.
Anyone else gets 403 and the reason as JSON. Before any of this, a write that a browser sends
from another site's page is refused, and a page reached under a host name gets no loopback
trust (origin.py: cross-site request forgery, DNS rebinding). The middleware keys on the
method, so a route added later is guarded without being listed. Tokens are compared in
constant time and never logged or echoed. The token file is read in a thread
(files.read_small_file), and read again only when a stat (also in a thread) shows that its
inode, size or times changed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
import time
from collections.abc import Callable

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from tiproxy.api.listener import peer_of
from tiproxy.api.origin import (
    cross_site_refusal,
    from_page,
    host_may_be_rebound,
    rebinding_refusal,
)
from tiproxy.config.files import TOKEN_FILE_LIMIT, FileRefusedError, read_small_file

log = logging.getLogger("tiproxy.api")

READ_METHODS = frozenset({"GET", "HEAD"})
NEED_CREDENTIAL = ("write routes need a loopback peer, a client certificate or a bearer token "
                   "(api.auth-token-file)")
BAD_HEADER = "the Authorization header must be `Bearer <token>`"
# Messages, not tokens (S105 takes any name with TOKEN in it for a password).
NO_TOKEN_FILE = "bearer tokens are not accepted: api.auth-token-file is not set"  # noqa: S105
UNREADABLE_TOKEN_FILE = ("bearer tokens are not accepted: api.auth-token-file cannot be "  # noqa: S105
                         "used (the proxy's log says why)")
WRONG_TOKEN = "wrong bearer token"  # noqa: S105

_REFUSAL_LOG_INTERVAL = 1.0  # seconds: a caller hammering the API cannot flood the log


def is_loopback(peername: object) -> bool:
    """Whether a transport's peername ("host", port[, flow, scope]) is a loopback address."""
    if not isinstance(peername, tuple) or not peername or not isinstance(peername[0], str):
        return False  # a Unix socket's peer, or no peer: not a loopback IP
    try:
        ip = ipaddress.ip_address(peername[0].split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def has_verified_client_cert(transport: asyncio.BaseTransport) -> bool:
    """Whether the peer presented a certificate that the server's TLS verified.

    `ssl` gives an empty dict for a certificate it did not verify and None for no certificate
    (or no TLS at all), so only a verified one is truthy.
    """
    return bool(transport.get_extra_info("peercert"))


def tokens_match(presented: bytes, expected: bytes) -> bool:
    """Constant time, and the lengths do not leak either: both sides are hashed first."""
    return hmac.compare_digest(hashlib.sha256(presented).digest(),
                               hashlib.sha256(expected).digest())


class TokenFile:
    """The bearer token of `[api] auth-token-file`, read again when the file changes."""

    def __init__(self) -> None:
        self._signature: tuple[object, ...] | None = None
        self._token: bytes | None = None

    async def token(self, path: str) -> bytes | None:
        """The token in `path` (stripped); None when the file cannot be used."""
        try:
            info = await asyncio.to_thread(os.stat, path)
        except OSError as e:
            self._remember(("missing", path, e.errno), None, f"cannot stat: {e.strerror}", path)
            return None
        signature = (path, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns,
                     info.st_ctime_ns)
        if signature == self._signature:
            return self._token
        try:
            token: bytes | None = (await asyncio.to_thread(
                read_small_file, path, TOKEN_FILE_LIMIT)).strip()
        except FileRefusedError as e:
            self._remember(signature, None, str(e), path)
            return None
        self._remember(signature, token or None, "" if token else "the file is empty", path)
        return self._token

    def _remember(self, signature: tuple[object, ...], token: bytes | None, problem: str,
                  path: str) -> None:
        if signature != self._signature and problem:
            log.warning("api.auth-token-file %s: %s; bearer tokens are refused", path, problem)
        self._signature = signature
        self._token = token


async def write_refusal(request: web.Request, token_path: str, tokens: TokenFile) -> str | None:
    """Why this write request is refused, or None when it may go on."""
    refusal = cross_site_refusal(request)
    if refusal is not None:
        return refusal
    header = request.headers.get(hdrs.AUTHORIZATION)
    transport = request.transport
    if header is None:
        if transport is None:
            return NEED_CREDENTIAL
        if has_verified_client_cert(transport):
            return None
        # A PROXY header may take loopback trust away (a balancer on this host forwarding a
        # remote client), never grant it: the socket must be loopback too.
        if is_loopback(transport.get_extra_info("peername")) and is_loopback(peer_of(transport)):
            if from_page(request) and host_may_be_rebound(request):
                return rebinding_refusal(request.host)
            return None
        return NEED_CREDENTIAL
    scheme, _, presented = header.strip().partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        return BAD_HEADER
    if not token_path:
        return NO_TOKEN_FILE
    expected = await tokens.token(token_path)
    if expected is None:
        return UNREADABLE_TOKEN_FILE
    if not tokens_match(presented.encode("utf-8", "surrogateescape"), expected):
        return WRONG_TOKEN
    return None


def write_guard(token_path: Callable[[], str]) -> Middleware:
    """The middleware; `token_path()` gives the running config's api.auth-token-file."""
    tokens = TokenFile()
    last_logged = -_REFUSAL_LOG_INTERVAL

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal last_logged
        if request.method in READ_METHODS:
            return await handler(request)
        reason = await write_refusal(request, token_path(), tokens)
        if reason is None:
            return await handler(request)
        now = time.monotonic()
        if now - last_logged >= _REFUSAL_LOG_INTERVAL:
            last_logged = now
            peer = peer_of(request.transport) if request.transport else None
            log.warning("API %s %r from %s refused: %s", request.method,
                        request.raw_path[:200], peer, reason)
        return web.json_response({"error": reason}, status=403)

    return guard
