"""Every parser fed bytes from nowhere: the only exception it may raise is ProtocolError.

A peer controls every byte these functions read. An IndexError, struct.error, zlib.error or
UnicodeDecodeError escaping them would end the session with a crash instead of a protocol error,
and would say nothing about who sent the bytes. Example counts keep the file under ~30 s on a slow
two-core machine.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tiproxy.protocol import codec
from tiproxy.protocol.compress import Decompressor, compress_frames
from tiproxy.protocol.constants import MAX_PAYLOAD, Capability
from tiproxy.protocol.errors import Origin, ProtocolError
from tiproxy.protocol.framer import PacketSplitter
from tiproxy.protocol.packets import (
    Greeting,
    HandshakeResponse,
    build_greeting,
    build_handshake_response,
    frame,
    parse_auth_switch,
    parse_err,
    parse_greeting,
    parse_handshake_response,
)
from tiproxy.protocol.responses import Expect
from tiproxy.protocol.rows import skip_plain_rows, skip_plain_rows_py
from tiproxy.protocol.tracker import ResponseTracker
from tiproxy.session.commands import parse_kill_query, parse_process_kill, rewrite_change_user
from tiproxy.session.login import Login

FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CHUNKS = st.lists(st.binary(max_size=64), max_size=12)


def survive(call: Callable[[], Any]) -> ProtocolError | None:
    """Run `call`; a ProtocolError is an answer, any other exception fails the test."""
    try:
        call()
    except ProtocolError as e:
        return e
    return None


# -- codec -------------------------------------------------------------------------------------

READERS: list[Callable[[codec.Buffer, int], tuple[Any, int]]] = [
    codec.read_u8,
    codec.read_u16,
    codec.read_u24,
    codec.read_u32,
    codec.read_u64,
    codec.read_lenenc_int,
    codec.read_lenenc_bytes,
    codec.read_nul_bytes,
    codec.read_eof_bytes,
    lambda buf, pos: codec.read_bytes(buf, pos, 5),
]


@FUZZ
@given(st.binary(max_size=40), st.integers(0, 42), st.sampled_from([bytes, bytearray, memoryview]))
def test_codec_readers(data: bytes, pos: int, kind: Callable[[bytes], codec.Buffer]) -> None:
    buf = kind(data)
    for reader in READERS:
        result: list[tuple[Any, int]] = []
        if survive(lambda reader=reader, out=result: out.append(reader(buf, pos))) is None:
            _, end = result[0]
            assert pos <= end <= len(data)


# -- whole packets -----------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=200))
def test_packet_parsers(data: bytes) -> None:
    for parse in (parse_greeting, parse_handshake_response, parse_err, parse_auth_switch):
        survive(lambda parse=parse: parse(data))


GREETING = build_greeting(
    Greeting(
        "5.5.5-10.11.6-MariaDB", 1, b"x" * 20, 0xF7FFFFFE, 45, 2, "mysql_native_password", 0x1D
    )
)
RESPONSE = build_handshake_response(
    HandshakeResponse(
        0x01BFA68F,
        1 << 24,
        45,
        b"app",
        b"a" * 20,
        b"db",
        "mysql_native_password",
        b"\x05\x01a\x02bc",
    )
)


def _mutate(base: bytes) -> st.SearchStrategy[bytes]:
    """`base` with a few bytes overwritten and cut somewhere: close to valid, so deep paths run."""
    return st.builds(
        lambda edits, cut: _apply(base, edits)[:cut],
        st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)), max_size=4),
        st.integers(0, len(base)),
    )


def _apply(base: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(base)
    for pos, value in edits:
        out[pos] = value
    return bytes(out)


@FUZZ
@given(_mutate(GREETING), _mutate(RESPONSE))
def test_packet_parsers_near_valid(greeting: bytes, response: bytes) -> None:
    survive(lambda: parse_greeting(greeting))
    survive(lambda: parse_handshake_response(response))


# -- framing -----------------------------------------------------------------------------------


@FUZZ
@given(CHUNKS, st.sampled_from([MAX_PAYLOAD, 100, 0]))
def test_packet_splitter(chunks: list[bytes], limit: int) -> None:
    splitter = PacketSplitter(limit=limit)

    def run() -> None:
        for chunk in chunks:
            for seq, payload in splitter.feed(chunk):
                assert 0 <= seq <= 255
                assert len(payload) <= limit

    survive(run)


@FUZZ
@given(CHUNKS)
def test_decompressor(chunks: list[bytes]) -> None:
    d = Decompressor()
    survive(lambda: [d.feed(chunk) for chunk in chunks])


def _zframe(payload: bytes, seq: int, ulen: int) -> bytes:
    return codec.U32.pack(len(payload) | seq << 24) + codec.U32.pack(ulen)[:3] + payload


@FUZZ
@given(
    st.one_of(st.binary(max_size=100), st.binary(max_size=300).map(zlib.compress)),
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3),
    st.integers(0, 2000),
    st.integers(1, 50),
)
def test_decompressor_frames_that_lie(
    payload: bytes, edits: list[tuple[int, int]], ulen: int, chunk: int
) -> None:
    """Well-framed payloads (often real zlib streams, damaged) with any declared length."""
    payload = _apply(payload, [(p, v) for p, v in edits if p < len(payload)])
    data = _zframe(payload, 0, ulen)
    d = Decompressor()
    out: list[bytes] = []
    if survive(
        lambda: [out.append(d.feed(data[i : i + chunk])) for i in range(0, len(data), chunk)]
    ):
        return
    if ulen:  # accepted: it inflated to exactly the declared length
        assert len(b"".join(out)) == ulen
        assert b"".join(out) == zlib.decompress(payload)


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 255))
def test_compress_round_trip(data: bytes, seq: int) -> None:
    frames, _ = compress_frames(data, seq)
    assert Decompressor().feed(b"".join(frames)) == data


# -- the response tracker ----------------------------------------------------------------------

KINDS = [k for k in Expect if k is not Expect.NOTHING]


def _track(kinds: list[Expect], deprecate_eof: bool,
           chunks: list[bytes]) -> tuple[list[Any], bool, int]:
    """The responses' events, whether the bytes were refused, and the packets counted (each
    one once, however the bytes were cut)."""
    events: list[Any] = []
    tracker = ResponseTracker(deprecate_eof, lambda t, s, f: events.append((t, s, f)))
    for i, kind in enumerate(kinds):
        tracker.expect(kind, i)
    error = survive(lambda: [tracker.feed(chunk) for chunk in chunks])
    if error is not None:
        assert error.origin is Origin.BACKEND  # everything the tracker reads is the backend's
    return events, error is not None, tracker.packets


@SLOW_FUZZ
@given(st.lists(st.sampled_from(KINDS), min_size=1, max_size=3), st.booleans(), CHUNKS)
def test_tracker_any_bytes(kinds: list[Expect], deprecate_eof: bool, chunks: list[bytes]) -> None:
    _track(kinds, deprecate_eof, chunks)


# Packets whose first bytes are the ones the tracker decides on, framed correctly, so that the
# state machine gets past the framing.
FIRST_BYTES = st.sampled_from([0x00, 0x01, 0x03, 0xFB, 0xFC, 0xFD, 0xFE, 0xFF])
PACKET = st.one_of(
    st.builds(lambda first, rest: bytes((first,)) + rest, FIRST_BYTES, st.binary(max_size=14)),
    st.sampled_from(
        [
            b"\x00\x00\x00\x02\x00\x00\x00",
            b"\xfe\x00\x00\x02\x00",
            b"\xfe\x00\x00\x0a\x00",
            b"\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00",
            b"\x01",
            b"\x02",
            b"\xfc\x00\x01",
            b"\x03def",
        ]
    ),
)


@SLOW_FUZZ
@given(
    st.lists(st.sampled_from(KINDS), min_size=1, max_size=4),
    st.booleans(),
    st.lists(PACKET, max_size=12),
    st.lists(st.integers(0, 400), max_size=10),
)
# An OK of five bytes whose insert id is 0xFB (no integer): the compiled scan once read it as
# an EOF's status, where the state machine refuses it.
@example([Expect.RESULT], False, [b"\x00\x00\xfb\x00\x00"], [])
def test_tracker_framed_packets_whole_or_cut(
    kinds: list[Expect], deprecate_eof: bool, packets: list[bytes], cuts: list[int]
) -> None:
    """Any packet sequence: only ProtocolError, and the same responses (and packet count)
    whether the stream comes whole or cut anywhere."""
    stream = b"".join(frame(p, i + 1) for i, p in enumerate(packets))
    whole = _track(kinds, deprecate_eof, [stream])
    if not whole[1]:  # every packet was read: each is counted once
        assert whole[2] == len(packets)
    bounds = [0, *sorted(c for c in cuts if c < len(stream)), len(stream)]
    cut = _track(kinds, deprecate_eof, [stream[a:b] for a, b in itertools.pairwise(bounds)])
    assert cut == whole
    singles = _track(kinds, deprecate_eof, [stream[i : i + 1] for i in range(len(stream))])
    assert singles == whole


@FUZZ
@given(st.binary(max_size=120), st.integers(0, 130))
def test_compiled_row_skipping_matches_the_python_loop(data: bytes, pos: int) -> None:
    assert skip_plain_rows(data, pos) == skip_plain_rows_py(data, pos)


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(1, 20), st.sampled_from([0x00, 0x05, 0xFB, 0xFE, 0xFF])), max_size=8
    )
)
def test_compiled_row_skipping_on_rows(rows: list[tuple[int, int]]) -> None:
    data = b"".join(frame(bytes((first,)) + b"r" * (size - 1), 1) for size, first in rows)
    for pos in range(len(data) + 1):
        assert skip_plain_rows(data, pos) == skip_plain_rows_py(data, pos)


# -- the login ---------------------------------------------------------------------------------

TEMPLATE = parse_greeting(GREETING)


@FUZZ
@given(st.integers(0, 255), st.binary(max_size=120), st.booleans())
def test_login_client_packet(seq: int, payload: bytes, tls: bool) -> None:
    login = Login(TEMPLATE, 1, tls_available=tls)
    survive(lambda: login.client_packet(seq, payload))


@FUZZ
@given(
    st.one_of(st.binary(max_size=120), _mutate(GREETING)),
    st.integers(0, 255),
    st.binary(max_size=40),
)
def test_login_backend_packets(greeting: bytes, seq: int, payload: bytes) -> None:
    login = Login(TEMPLATE, 1, tls_available=False)
    login.client_packet(1, RESPONSE)
    error = survive(lambda: login.backend_greeting_received(greeting))
    if error is not None:
        assert error.origin is Origin.BACKEND
        return
    error = survive(lambda: login.backend_packet(seq, payload))
    if error is not None:
        assert error.origin is Origin.BACKEND


# -- commands ----------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=80), st.integers(0, 0xFFFFFFFF))
def test_command_parsers(payload: bytes, caps: int) -> None:
    parse_kill_query(payload)  # never raises: a statement it cannot read is not a KILL
    survive(lambda: parse_process_kill(payload))
    survive(lambda: rewrite_change_user(payload, caps | Capability.PLUGIN_AUTH, "x"))
