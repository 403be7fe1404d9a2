"""Cuts a byte stream into whole packets, for the places that read every packet whole.

The hot path does not use this: it scans headers in place (see tracker.py). The connection phase
and the proxy's own commands to a backend do, since every packet there is small and parsed.
"""

from __future__ import annotations

from collections.abc import Generator

from tiproxy.protocol.codec import U32, Buffer
from tiproxy.protocol.constants import MAX_PAYLOAD
from tiproxy.protocol.errors import Origin, ProtocolError


class PacketSplitter:
    """Accumulates bytes and yields (sequence id, payload) for each whole packet.

    Logical packets of 16 MiB or more arrive as several packets; they are yielded as they come
    and `continued` tells the caller the previous one was full. The buffer holds at most one
    packet plus one chunk: `limit` bounds the payload size a peer may announce (the connection
    phase sets it low, so a client cannot make the proxy buffer megabytes before it logs in).
    """

    __slots__ = ("_buf", "continued", "limit", "origin")

    def __init__(self, limit: int = MAX_PAYLOAD, origin: Origin = Origin.CLIENT) -> None:
        self._buf = bytearray()
        self.limit = limit
        self.origin = origin
        self.continued = False

    def feed(self, data: Buffer) -> Generator[tuple[int, bytes], None, None]:
        buf = self._buf
        buf += data
        pos = 0
        n = len(buf)
        try:
            while pos + 4 <= n:
                header = U32.unpack_from(buf, pos)[0]
                length = header & 0xFFFFFF
                if length > self.limit:
                    raise ProtocolError(
                        f"packet of {length} bytes exceeds the limit of {self.limit}", self.origin
                    )
                end = pos + 4 + length
                if end > n:
                    break
                payload = bytes(buf[pos + 4 : end])
                pos = end
                yield header >> 24, payload
                self.continued = length == MAX_PAYLOAD
        finally:
            del buf[:pos]

    def keep(self, data: Buffer) -> None:
        """Buffer bytes without reading them yet."""
        self._buf += data

    def take_rest(self) -> bytes:
        """Whatever is buffered and not yet yielded (a partial packet)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    @property
    def buffered(self) -> int:
        return len(self._buf)
