"""Integers and strings as the protocol encodes them: round trips, and truncation is a ProtocolError.

Reference: https://dev.mysql.com/doc/dev/mysql-server/latest/page_protocol_basic_dt_integers.html
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tiproxy.protocol.codec import (
    U16,
    U32,
    U64,
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
    read_u24,
    read_u32,
    read_u64,
    u24,
)
from tiproxy.protocol.errors import ProtocolError

KINDS: list[Callable[[bytes], Buffer]] = [bytes, bytearray, memoryview]

# (value, its encoding) at every boundary of the length-encoded integer.
LENENC = [
    (0, b"\x00"),
    (250, b"\xfa"),
    (251, b"\xfc\xfb\x00"),
    (0xFFFF, b"\xfc\xff\xff"),
    (0x10000, b"\xfd\x00\x00\x01"),
    (0xFFFFFF, b"\xfd\xff\xff\xff"),
    (0x1000000, b"\xfe\x00\x00\x00\x01\x00\x00\x00\x00"),
    ((1 << 64) - 1, b"\xfe" + b"\xff" * 8),
]


@pytest.mark.parametrize(("value", "encoded"), LENENC)
@pytest.mark.parametrize("kind", KINDS)
def test_lenenc_int_boundaries(value: int, encoded: bytes, kind: Callable[[bytes], Buffer]) -> None:
    assert lenenc_int(value) == encoded
    buf = kind(b"ab" + encoded + b"cd")
    assert read_lenenc_int(buf, 2) == (value, 2 + len(encoded))


@pytest.mark.parametrize(("value", "encoded"), LENENC)
def test_lenenc_int_truncated_raises(value: int, encoded: bytes) -> None:
    for cut in range(len(encoded)):
        for kind in KINDS:
            with pytest.raises(ProtocolError):
                read_lenenc_int(kind(encoded[:cut]), 0)


@pytest.mark.parametrize("prefix", [0xFB, 0xFF])
def test_lenenc_int_null_and_err_prefixes_are_not_integers(prefix: int) -> None:
    with pytest.raises(ProtocolError):
        read_lenenc_int(bytes((prefix, 0, 0, 0, 0, 0, 0, 0, 0)), 0)


def test_negative_lenenc_int_is_refused() -> None:
    with pytest.raises(ValueError, match="unsigned"):
        lenenc_int(-1)


@given(st.integers(0, (1 << 64) - 1), st.binary(max_size=8))
def test_lenenc_int_round_trip(value: int, tail: bytes) -> None:
    encoded = lenenc_int(value)
    assert read_lenenc_int(encoded + tail, 0) == (value, len(encoded))
    # The shortest encoding, as servers write it.
    assert len(encoded) == (
        1 if value < 251 else 3 if value < 1 << 16 else 4 if value < 1 << 24 else 9
    )


@given(st.binary(max_size=70000), st.binary(max_size=4))
def test_lenenc_bytes_round_trip(value: bytes, tail: bytes) -> None:
    encoded = lenenc_bytes(value)
    for kind in KINDS:
        assert read_lenenc_bytes(kind(encoded + tail), 0) == (value, len(encoded))


@pytest.mark.parametrize("size", [0, 1, 250, 251, 300, 0x10000])
def test_lenenc_bytes_truncated_raises(size: int) -> None:
    encoded = lenenc_bytes(b"x" * size)
    for cut in {*range(min(len(encoded), 12)), len(encoded) - 1}:
        if cut >= len(encoded):
            continue
        with pytest.raises(ProtocolError):
            read_lenenc_bytes(encoded[:cut], 0)


FIXED: list[tuple[Callable[[Buffer, int], tuple[int, int]], int, Callable[[int], bytes]]] = [
    (read_u8, 1, lambda v: bytes((v,))),
    (read_u16, 2, U16.pack),
    (read_u24, 3, u24),
    (read_u32, 4, U32.pack),
    (read_u64, 8, U64.pack),
]


@pytest.mark.parametrize(("reader", "size", "writer"), FIXED)
@pytest.mark.parametrize("kind", KINDS)
def test_fixed_ints_little_endian(
    reader: Callable[[Buffer, int], tuple[int, int]],
    size: int,
    writer: Callable[[int], bytes],
    kind: Callable[[bytes], Buffer],
) -> None:
    top = (1 << (8 * size)) - 1
    for value in (0, 1, 0x5A, top // 3, top):
        encoded = writer(value)
        assert len(encoded) == size
        assert reader(kind(b"\x99" + encoded), 1) == (value, 1 + size)
    assert reader(kind(bytes(range(1, size + 1))), 0)[0] == int.from_bytes(
        bytes(range(1, size + 1)), "little"
    )


@pytest.mark.parametrize(("reader", "size", "writer"), FIXED)
@pytest.mark.parametrize("kind", KINDS)
def test_fixed_ints_truncated_raise(
    reader: Callable[[Buffer, int], tuple[int, int]],
    size: int,
    writer: Callable[[int], bytes],
    kind: Callable[[bytes], Buffer],
) -> None:
    encoded = writer(1)
    for cut in range(size):
        with pytest.raises(ProtocolError):
            reader(kind(encoded[:cut]), 0)
    with pytest.raises(ProtocolError):
        reader(kind(encoded), 1)  # the last bytes, read from an offset
    with pytest.raises(ProtocolError):
        reader(kind(encoded), size + 5)  # past the end


@pytest.mark.parametrize("kind", KINDS)
def test_read_bytes(kind: Callable[[bytes], Buffer]) -> None:
    buf = kind(b"hello world")
    assert read_bytes(buf, 6, 5) == (b"world", 11)
    assert read_bytes(buf, 11, 0) == (b"", 11)
    value, _ = read_bytes(buf, 0, 5)
    assert type(value) is bytes  # kept data is a copy, not a view into the buffer
    with pytest.raises(ProtocolError):
        read_bytes(buf, 6, 6)
    with pytest.raises(ProtocolError):
        read_bytes(buf, 12, 0)


@pytest.mark.parametrize("kind", KINDS)
def test_read_nul_bytes(kind: Callable[[bytes], Buffer]) -> None:
    buf = kind(b"\0root\0db\0tail")
    assert read_nul_bytes(buf, 0) == (b"", 1)
    assert read_nul_bytes(buf, 1) == (b"root", 6)
    assert read_nul_bytes(buf, 6) == (b"db", 9)
    with pytest.raises(ProtocolError):
        read_nul_bytes(buf, 9)  # "tail" has no NUL
    with pytest.raises(ProtocolError):
        read_nul_bytes(buf, 40)


@given(
    st.binary(max_size=40).filter(lambda b: b"\0" not in b),
    st.binary(max_size=10),
    st.binary(max_size=10),
)
def test_read_nul_bytes_from_any_offset(value: bytes, head: bytes, tail: bytes) -> None:
    data = head + value + b"\0" + tail
    for kind in KINDS:
        assert read_nul_bytes(kind(data), len(head)) == (value, len(head) + len(value) + 1)


@pytest.mark.parametrize("kind", KINDS)
def test_read_eof_bytes(kind: Callable[[bytes], Buffer]) -> None:
    buf = kind(b"abcdef")
    assert read_eof_bytes(buf, 2) == (b"cdef", 6)
    assert read_eof_bytes(buf, 6) == (b"", 6)


def test_u24() -> None:
    assert u24(0x123456) == b"\x56\x34\x12"
    assert read_u24(u24(0xFFFFFF), 0) == (0xFFFFFF, 3)
