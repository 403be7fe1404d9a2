"""Traffic files and captured responses from nowhere: only the project's own errors escape.

A capture directory may hold anything (a file of another tool, a damaged disk), and a captured
response is whatever a backend sent: the decoder may raise FormatError only, reading a response
may raise ProtocolError only (and `outcome_of` nothing at all).
"""

from __future__ import annotations

import contextlib
import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiproxy.protocol.errors import ProtocolError
from tiproxy.protocol.responses import Expect
from tiproxy.traffic.format import Decoder, FormatError, go_unquote
from tiproxy.traffic.outcome import OutcomeReader, summary_of

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_LINES = st.lists(st.sampled_from([
    b"# Time: 2024-01-19T16:29:48.1Z\n", b"# Conn_ID: 3\n", b"# Cmd_type: StmtExecute\n",
    b"# Payload_len: 3\n", b"# Payload_len: 99999999999\n", b"# Prepared_stmt: \"a\\\"\n",
    b"# Success: false\n", b"# Query_time: x\n", b"abc\n", b"\n", b"# : \n",
]), max_size=12)


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def readline(self, limit: int) -> bytes:
        return self._f.readline(limit)

    def read(self, size: int) -> bytes:
        return self._f.read(size)

    def position(self) -> str:
        return "fuzz"


def _decode(data: bytes) -> None:
    decoder = Decoder(_Bytes(data))
    try:
        for _ in range(100):
            if decoder.next() is None:
                return
    except FormatError:
        return


@FUZZ
@given(st.binary(max_size=400))
def test_the_decoder_raises_only_format_errors(data: bytes) -> None:
    _decode(data)


@FUZZ
@given(_LINES, st.binary(max_size=40))
def test_the_decoder_on_near_misses(lines: list[bytes], tail: bytes) -> None:
    _decode(b"".join(lines) + tail)


@FUZZ
@given(st.text(max_size=40))
def test_go_unquote_raises_only_value_errors(text: str) -> None:
    with contextlib.suppress(ValueError):
        go_unquote('"' + text + '"')


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([b"\x03", b"\x16", b"\x17\x00\x00\x00\x00\x01",
                                                  b"\x1c", b"\x04", b"\x0e"]),
       st.booleans(), st.booleans())
def test_a_summary_of_any_bytes_is_one_or_none(data: bytes, packet: bytes,
                                                    deprecate_eof: bool, extended: bool) -> None:
    summary_of(data, packet, deprecate_eof, extended)


@FUZZ
@given(st.lists(st.binary(min_size=1, max_size=60), max_size=12), st.sampled_from(list(Expect)),
       st.booleans())
def test_the_reader_fed_any_packets_raises_only_protocol_errors(
        payloads: list[bytes], kind: Expect, deprecate_eof: bool) -> None:
    reader = OutcomeReader(kind, deprecate_eof)
    try:
        for p in payloads:
            if reader.feed(p):
                break
    except ProtocolError:
        pass
