"""The packets the proxy reads or writes whole: handshake, handshake response, OK, ERR, EOF.

References:
- Initial handshake v10: https://dev.mysql.com/doc/dev/mysql-server/latest/page_protocol_connection_phase_packets_protocol_handshake_v10.html
- HandshakeResponse41 and SSLRequest: https://mariadb.com/kb/en/connection/
- OK, ERR, EOF: https://dev.mysql.com/doc/dev/mysql-server/latest/page_protocol_basic_ok_packet.html
- AuthSwitchRequest: https://mariadb.com/kb/en/connection/#authentication-switch-request
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

from tiproxy.protocol.codec import (
    U16,
    U32,
    Buffer,
    lenenc_bytes,
    lenenc_int,
    read_bytes,
    read_eof_bytes,
    read_lenenc_bytes,
    read_lenenc_int,
    read_nul_bytes,
    read_u8,
    read_u16,
    read_u32,
)
from tiproxy.protocol.constants import MAX_PAYLOAD, Capability
from tiproxy.protocol.errors import ProtocolError

_HEADER = struct.Struct("<I")


def frame(payload: bytes, seq: int) -> bytes:
    """One packet: a 4-byte header (length, sequence id) and the payload, split at 16 MiB."""
    if len(payload) < MAX_PAYLOAD:
        return _HEADER.pack(len(payload) | (seq & 0xFF) << 24) + payload
    out = bytearray()
    pos = 0
    while True:
        part = payload[pos : pos + MAX_PAYLOAD]
        out += _HEADER.pack(len(part) | (seq & 0xFF) << 24)
        out += part
        seq += 1
        pos += MAX_PAYLOAD
        if len(part) < MAX_PAYLOAD:
            return bytes(out)


@dataclass(frozen=True)
class Greeting:
    """Protocol::HandshakeV10, the server's first packet."""

    server_version: str
    connection_id: int
    salt: bytes  # auth-plugin-data, both parts, without the trailing NUL
    capabilities: int
    charset: int
    status: int
    auth_plugin: str
    mariadb_capabilities: int = 0  # MariaDB's extension, only when CLIENT_MYSQL (bit 0) is clear


def parse_greeting(payload: Buffer) -> Greeting:
    protocol, pos = read_u8(payload, 0)
    if protocol != 10:
        raise ProtocolError(f"unsupported handshake protocol version {protocol}")
    version, pos = read_nul_bytes(payload, pos)
    conn_id, pos = read_u32(payload, pos)
    salt1, pos = read_bytes(payload, pos, 8)
    pos += 1  # filler
    caps_low, pos = read_u16(payload, pos)
    charset = status = caps_high = salt_len = 0
    ext_caps = 0
    salt2 = b""
    plugin = b"mysql_native_password"
    if pos < len(payload):
        charset, pos = read_u8(payload, pos)
        status, pos = read_u16(payload, pos)
        caps_high, pos = read_u16(payload, pos)
        salt_len, pos = read_u8(payload, pos)
        reserved, pos = read_bytes(payload, pos, 10)
        ext_caps = U32.unpack_from(reserved, 6)[0]
    caps = caps_low | caps_high << 16
    if caps & Capability.SECURE_CONNECTION:
        size = max(13, salt_len - 8)
        salt2, pos = read_bytes(payload, pos, size)
        salt2 = salt2.rstrip(b"\0")
    if caps & Capability.PLUGIN_AUTH and pos < len(payload):
        rest, _ = read_eof_bytes(payload, pos)
        plugin = rest.split(b"\0", 1)[0]
    return Greeting(
        server_version=version.decode("utf-8", "replace"),
        connection_id=conn_id,
        salt=salt1 + salt2,
        capabilities=caps,
        charset=charset,
        status=status,
        auth_plugin=plugin.decode("ascii", "replace"),
        mariadb_capabilities=0 if caps & Capability.LONG_PASSWORD else ext_caps,
    )


def build_greeting(g: Greeting) -> bytes:
    salt = g.salt
    if len(salt) < 20:
        raise ValueError("a greeting salt has at least 20 bytes")
    caps = g.capabilities
    reserved = b"\0" * 6 + U32.pack(g.mariadb_capabilities)
    return b"".join(
        (
            b"\x0a",
            g.server_version.encode() + b"\0",
            U32.pack(g.connection_id),
            salt[:8],
            b"\0",
            U16.pack(caps & 0xFFFF),
            bytes((g.charset,)),
            U16.pack(g.status),
            U16.pack(caps >> 16 & 0xFFFF),
            bytes((len(salt) + 1,)),
            reserved,
            salt[8:] + b"\0",
            g.auth_plugin.encode() + b"\0",
        )
    )


@dataclass(frozen=True)
class HandshakeResponse:
    """Protocol::HandshakeResponse41 (or the SSLRequest, which is its first 32 bytes)."""

    capabilities: int
    max_packet: int
    charset: int
    user: bytes = b""
    auth_data: bytes = b""
    database: bytes | None = None
    auth_plugin: str | None = None
    attrs: bytes | None = None  # the connect attributes, still encoded (lenenc pairs)
    mariadb_capabilities: int = 0
    ssl_request_only: bool = False
    extra: bytes = field(default=b"", repr=False)  # trailing bytes we do not interpret


