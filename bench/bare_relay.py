"""The least a Python relay on uvloop can do: forward bytes both ways and read none of them.

A yardstick for bench/sysbench.py --bare-relay, not a proxy: no login handling, no packet
reading, no metrics, no TLS. Each client connection gets one backend connection, opened before
the client's first byte is read. Measured beside the proxy and HAProxy in one interleaved run,
proxy/bare_relay says what the proxy's own reading of the protocol costs, and
bare_relay/haproxy what Python and uvloop cost per query before any of it.

    .venv/bin/python bench/bare_relay.py LISTEN_PORT BACKEND_HOST BACKEND_PORT
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import cast

import uvloop


class _Backend(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Client(asyncio.Protocol):
    def __init__(self, backend: tuple[str, int]) -> None:
        self.backend_addr = backend
        self.backend: asyncio.Transport | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        self.transport = transport
        transport.pause_reading()  # until the backend connection is there
        asyncio.get_running_loop().create_task(self._connect(transport))

    async def _connect(self, transport: asyncio.Transport) -> None:
        try:
            backend, _ = await asyncio.get_running_loop().create_connection(
                lambda: _Backend(transport), *self.backend_addr)
        except OSError:
            transport.close()
            return
        backend.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.backend = backend
        if transport.is_closing():
            backend.close()
        else:
            transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        assert self.backend is not None
        self.backend.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.backend is not None:
            self.backend.close()


async def _serve(port: int, backend: tuple[str, int]) -> None:
    server = await asyncio.get_running_loop().create_server(
        lambda: _Client(backend), "127.0.0.1", port)
    await server.serve_forever()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    uvloop.run(_serve(int(argv[0]), (argv[1], int(argv[2]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
