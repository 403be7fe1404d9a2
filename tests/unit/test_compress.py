"""The compressed protocol: frames round trip, however the frames are cut; a frame that does not
inflate to exactly its declared length is a ProtocolError.

Reference: https://dev.mysql.com/doc/dev/mysql-server/latest/page_protocol_basic_compression.html
"""

from __future__ import annotations

import itertools
import os
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiproxy.protocol.codec import U32
from tiproxy.protocol.compress import MIN_COMPRESS_LENGTH, Decompressor, compress_frames
from tiproxy.protocol.constants import MAX_PAYLOAD
from tiproxy.protocol.errors import ProtocolError
from tiproxy.protocol.packets import frame


def zframe(payload: bytes, seq: int, ulen: int) -> bytes:
    """A compressed-protocol frame header (compressed length, sequence id, original length)."""
    return U32.pack(len(payload) | seq << 24) + U32.pack(ulen)[:3] + payload


def headers(frames: list[bytes]) -> list[tuple[int, int, int]]:
    out = []
    for f in frames:
        clen = f[0] | f[1] << 8 | f[2] << 16
        assert clen == len(f) - 7
        out.append((clen, f[3], f[4] | f[5] << 8 | f[6] << 16))
    return out


def inflate_all(frames: list[bytes], chunk: int | None = None) -> tuple[bytes, int]:
    d = Decompressor()
    data = b"".join(frames)
    if chunk is None:
        return d.feed(data), d.last_seq
    out = b"".join(d.feed(data[i : i + chunk]) for i in range(0, len(data), chunk))
    return out, d.last_seq


PLAIN = frame(b"\x03select * from t where id in (" + b"1," * 100 + b"1)", 0) + frame(b"\x0e", 0)


def test_small_payload_is_stored() -> None:
    data = frame(b"\x0e", 0)  # COM_PING: below MIN_COMPRESS_LENGTH
    frames, seq = compress_frames(data, 0)
    assert frames == [zframe(data, 0, 0)]
    assert seq == 1


def test_large_payload_is_deflated() -> None:
    frames, seq = compress_frames(PLAIN, 3)
    assert len(PLAIN) >= MIN_COMPRESS_LENGTH
    [(clen, fseq, ulen)] = headers(frames)
    assert (fseq, ulen, seq) == (3, len(PLAIN), 4)
    assert clen < len(PLAIN)
    assert zlib.decompress(frames[0][7:]) == PLAIN


def test_incompressible_payload_is_stored() -> None:
    noise = os.urandom(500)
    frames, _ = compress_frames(noise, 0)
    assert headers(frames) == [(500, 0, 0)]


def test_empty_input_gives_one_empty_frame() -> None:
    frames, seq = compress_frames(b"", 9)
    assert frames == [zframe(b"", 9, 0)]
    assert seq == 10


@pytest.mark.parametrize("chunk", [None, 1, 7, 1000])
def test_round_trip(chunk: int | None) -> None:
    for data in (PLAIN, frame(b"\x0e", 0), os.urandom(300)):
        frames, _ = compress_frames(data, 5)
        assert inflate_all(frames, chunk) == (data, 5)


def test_round_trip_over_16mib() -> None:
    data = frame(bytes(range(256)) * (MAX_PAYLOAD // 256 + 10), 0)
    frames, seq = compress_frames(data, 255)
    assert [f[3] for f in frames] == [255, 0]  # sequence ids wrap
    assert seq == 1
    assert all(h[2] <= MAX_PAYLOAD for h in headers(frames))
    assert inflate_all(frames, 1 << 20) == (data, 0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=400), min_size=1, max_size=5), st.data())
def test_round_trip_random_cuts(pieces: list[bytes], data: st.DataObject) -> None:
    frames: list[bytes] = []
    seq = 0
    for piece in pieces:
        more, seq = compress_frames(piece, seq)
        frames += more
    stream = b"".join(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    d = Decompressor()
    out = b"".join(d.feed(stream[a:b]) for a, b in itertools.pairwise([0, *cuts, len(stream)]))
    assert out == b"".join(pieces)
    assert d.last_seq == seq - 1


def test_several_frames_in_one_chunk_and_a_partial_one() -> None:
    a, _ = compress_frames(PLAIN, 0)
    b, _ = compress_frames(b"hello", 1)
    d = Decompressor()
    stream = a[0] + b[0]
    assert d.feed(stream[:-2]) == PLAIN
    assert d.last_seq == 0
    assert d.feed(stream[-2:]) == b"hello"
    assert d.last_seq == 1


# -- frames that lie ---------------------------------------------------------------------------


def test_declared_length_smaller_than_inflated_is_refused() -> None:
    """A zip bomb: a few KiB that inflate to megabytes, declared as 100 bytes."""
    bomb = zlib.compress(b"\0" * (8 << 20), 9)
    with pytest.raises(ProtocolError):
        Decompressor().feed(zframe(bomb, 0, 100))


@pytest.mark.parametrize("delta", [-1, 1])
def test_declared_length_off_by_one_is_refused(delta: int) -> None:
    data = b"a" * 1000
    with pytest.raises(ProtocolError):
        Decompressor().feed(zframe(zlib.compress(data), 0, len(data) + delta))


def test_truncated_zlib_stream_is_refused() -> None:
    data = b"abc" * 100
    packed = zlib.compress(data)
    for cut in (1, 2, len(packed) // 2, len(packed) - 4, len(packed) - 1):
        with pytest.raises(ProtocolError):
            Decompressor().feed(zframe(packed[:cut], 0, len(data)))


def test_bytes_after_the_zlib_stream_are_refused() -> None:
    data = b"abc" * 100
    with pytest.raises(ProtocolError):
        Decompressor().feed(zframe(zlib.compress(data) + b"extra", 0, len(data)))


def test_garbage_payload_is_refused() -> None:
    with pytest.raises(ProtocolError):
        Decompressor().feed(zframe(b"this is not zlib at all", 0, 50))


def test_empty_payload_with_a_declared_length_is_refused() -> None:
    with pytest.raises(ProtocolError):
        Decompressor().feed(zframe(b"", 0, 10))
