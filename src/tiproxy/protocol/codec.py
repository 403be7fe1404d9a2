"""Integers and strings as the protocol encodes them, read from and written to byte buffers.

Reference: https://dev.mysql.com/doc/dev/mysql-server/latest/page_protocol_basic_dt_integers.html
Every reader takes (buffer, offset) and returns (value, new offset); a read past the end raises
ProtocolError, never IndexError or struct.error.
"""

from __future__ import annotations

import struct

from tiproxy.protocol.errors import ProtocolError

U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")

Buffer = bytes | bytearray | memoryview


def _need(buf: Buffer, pos: int, size: int, what: str) -> None:
    if pos + size > len(buf):
        have = len(buf) - pos
        raise ProtocolError(f"truncated {what}: need {size} bytes at offset {pos}, have {have}")


def read_u8(buf: Buffer, pos: int) -> tuple[int, int]:
    _need(buf, pos, 1, "u8")
    return buf[pos], pos + 1


def read_u16(buf: Buffer, pos: int) -> tuple[int, int]:
    _need(buf, pos, 2, "u16")
    return U16.unpack_from(buf, pos)[0], pos + 2


def read_u24(buf: Buffer, pos: int) -> tuple[int, int]:
    _need(buf, pos, 3, "u24")
    return buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16, pos + 3


def read_u32(buf: Buffer, pos: int) -> tuple[int, int]:
    _need(buf, pos, 4, "u32")
    return U32.unpack_from(buf, pos)[0], pos + 4


def read_u64(buf: Buffer, pos: int) -> tuple[int, int]:
    _need(buf, pos, 8, "u64")
    return U64.unpack_from(buf, pos)[0], pos + 8


def read_lenenc_int(buf: Buffer, pos: int) -> tuple[int, int]:
    """A length-encoded integer. 0xFB (NULL) and 0xFF (ERR) are not integers here."""
    first, pos = read_u8(buf, pos)
    if first < 0xFB:
        return first, pos
    if first == 0xFC:
        return read_u16(buf, pos)
    if first == 0xFD:
        return read_u24(buf, pos)
    if first == 0xFE:
        return read_u64(buf, pos)
    raise ProtocolError(f"invalid length-encoded integer prefix 0x{first:02x}")


def read_bytes(buf: Buffer, pos: int, size: int) -> tuple[bytes, int]:
    _need(buf, pos, size, "string")
    return bytes(buf[pos : pos + size]), pos + size


def read_lenenc_bytes(buf: Buffer, pos: int) -> tuple[bytes, int]:
    size, pos = read_lenenc_int(buf, pos)
    return read_bytes(buf, pos, size)


def read_nul_bytes(buf: Buffer, pos: int) -> tuple[bytes, int]:
    """A string ended by a NUL byte (the NUL is consumed, not returned)."""
    end = bytes(buf[pos:]).find(b"\0") if isinstance(buf, memoryview) else buf.find(b"\0", pos)
    if end < 0:
        raise ProtocolError("string without its terminating NUL")
    if isinstance(buf, memoryview):
        end += pos
    return bytes(buf[pos:end]), end + 1


def read_eof_bytes(buf: Buffer, pos: int) -> tuple[bytes, int]:
    """The rest of the packet (empty at its end; past its end is a truncation like any other)."""
    _need(buf, pos, 0, "string")
    return bytes(buf[pos:]), len(buf)


def lenenc_int(value: int) -> bytes:
    if value < 0:
        raise ValueError("length-encoded integers are unsigned")
    if value < 0xFB:
        return bytes((value,))
    if value < 1 << 16:
        return b"\xfc" + U16.pack(value)
    if value < 1 << 24:
        return b"\xfd" + U32.pack(value)[:3]
    return b"\xfe" + U64.pack(value)


def lenenc_bytes(value: bytes) -> bytes:
    return lenenc_int(len(value)) + value


def u24(value: int) -> bytes:
    return U32.pack(value)[:3]
