"""The proxy's own short connections to a backend: as the account `[security] auth-sync-user`,
or as a client's user with the credential the proxy recovered at its login.

Not on the data path: one connection per use, text protocol only, results read whole. Used for
what no client connection can carry: a KILL aimed at a session on another backend, reading the
stored password hashes that let sessions move.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from tiproxy.client.channel import Row, query, sql_error
from tiproxy.client.leg import BackendLeg
from tiproxy.protocol.auth import NATIVE_PLUGIN, native_answer, native_password_scramble
from tiproxy.protocol.constants import Capability
from tiproxy.protocol.errors import Origin, ProtocolError, SQLError
from tiproxy.protocol.packets import (
    Greeting,
    HandshakeResponse,
    build_handshake_response,
    frame,
    parse_auth_switch,
    parse_greeting,
)

TIMEOUT = 5.0
_CAPS = (
    Capability.LONG_PASSWORD | Capability.PROTOCOL_41 | Capability.SECURE_CONNECTION
    | Capability.PLUGIN_AUTH | Capability.TRANSACTIONS | Capability.MULTI_RESULTS
)


class AdminConnection:
    """Log in, run statements, close. Methods raise SQLError, ProtocolError, OSError or
    TimeoutError."""

    def __init__(self, leg: BackendLeg, deprecate_eof: bool, greeting: Greeting) -> None:
        self._leg = leg
        self._deprecate_eof = deprecate_eof
        self.greeting = greeting  # the server's

    @property
    def leg(self) -> BackendLeg:
        """The connection, for commands of the caller's own (a traffic replay)."""
        return self._leg

    @property
    def deprecate_eof(self) -> bool:
        return self._deprecate_eof

    @classmethod
    async def open(cls, host: str, port: int, user: str, password: str, *,
                   tls: ssl.SSLContext | None = None, require_tls: bool = False,
                   stage1: bytes | None = None, header: bytes | None = None,
                   capabilities: int = 0) -> AdminConnection:
        """Log in; over TLS when `tls` is given and the backend offers it (always, with
        `require_tls`: `[security] require-backend-tls`). With `stage1` (SHA1(password), a
        session's reusable credential; empty: no password) `password` is not used; `header`
        (PROXY protocol) makes the login come from that session's client; `capabilities`
        are asked for besides the proxy's own (where the server offers them)."""
        if stage1 is not None:
            known = stage1

            def answer(salt: bytes) -> bytes:
                return native_answer(known, salt)
        else:
            secret = password.encode()

            def answer(salt: bytes) -> bytes:
                return native_password_scramble(secret, salt)
        leg = await BackendLeg.open(host, port, TIMEOUT, header=header)
        try:
            caps, greeting = await asyncio.wait_for(
                _login(leg, host, user, answer, tls=tls, require_tls=require_tls,
                       capabilities=capabilities), TIMEOUT)
        except BaseException:
            leg.abort()
            raise
        return cls(leg, bool(caps & Capability.DEPRECATE_EOF), greeting)

    async def query(self, sql: str) -> list[Row]:
        result = await asyncio.wait_for(query(self._leg, sql, self._deprecate_eof), TIMEOUT)
        return result.rows

    def close(self) -> None:
        self._leg.close()


async def _login(leg: BackendLeg, host: str, user: str, answer: Callable[[bytes], bytes], *,
                 tls: ssl.SSLContext | None, require_tls: bool,
                 capabilities: int = 0) -> tuple[int, Greeting]:
    """Log in; (the capabilities used, the server's greeting)."""
    _, payload = await leg.read_packet()
    if payload[:1] == b"\xff":
        raise sql_error(payload)
    greeting = parse_greeting(payload)
    caps = (_CAPS | capabilities) & greeting.capabilities | Capability.PROTOCOL_41
    use_tls = tls is not None and bool(greeting.capabilities & Capability.SSL)
    if require_tls and not use_tls:
        why = "sql-tls is not configured" if tls is None else "the backend does not offer TLS"
        raise ProtocolError(f"the proxy's own connections need TLS here, but {why}",
                            Origin.PROXY)
    if use_tls:
        caps |= Capability.SSL
    native = greeting.auth_plugin == NATIVE_PLUGIN
    response = HandshakeResponse(
        capabilities=caps,
        max_packet=1 << 24,
        charset=greeting.charset or 45,
        user=user.encode(),
        auth_data=answer(greeting.salt) if native else b"",
        auth_plugin=NATIVE_PLUGIN,
    )
    seq = await leg.ssl_request(response, tls, host) if tls is not None and use_tls else 1
    leg.write(frame(build_handshake_response(response), seq))
    while True:
        seq, payload = await leg.read_packet()
        if payload[:1] == b"\x00":
            return caps, greeting
        if payload[:1] == b"\xff":
            raise sql_error(payload)
        if payload[:1] != b"\xfe":
            raise ProtocolError("unexpected packet during the proxy's login", Origin.BACKEND)
        switch = parse_auth_switch(payload)
        if switch.plugin != NATIVE_PLUGIN:
            raise SQLError(1251, "08004",
                           f"the proxy logs in as {user} with {NATIVE_PLUGIN}; the server "
                           f"asks for {switch.plugin}")
        leg.write(frame(answer(switch.data), seq + 1))
