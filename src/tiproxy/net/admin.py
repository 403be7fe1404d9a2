"""The proxy's own short connections to a backend, as the account `[security] auth-sync-user`.

Not on the data path: one connection per use, text protocol only, results read whole. Used for
what no client connection can carry, such as a KILL aimed at a session on another backend.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from tiproxy.protocol.auth import NATIVE_PLUGIN, native_password_scramble
from tiproxy.protocol.codec import read_lenenc_bytes, read_lenenc_int
from tiproxy.protocol.constants import Capability, Command
from tiproxy.protocol.errors import Origin, ProtocolError, SQLError
from tiproxy.protocol.framer import PacketSplitter
from tiproxy.protocol.packets import (
    HandshakeResponse,
    build_handshake_response,
    frame,
    parse_auth_switch,
    parse_err,
    parse_greeting,
)

TIMEOUT = 5.0
_CAPS = (
    Capability.LONG_PASSWORD | Capability.PROTOCOL_41 | Capability.SECURE_CONNECTION
    | Capability.PLUGIN_AUTH | Capability.TRANSACTIONS | Capability.MULTI_RESULTS
)


class AdminConnection:
    """Log in, run statements, close. Every method raises SQLError, ProtocolError or OSError."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._splitter = PacketSplitter(origin=Origin.BACKEND)
        self._packets: list[tuple[int, bytes]] = []

    @classmethod
    async def open(cls, host: str, port: int, user: str, password: str) -> AdminConnection:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT)
        conn = cls(reader, writer)
        try:
            await asyncio.wait_for(conn._login(user, password.encode()), TIMEOUT)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _read(self) -> tuple[int, bytes]:
        while not self._packets:
            data = await self._reader.read(65536)
            if not data:
                raise ConnectionError("backend closed the connection")
            self._packets.extend(self._splitter.feed(data))
        return self._packets.pop(0)

    async def _login(self, user: str, password: bytes) -> None:
        _, payload = await self._read()
        if payload[:1] == b"\xff":
            raise _sql_error(payload)
        greeting = parse_greeting(payload)
        response = HandshakeResponse(
            capabilities=_CAPS & greeting.capabilities | Capability.PROTOCOL_41,
            max_packet=1 << 24,
            charset=greeting.charset or 45,
            user=user.encode(),
            auth_data=native_password_scramble(password, greeting.salt),
            auth_plugin=NATIVE_PLUGIN,
        )
        if greeting.auth_plugin != NATIVE_PLUGIN:
            response = replace(response, auth_data=b"")
        self._writer.write(frame(build_handshake_response(response), 1))
        while True:
            seq, payload = await self._read()
            if payload[:1] == b"\x00":
                return
            if payload[:1] == b"\xff":
                raise _sql_error(payload)
            if payload[:1] != b"\xfe":
                raise ProtocolError("unexpected packet during the proxy's login", Origin.BACKEND)
            switch = parse_auth_switch(payload)
            if switch.plugin != NATIVE_PLUGIN:
                raise SQLError(1251, "08004",
                               f"auth-sync-user must use {NATIVE_PLUGIN}, not {switch.plugin}")
            self._writer.write(frame(native_password_scramble(password, switch.data), seq + 1))

    async def query(self, sql: str) -> list[list[bytes | None]]:
        """Run one statement; return its rows (text values), or [] for an OK."""
        self._writer.write(frame(bytes((Command.QUERY,)) + sql.encode(), 0))
        return await asyncio.wait_for(self._result(), TIMEOUT)

    async def _result(self) -> list[list[bytes | None]]:
        _, payload = await self._read()
        if payload[:1] == b"\x00":
            return []
        if payload[:1] == b"\xff":
            raise _sql_error(payload)
        columns, _ = read_lenenc_int(payload, 0)
        for _ in range(columns):
            await self._read()
        _, payload = await self._read()  # EOF after the columns
        rows: list[list[bytes | None]] = []
        while True:
            _, payload = await self._read()
            if payload[:1] == b"\xfe" and len(payload) < 9:
                return rows
            if payload[:1] == b"\xff":
                raise _sql_error(payload)
            rows.append(_text_row(payload, columns))

    def close(self) -> None:
        if not self._writer.is_closing():
            self._writer.write(frame(bytes((Command.QUIT,)), 0))
            self._writer.close()


def _text_row(payload: bytes, columns: int) -> list[bytes | None]:
    row: list[bytes | None] = []
    pos = 0
    for _ in range(columns):
        if payload[pos] == 0xFB:
            row.append(None)
            pos += 1
        else:
            value, pos = read_lenenc_bytes(payload, pos)
            row.append(value)
    return row


def _sql_error(payload: bytes) -> SQLError:
    err = parse_err(payload)
    return SQLError(err.code, err.sqlstate, err.message, Origin.BACKEND)
