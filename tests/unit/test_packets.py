"""The packets read and written whole: build then parse gives the fields back; a truncated packet
is a ProtocolError.

References: https://mariadb.com/kb/en/connection/ and
https://dev.mysql.com/doc/dev/mysql-server/latest/page_protocol_basic_packets.html
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tiproxy.protocol.codec import U16, U32, lenenc_bytes, read_lenenc_int
from tiproxy.protocol.constants import MAX_PAYLOAD, Capability, ServerStatus
from tiproxy.protocol.errors import ProtocolError
from tiproxy.protocol.packets import (
    AuthSwitch,
    ErrPacket,
    Greeting,
    HandshakeResponse,
    build_auth_switch,
    build_eof,
    build_err,
    build_greeting,
    build_handshake_response,
    build_ok,
    frame,
    parse_auth_switch,
    parse_err,
    parse_greeting,
    parse_handshake_response,
    with_capabilities,
)
from tiproxy.protocol.responses import ok_status, terminator_status

C = Capability

# -- frame -----------------------------------------------------------------------------------


def _headers(data: bytes) -> list[tuple[int, int]]:
    """(length, sequence id) of each packet in `data`."""
    out = []
    pos = 0
    while pos < len(data):
        header = U32.unpack_from(data, pos)[0]
        out.append((header & 0xFFFFFF, header >> 24))
        pos += 4 + (header & 0xFFFFFF)
    assert pos == len(data)
    return out


def test_frame_small() -> None:
    assert frame(b"\x03select 1", 0) == b"\x09\x00\x00\x00\x03select 1"
    assert frame(b"", 7) == b"\x00\x00\x00\x07"
    assert frame(b"x", 256) == b"\x01\x00\x00\x00x"  # sequence ids wrap at 256


@pytest.mark.parametrize(
    ("size", "packets"),
    [
        (MAX_PAYLOAD - 1, [(MAX_PAYLOAD - 1, 3)]),
        (MAX_PAYLOAD, [(MAX_PAYLOAD, 3), (0, 4)]),  # a full packet is followed by an empty one
        (MAX_PAYLOAD + 1, [(MAX_PAYLOAD, 3), (1, 4)]),
        (2 * MAX_PAYLOAD + 3, [(MAX_PAYLOAD, 3), (MAX_PAYLOAD, 4), (3, 5)]),
    ],
)
def test_frame_splits_at_16mib(size: int, packets: list[tuple[int, int]]) -> None:
    payload = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    data = frame(payload, 3)
    assert _headers(data) == packets
    # The payloads, put back together, are the original.
    body = bytearray()
    pos = 0
    for length, _ in packets:
        body += data[pos + 4 : pos + 4 + length]
        pos += 4 + length
    assert body == payload


def test_frame_sequence_wraps_across_split() -> None:
    data = frame(b"a" * MAX_PAYLOAD, 255)
    assert [seq for _, seq in _headers(data)] == [255, 0]


# -- greeting --------------------------------------------------------------------------------

MARIADB_CAPS = (
    C.FOUND_ROWS | C.LONG_FLAG | C.CONNECT_WITH_DB | C.NO_SCHEMA | C.COMPRESS | C.ODBC
    | C.LOCAL_FILES | C.IGNORE_SPACE | C.PROTOCOL_41 | C.INTERACTIVE | C.SSL | C.IGNORE_SIGPIPE
    | C.TRANSACTIONS | C.RESERVED | C.SECURE_CONNECTION | C.MULTI_STATEMENTS | C.MULTI_RESULTS
    | C.PS_MULTI_RESULTS | C.PLUGIN_AUTH | C.CONNECT_ATTRS | C.PLUGIN_AUTH_LENENC_CLIENT_DATA
    | C.CAN_HANDLE_EXPIRED_PASSWORDS | C.SESSION_TRACK | C.DEPRECATE_EOF | C.REMEMBER_OPTIONS
)  # fmt: skip

MARIADB = Greeting(
    server_version="5.5.5-10.11.6-MariaDB-log",
    connection_id=4242,
    salt=b"abcdefgh" + b"ijklmnopqrst",
    capabilities=MARIADB_CAPS,  # CLIENT_MYSQL (bit 0) clear: extended capabilities follow
    charset=45,
    status=ServerStatus.AUTOCOMMIT,
    auth_plugin="mysql_native_password",
    mariadb_capabilities=0x1D,
)

MYSQL8 = Greeting(
    server_version="8.0.36",
    connection_id=9,
    salt=b"0123456789ABCDEFGHIJ",
    capabilities=MARIADB_CAPS | C.LONG_PASSWORD | C.QUERY_ATTRIBUTES | C.ZSTD_COMPRESSION,
    charset=255,
    status=ServerStatus.AUTOCOMMIT,
    auth_plugin="caching_sha2_password",
)


@pytest.mark.parametrize("greeting", [MARIADB, MYSQL8], ids=["mariadb", "mysql8"])
def test_greeting_round_trip(greeting: Greeting) -> None:
    assert parse_greeting(build_greeting(greeting)) == greeting


def test_greeting_layout() -> None:
    """Byte positions from the HandshakeV10 documentation."""
    raw = build_greeting(MARIADB)
    assert raw[0] == 10
    pos = raw.index(b"\0") + 1
    assert raw[1 : pos - 1] == b"5.5.5-10.11.6-MariaDB-log"
    assert U32.unpack_from(raw, pos)[0] == 4242
    assert raw[pos + 4 : pos + 12] == b"abcdefgh"
    assert raw[pos + 12] == 0  # filler
    assert U16.unpack_from(raw, pos + 13)[0] == MARIADB_CAPS & 0xFFFF
    assert raw[pos + 15] == 45
    assert U16.unpack_from(raw, pos + 16)[0] == ServerStatus.AUTOCOMMIT
    assert U16.unpack_from(raw, pos + 18)[0] == MARIADB_CAPS >> 16
    assert raw[pos + 20] == 21  # length of the auth plugin data, with its NUL
    assert U32.unpack_from(raw, pos + 27)[0] == 0x1D  # MariaDB's extended capabilities
    assert raw[pos + 31 : pos + 44] == b"ijklmnopqrst\0"
    assert raw[pos + 44 :] == b"mysql_native_password\0"


GREETINGS = st.builds(
    Greeting,
    server_version=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
    connection_id=st.integers(0, 0xFFFFFFFF),
    salt=st.binary(min_size=20, max_size=20).filter(lambda s: b"\0" not in s),
    capabilities=st.integers(0, 0xFFFFFFFF).map(
        lambda c: c | C.PROTOCOL_41 | C.SECURE_CONNECTION | C.PLUGIN_AUTH
    ),
    charset=st.integers(0, 255),
    status=st.integers(0, 0xFFFF),
    auth_plugin=st.sampled_from(["mysql_native_password", "caching_sha2_password", "dialog"]),
    mariadb_capabilities=st.integers(0, 0xFFFFFFFF),
).map(lambda g: g if not g.capabilities & C.LONG_PASSWORD else replace(g, mariadb_capabilities=0))


@given(GREETINGS)
def test_greeting_round_trip_any(greeting: Greeting) -> None:
    assert parse_greeting(build_greeting(greeting)) == greeting


def test_greeting_truncated() -> None:
    raw = build_greeting(MARIADB)
    caps_end = raw.index(b"\0") + 1 + 4 + 8 + 1 + 2
    salt_end = caps_end + 1 + 2 + 2 + 1 + 10 + 13
    for cut in range(len(raw)):
        if cut < salt_end:
            with pytest.raises(ProtocolError):
                parse_greeting(raw[:cut])
        else:  # cut inside the plugin name: what is there is read
            assert parse_greeting(raw[:cut]).salt == MARIADB.salt


def test_pre_41_greeting_ends_after_the_lower_capabilities() -> None:
    raw = b"\x0a5.0.96\0" + U32.pack(7) + b"12345678\0" + U16.pack(C.LONG_PASSWORD | C.LOCAL_FILES)
    old = parse_greeting(raw)
    assert (old.connection_id, old.salt, old.capabilities) == (7, b"12345678", 0x81)
    assert old.auth_plugin == "mysql_native_password"


def test_greeting_other_protocol_version_is_refused() -> None:
    with pytest.raises(ProtocolError, match="version"):
        parse_greeting(b"\x09" + build_greeting(MARIADB)[1:])


def test_build_greeting_needs_a_full_salt() -> None:
    with pytest.raises(ValueError, match="salt"):
        build_greeting(Greeting("x", 1, b"short", 0, 0, 0, "mysql_native_password"))


# -- handshake response ----------------------------------------------------------------------

ATTRS = lenenc_bytes(lenenc_bytes(b"_client_name") + lenenc_bytes(b"libmariadb")
                     + lenenc_bytes(b"_pid") + lenenc_bytes(b"1234"))  # fmt: skip
BASE = C.PROTOCOL_41 | C.LONG_PASSWORD | C.TRANSACTIONS | C.MULTI_RESULTS

RESPONSES = {
    "lenenc auth, db, plugin, attrs": HandshakeResponse(
        BASE | C.SECURE_CONNECTION | C.PLUGIN_AUTH_LENENC_CLIENT_DATA | C.CONNECT_WITH_DB
        | C.PLUGIN_AUTH | C.CONNECT_ATTRS,
        1 << 24, 45, b"app", bytes(range(1, 21)), b"shop", "mysql_native_password", ATTRS,
    ),
    "one-byte auth length": HandshakeResponse(
        BASE | C.SECURE_CONNECTION | C.PLUGIN_AUTH, 0, 33, b"bob", b"\xff" * 20, None,
        "client_ed25519",
    ),
    "NUL-terminated auth": HandshakeResponse(BASE, 0, 8, b"old", b"scrambled", None, None),
    "long auth data": HandshakeResponse(
        BASE | C.PLUGIN_AUTH_LENENC_CLIENT_DATA | C.SECURE_CONNECTION | C.PLUGIN_AUTH,
        0, 45, b"x" * 300, b"k" * 600, None, "sha256_password",
    ),
    "mariadb extended capabilities": HandshakeResponse(
        (BASE & ~C.LONG_PASSWORD) | C.SECURE_CONNECTION | C.PLUGIN_AUTH, 0, 45, b"m", b"",
        None, "mysql_native_password", mariadb_capabilities=0x1D,
    ),
    "ssl request": HandshakeResponse(BASE | C.SSL, 1 << 24, 45, ssl_request_only=True),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(RESPONSES))
def test_handshake_response_round_trip(name: str) -> None:
    response = RESPONSES[name]
    raw = build_handshake_response(response)
    assert parse_handshake_response(raw) == response
    assert parse_handshake_response(memoryview(raw)) == response
    assert parse_handshake_response(bytearray(raw)) == response


def test_ssl_request_is_32_bytes() -> None:
    raw = build_handshake_response(RESPONSES["ssl request"])
    assert len(raw) == 32
    assert parse_handshake_response(raw).ssl_request_only


def test_handshake_response_keeps_trailing_bytes() -> None:
    response = RESPONSES["one-byte auth length"]
    raw = build_handshake_response(response) + b"\x01\x02"
    assert parse_handshake_response(raw).extra == b"\x01\x02"
    assert build_handshake_response(parse_handshake_response(raw)) == raw


@pytest.mark.parametrize("name", sorted(set(RESPONSES) - {"ssl request"}))
def test_handshake_response_truncated(name: str) -> None:
    raw = build_handshake_response(RESPONSES[name])
    user_end = raw.index(b"\0", 32) + 1
    full = parse_handshake_response(raw)
    for cut in range(len(raw)):
        if cut == 32:
            assert parse_handshake_response(raw[:cut]).ssl_request_only
        elif cut < user_end + 1:
            with pytest.raises(ProtocolError):
                parse_handshake_response(raw[:cut])
        else:
            # Optional parts at the end may be missing; what is read is never garbage.
            try:
                part = parse_handshake_response(raw[:cut])
            except ProtocolError:
                continue
            assert part.user == full.user
            assert part.auth_data == full.auth_data


def test_handshake_response_without_protocol_41_is_refused() -> None:
    raw = build_handshake_response(RESPONSES["one-byte auth length"])
    caps = U32.unpack_from(raw, 0)[0] & ~C.PROTOCOL_41
    with pytest.raises(ProtocolError, match=r"4\.1"):
        parse_handshake_response(U32.pack(caps) + raw[4:])


def test_with_capabilities() -> None:
    r = RESPONSES["one-byte auth length"]
    assert with_capabilities(r, 5).capabilities == 5
    assert with_capabilities(r, 5).user == r.user


# -- OK, ERR, EOF ----------------------------------------------------------------------------


@given(st.integers(0, 0xFFFF), st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1),
       st.integers(0, 0xFFFF), st.sampled_from([0x00, 0xFE]))  # fmt: skip
def test_ok_round_trip(
    status: int, affected: int, insert_id: int, warnings: int, header: int
) -> None:
    raw = build_ok(status, affected, insert_id, warnings, header)
    assert raw[0] == header
    got_affected, pos = read_lenenc_int(raw, 1)
    got_insert, pos = read_lenenc_int(raw, pos)
    assert (got_affected, got_insert) == (affected, insert_id)
    assert U16.unpack_from(raw, pos)[0] == status
    assert U16.unpack_from(raw, pos + 2)[0] == warnings
    assert ok_status(raw, 0, len(raw)) == status
    assert terminator_status(b"junk" + raw, 4, len(raw)) == status


def test_eof_layout() -> None:
    raw = build_eof(ServerStatus.AUTOCOMMIT | ServerStatus.IN_TRANS, warnings=3)
    assert raw == b"\xfe\x03\x00\x03\x00"
    assert terminator_status(raw, 0, 5) == 3


@given(st.integers(0, 0xFFFF), st.text(st.characters(min_codepoint=0x30, max_codepoint=0x5A),
       min_size=5, max_size=5), st.text(max_size=200))  # fmt: skip
def test_err_round_trip(code: int, state: str, message: str) -> None:
    assert parse_err(build_err(code, state, message)) == ErrPacket(code, state, message)


def test_err_without_sqlstate() -> None:
    assert parse_err(b"\xff\x15\x04Bad handshake") == ErrPacket(1045, "HY000", "Bad handshake")
    assert parse_err(b"\xff\x15\x04") == ErrPacket(1045, "HY000", "")


@pytest.mark.parametrize("raw", [b"", b"\xff", b"\xff\x15", b"\xff\x15\x04#2800", b"\x00\x15\x04"])
def test_err_truncated_or_not_err(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_err(raw)


# -- auth switch -----------------------------------------------------------------------------


@given(st.sampled_from(["mysql_native_password", "caching_sha2_password", "client_ed25519"]),
       st.binary(max_size=64))  # fmt: skip
def test_auth_switch_round_trip(plugin: str, data: bytes) -> None:
    raw = build_auth_switch(plugin, data)
    assert raw[0] == 0xFE
    assert parse_auth_switch(raw) == AuthSwitch(plugin, data)


def test_old_style_auth_switch() -> None:
    assert parse_auth_switch(b"\xfe") == AuthSwitch("mysql_old_password", b"")


@pytest.mark.parametrize("raw", [b"", b"\x01\x03", b"\xfemysql_native_password"])
def test_auth_switch_malformed(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_auth_switch(raw)
