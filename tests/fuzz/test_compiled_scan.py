"""The compiled whole-result scanner agrees with the Python state machine it shortcuts."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiproxy.protocol import tracker as tracker_module
from tiproxy.protocol.errors import ProtocolError
from tiproxy.protocol.responses import Expect
from tiproxy.protocol.tracker import ResponseTracker

MORE, CURSOR, IN_TRANS = 0x0008, 0x0040, 0x0001


def pkt(seq: int, payload: bytes) -> bytes:
    return struct.pack("<I", len(payload) | (seq & 0xFF) << 24) + payload


def eof(status: int) -> bytes:
    return b"\xfe\x00\x00" + struct.pack("<H", status)


def ok(status: int, header: int = 0x00) -> bytes:
    return bytes((header, 1, 0)) + struct.pack("<HH", status, 0)


@st.composite
def responses(draw: Any) -> tuple[bytes, bool, int]:
    deprecate = draw(st.booleans())
    binary = draw(st.sampled_from([0, 1, 2]))  # text, binary, binary with a cursor asked for
    out = b""
    results = draw(st.integers(1, 3))
    for i in range(results):
        more = MORE if i < results - 1 else 0
        status = draw(st.sampled_from([0, IN_TRANS, 2])) | more
        kind = draw(st.sampled_from(["ok", "err", "rows", "rows_err", "cursor"]))
        for _ in range(draw(st.integers(0, 2))):  # MariaDB progress reports first
            out += pkt(1, b"\xff\xff\xff\x01\x01\x02\x10\x00\x00\x04copy")
        if kind == "ok":
            out += pkt(1, ok(status))
        elif kind == "err":
            out += pkt(1, b"\xff\x28\x04#42000boom")
            break
        else:
            columns = draw(st.integers(1, 5))
            # CACHE_METADATA's "metadata follows" byte after the count, or no such byte
            follows = draw(st.sampled_from([b"", b"\x01", b"\x00"]))
            out += pkt(1, bytes((columns,)) + follows)
            if follows != b"\x00":
                out += b"".join(pkt(2, b"\x03def" + b"x" * draw(st.integers(0, 30)))
                                for _ in range(columns))
            if kind == "cursor" and binary == 2 and not deprecate:
                out += pkt(3, eof(status | CURSOR))
                continue
            if not deprecate:
                out += pkt(3, eof(status & ~MORE))
            for _ in range(draw(st.integers(0, 6))):
                if draw(st.integers(0, 3)) == 0:  # a progress report between rows (REPAIR)
                    out += pkt(4, b"\xff\xff\xff\x01\x01\x01\x00\x00\x00\x01r")
                first = b"\x00" if binary else bytes((draw(st.integers(0, 0xFA)),))
                out += pkt(4, first + b"r" * draw(st.integers(0, 40)))
            if kind == "rows_err":
                out += pkt(5, b"\xff\x3d\x05#70100killed")
                break
            out += pkt(5, ok(status, 0xFE) if deprecate else eof(status))
    if draw(st.booleans()):
        out += out[: draw(st.integers(0, len(out)))]  # a second response, maybe cut short
    return out, deprecate, binary


def run(data: bytes, deprecate: bool, binary: int) -> tuple[list[Any], int, int, int] | str:
    done: list[Any] = []
    t = ResponseTracker(deprecate, lambda tok, status, failed: done.append(
        (tok, status, failed, t.error if failed else 0)))
    kind = (Expect.RESULT, Expect.BINARY, Expect.CURSOR)[binary]
    t.expect(kind, 1)
    t.expect(kind, 2)
    try:
        t.feed(data)
    except ProtocolError as e:
        return f"error: {e}"
    return done, t.status, t.phase, t.packets


@settings(max_examples=300, deadline=None)
@given(responses())
def test_compiled_and_python_agree(case: tuple[bytes, bool, int]) -> None:
    if tracker_module.scan_result is None:
        pytest.skip("the compiled scanner is not built")
    data, deprecate, binary = case
    compiled = run(data, deprecate, binary)
    saved = tracker_module.scan_result
    tracker_module.scan_result = None
    try:
        python = run(data, deprecate, binary)
    finally:
        tracker_module.scan_result = saved
    assert compiled == python


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.booleans(), st.booleans(), st.integers(0, 0xFFFF))
def test_compiled_scanner_never_crashes(data: bytes, deprecate: bool, binary: bool,
                                        status: int) -> None:
    if tracker_module.scan_result is None:
        pytest.skip("the compiled scanner is not built")
    for pos in (0, 1, len(data)):
        result = tracker_module.scan_result(data, pos, deprecate, binary, status)
        assert result is None or pos <= result[0] <= len(data)
