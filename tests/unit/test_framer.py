"""PacketSplitter: whole packets out of a byte stream, however the stream is cut."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tiproxy.protocol.constants import MAX_PAYLOAD
from tiproxy.protocol.errors import Origin, ProtocolError
from tiproxy.protocol.framer import PacketSplitter
from tiproxy.protocol.packets import frame

PACKETS = [
    (0, b"\x0a5.5.5-10.11.6-MariaDB\0"),
    (1, b""),
    (2, b"x" * 300),
    (3, b"\x00\x00\x00\x02\x00"),
]
STREAM = b"".join(frame(p, seq) for seq, p in PACKETS)


def feed_all(splitter: PacketSplitter, chunks: list[bytes]) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    for chunk in chunks:
        out.extend(splitter.feed(chunk))
    return out


def test_whole() -> None:
    splitter = PacketSplitter()
    assert feed_all(splitter, [STREAM]) == PACKETS
    assert splitter.buffered == 0


def test_byte_at_a_time() -> None:
    splitter = PacketSplitter()
    assert feed_all(splitter, [STREAM[i : i + 1] for i in range(len(STREAM))]) == PACKETS
    assert splitter.buffered == 0


@given(st.lists(st.integers(0, len(STREAM)), max_size=20))
def test_random_splits(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(STREAM)]
    chunks = [STREAM[a:b] for a, b in itertools.pairwise(bounds)]
    splitter = PacketSplitter()
    assert feed_all(splitter, chunks) == PACKETS
    assert splitter.buffered == 0


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_other_buffers(kind: type) -> None:
    assert feed_all(PacketSplitter(), [kind(STREAM)]) == PACKETS


def test_partial_packet_stays_buffered() -> None:
    splitter = PacketSplitter()
    assert feed_all(splitter, [STREAM[:-2]]) == PACKETS[:-1]
    assert splitter.buffered == len(frame(PACKETS[-1][1], 3)) - 2
    assert feed_all(splitter, [STREAM[-2:]]) == PACKETS[-1:]


def test_stopping_early_leaves_the_rest_for_take_rest() -> None:
    """The login stops reading at its last packet; what follows is the command phase's."""
    splitter = PacketSplitter()
    got = []
    for packet in splitter.feed(STREAM + b"\x05\x00"):
        got.append(packet)
        if len(got) == 2:
            break
    assert got == PACKETS[:2]
    assert splitter.take_rest() == frame(PACKETS[2][1], 2) + frame(PACKETS[3][1], 3) + b"\x05\x00"
    assert splitter.buffered == 0


def test_keep_buffers_without_reading() -> None:
    splitter = PacketSplitter()
    splitter.keep(STREAM[:10])
    assert splitter.buffered == 10
    assert feed_all(splitter, [STREAM[10:]]) == PACKETS


def test_limit_refuses_large_announced_length() -> None:
    splitter = PacketSplitter(limit=1000, origin=Origin.BACKEND)
    with pytest.raises(ProtocolError) as info:
        feed_all(splitter, [b"\xe9\x03\x00\x00"])  # announces 1001 bytes, none sent yet
    assert info.value.origin is Origin.BACKEND
    assert feed_all(PacketSplitter(limit=1000), [frame(b"y" * 1000, 0)]) == [(0, b"y" * 1000)]


def test_16mib_packets_are_yielded_as_they_come() -> None:
    payload = b"a" * MAX_PAYLOAD + b"tail"
    data = frame(payload, 0) + frame(b"\x0e", 0)
    splitter = PacketSplitter()
    seen = []
    for i in range(0, len(data), 1 << 20):
        for seq, part in splitter.feed(data[i : i + (1 << 20)]):
            seen.append((seq, len(part), splitter.continued))
    # `continued` says the packet being handled continues a full one.
    assert seen == [(0, MAX_PAYLOAD, False), (1, 4, True), (0, 1, False)]