def connect_attribute(attrs: bytes | None, name: bytes) -> bytes | None:
    """One connect attribute's value from a HandshakeResponse's encoded block (a length, then
    length-encoded names and values), or None: absent, or the block is malformed."""
    if not attrs:
        return None
    try:
        size, pos = read_lenenc_int(attrs, 0)
        end = min(pos + size, len(attrs))
        while pos < end:
            key, pos = read_lenenc_bytes(attrs, pos)
            value, pos = read_lenenc_bytes(attrs, pos)
            if key == name:
                return bytes(value)
    except ProtocolError:
        return None
    return None


def parse_handshake_response(payload: Buffer) -> HandshakeResponse:
    caps, pos = read_u32(payload, 0)
    if not caps & Capability.PROTOCOL_41:
        raise ProtocolError("client does not speak protocol 4.1")
    max_packet, pos = read_u32(payload, pos)
    charset, pos = read_u8(payload, pos)
    filler, pos = read_bytes(payload, pos, 23)
    ext_caps = 0 if caps & Capability.LONG_PASSWORD else U32.unpack_from(filler, 19)[0]
    if pos == len(payload):
        return HandshakeResponse(caps, max_packet, charset, mariadb_capabilities=ext_caps,
                                 ssl_request_only=True)
    user, pos = read_nul_bytes(payload, pos)
    if caps & Capability.PLUGIN_AUTH_LENENC_CLIENT_DATA:
        auth, pos = read_lenenc_bytes(payload, pos)
    elif caps & Capability.SECURE_CONNECTION:
        size, pos = read_u8(payload, pos)
        auth, pos = read_bytes(payload, pos, size)
    else:
        auth, pos = read_nul_bytes(payload, pos)
    database = None
    if caps & Capability.CONNECT_WITH_DB and pos < len(payload):
        database, pos = read_nul_bytes(payload, pos)
    plugin = None
    if caps & Capability.PLUGIN_AUTH and pos < len(payload):
        raw, pos = read_nul_bytes(payload, pos)
        plugin = raw.decode("ascii", "replace")
    attrs = None
    if caps & Capability.CONNECT_ATTRS and pos < len(payload):
        start = pos
        size, pos = read_lenenc_int(payload, pos)
        _, pos = read_bytes(payload, pos, size)
        attrs = bytes(payload[start:pos])
    extra, _ = read_eof_bytes(payload, pos)
    return HandshakeResponse(caps, max_packet, charset, user, auth, database, plugin, attrs,
                             ext_caps, False, extra)


def build_handshake_response(r: HandshakeResponse) -> bytes:
    caps = r.capabilities
    filler = b"\0" * 19 + U32.pack(r.mariadb_capabilities)
    parts = [U32.pack(caps), U32.pack(r.max_packet), bytes((r.charset,)), filler]
    if r.ssl_request_only:
        return b"".join(parts)
    parts.append(r.user + b"\0")
    if caps & Capability.PLUGIN_AUTH_LENENC_CLIENT_DATA:
        parts.append(lenenc_bytes(r.auth_data))
    elif caps & Capability.SECURE_CONNECTION:
        parts.append(bytes((len(r.auth_data),)) + r.auth_data)
    else:
        parts.append(r.auth_data + b"\0")
    if caps & Capability.CONNECT_WITH_DB:
        parts.append((r.database or b"") + b"\0")
    if caps & Capability.PLUGIN_AUTH:
        parts.append((r.auth_plugin or "").encode() + b"\0")
    if caps & Capability.CONNECT_ATTRS:
        parts.append(r.attrs if r.attrs is not None else b"\0")
    parts.append(r.extra)
    return b"".join(parts)


def with_capabilities(r: HandshakeResponse, caps: int) -> HandshakeResponse:
    return replace(r, capabilities=caps)


@dataclass(frozen=True)
class ErrPacket:
    code: int
    sqlstate: str
    message: str


def parse_err(payload: Buffer) -> ErrPacket:
    header, pos = read_u8(payload, 0)
    if header != 0xFF:
        raise ProtocolError("not an ERR packet")
    code, pos = read_u16(payload, pos)
    state = "HY000"
    if pos < len(payload) and payload[pos] == 0x23:  # '#'
        raw, pos = read_bytes(payload, pos + 1, 5)
        state = raw.decode("ascii", "replace")
    message, _ = read_eof_bytes(payload, pos)
    return ErrPacket(code, state, message.decode("utf-8", "replace"))


def build_err(code: int, sqlstate: str, message: str) -> bytes:
    return b"\xff" + U16.pack(code) + b"#" + sqlstate.encode()[:5] + message.encode()


def build_ok(status: int, affected: int = 0, insert_id: int = 0, warnings: int = 0,
             header: int = 0x00) -> bytes:
    return (bytes((header,)) + lenenc_int(affected) + lenenc_int(insert_id) + U16.pack(status)
            + U16.pack(warnings))


def build_eof(status: int, warnings: int = 0) -> bytes:
    return b"\xfe" + U16.pack(warnings) + U16.pack(status)


@dataclass(frozen=True)
class AuthSwitch:
    plugin: str
    data: bytes


def parse_auth_switch(payload: Buffer) -> AuthSwitch:
    header, pos = read_u8(payload, 0)
    if header != 0xFE:
        raise ProtocolError("not an auth switch request")
    if pos == len(payload):  # old-style switch to mysql_old_password: refused by the caller
        return AuthSwitch("mysql_old_password", b"")
    plugin, pos = read_nul_bytes(payload, pos)
    data, _ = read_eof_bytes(payload, pos)
    return AuthSwitch(plugin.decode("ascii", "replace"), data)


def build_auth_switch(plugin: str, data: bytes) -> bytes:
    return b"\xfe" + plugin.encode() + b"\0" + data
