"""PROXY protocol version 2: the header a load balancer puts before a connection's first byte to
say which client the connection is for, read from clients and written to backends.

Layout (https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt, section 2.2): a 12-byte
signature, a version-and-command byte (0x20 LOCAL: the sender's own connection, keep the socket's
addresses; 0x21 PROXY), an address-family-and-transport byte (0x11 TCP over IPv4, 0x21 TCP over
IPv6; 0x00 unspecified), a big-endian length, then the addresses (source address, destination
address, source port, destination port) and optional TLVs, which are skipped.

MySQL's server speaks first, but a sender writes the header as soon as it connects: the proxy
reads it from the start of whatever the client sends, before or after the greeting, as TiProxy
and MariaDB do. The header is optional there (a client that sends none keeps its socket's
address); a handshake response can never be taken for one (its sequence id is 1, the
signature's fourth byte is 0x0A).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from tiproxy.protocol.errors import Origin, ProtocolError

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_FIXED = 16  # signature, version/command, family, length
# Addresses take at most 216 bytes (AF_UNIX); TLVs (TLS details, a cloud's connection id) come
# on top. A longer header is refused: it is not what a load balancer sends.
MAX_LENGTH = 1024
_V4 = struct.Struct("!4s4sHH")
_V6 = struct.Struct("!16s16sHH")
_LENGTH = struct.Struct("!H")


@dataclass(frozen=True)
class ProxyHeader:
    """What a header said; addresses are None for LOCAL or an unspecified family."""

    source: tuple[str, int] | None
    destination: tuple[str, int] | None


def parse(data: bytes) -> tuple[ProxyHeader | None, int] | None:
    """The header at the start of `data` and its length in bytes; (None, 0) when `data` does
    not start with one; None when more bytes are needed to tell. Raises ProtocolError for a
    header that is malformed."""
    start = data[:len(SIGNATURE)]
    if not SIGNATURE.startswith(start):
        return None, 0
    if len(data) < _FIXED:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2 or command > 1:
        raise ProtocolError(f"PROXY header of version {version}, command {command}",
                            Origin.CLIENT)
    length = _LENGTH.unpack_from(data, 14)[0]
    if length > MAX_LENGTH:
        raise ProtocolError(f"PROXY header of {length} bytes", Origin.CLIENT)
    end = _FIXED + length
    if len(data) < end:
        return None
    family = data[13]
    if command == 0 or family >> 4 == 0 or family >> 4 == 3:  # LOCAL, unspecified, AF_UNIX
        return ProxyHeader(None, None), end
    layout = {1: _V4, 2: _V6}.get(family >> 4)
    if layout is None or family & 0x0F not in (1, 2):
        raise ProtocolError(f"PROXY header with address family 0x{family:02x}", Origin.CLIENT)
    if length < layout.size:
        raise ProtocolError("PROXY header shorter than its addresses", Origin.CLIENT)
    src, dst, sport, dport = layout.unpack_from(data, _FIXED)
    return ProxyHeader((str(ipaddress.ip_address(src)), sport),
                       (str(ipaddress.ip_address(dst)), dport)), end


def build(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY (TCP) header for a connection from `source` to `destination`; both must be of
    one IP family (an IPv4 address facing an IPv6 one is written as IPv4-mapped)."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        src, dst = _as_v6(src), _as_v6(dst)
    if src.version == 4:
        body = _V4.pack(src.packed, dst.packed, source[1], destination[1])
        family = 0x11
    else:
        body = _V6.pack(src.packed, dst.packed, source[1], destination[1])
        family = 0x21
    return SIGNATURE + bytes((0x21, family)) + _LENGTH.pack(len(body)) + body


def _as_v6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if address.version == 6:
        return address
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + address.packed)
