"""The compressed protocol (CLIENT_COMPRESS, zlib): frames around the plain packet stream.

Reference: https://dev.mysql.com/doc/dev/mysql-server/latest/page_protocol_basic_compression.html
A frame is a 7-byte header (3 bytes compressed length, 1 byte sequence id, 3 bytes length before
compression, 0 when the payload is stored as is) and the payload. Frames carry the plain packet
stream in pieces of any size: a frame may hold several packets or part of one. The compressed
sequence id restarts at 0 with each command, like the packet sequence id.
"""

from __future__ import annotations

import struct
import zlib

from tiproxy.protocol.codec import Buffer
from tiproxy.protocol.constants import MAX_PAYLOAD
from tiproxy.protocol.errors import ProtocolError

_U32 = struct.Struct("<I")
FRAME_HEADER = 7
MIN_COMPRESS_LENGTH = 50  # below this the payload goes out as is, as the server does
COMPRESS_LEVEL = 1  # speed over ratio: the proxy spends its CPU on every byte it sends


class Decompressor:
    """Turns compressed frames into the plain packet stream."""

    __slots__ = ("_buf", "last_seq")

    def __init__(self) -> None:
        # Unfinished frame. Bounded: a frame's payload is at most 16 MiB by its 3-byte length.
        self._buf = bytearray()
        self.last_seq = -1

    @property
    def buffered(self) -> bool:
        """Part of a frame is waiting for the rest."""
        return bool(self._buf)

    def feed(self, data: Buffer) -> bytes:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        n = len(buf)
        while pos + FRAME_HEADER <= n:
            header = _U32.unpack_from(buf, pos)[0]
            clen = header & 0xFFFFFF
            self_seq = header >> 24
            ulen = buf[pos + 4] | buf[pos + 5] << 8 | buf[pos + 6] << 16
            end = pos + FRAME_HEADER + clen
            if end > n:
                break
            payload = bytes(buf[pos + FRAME_HEADER : end])
            if ulen == 0:
                out.append(payload)
            else:
                out.append(_inflate(payload, ulen))
            self.last_seq = self_seq
            pos = end
        del buf[:pos]
        return b"".join(out)


def _inflate(payload: bytes, ulen: int) -> bytes:
    # The declared length bounds the output: a small frame cannot inflate into gigabytes.
    # The stream must also end there: a truncated stream, or one with more in it (output still
    # held inside zlib, or bytes after its end), does not match the frame.
    d = zlib.decompressobj()
    try:
        data = d.decompress(payload, ulen)
        if not d.eof and len(data) == ulen and d.decompress(d.unconsumed_tail, 1):
            raise ProtocolError("compressed frame inflates past its declared length")
    except zlib.error as e:
        raise ProtocolError(f"bad compressed frame: {e}") from None
    if len(data) != ulen or not d.eof or d.unconsumed_tail or d.unused_data:
        raise ProtocolError("compressed frame does not match its declared length")
    return data


def compress_frames(data: Buffer, seq: int) -> tuple[list[bytes], int]:
    """Wrap plain bytes in frames starting at sequence id `seq`; returns frames and next seq."""
    frames: list[bytes] = []
    pos = 0
    n = len(data)
    while pos < n or not frames:
        piece = bytes(data[pos : pos + MAX_PAYLOAD])
        pos += len(piece)
        if len(piece) >= MIN_COMPRESS_LENGTH:
            packed = zlib.compress(piece, COMPRESS_LEVEL)
            if len(packed) < len(piece):
                frames.append(_frame_header(len(packed), seq, len(piece)) + packed)
                seq = (seq + 1) & 0xFF
                continue
        frames.append(_frame_header(len(piece), seq, 0) + piece)
        seq = (seq + 1) & 0xFF
        if n == 0:
            break
    return frames, seq


def _frame_header(clen: int, seq: int, ulen: int) -> bytes:
    return _U32.pack(clen | seq << 24) + _U32.pack(ulen)[:3]
