"""The least a Python relay on uvloop can do: forward bytes both ways and read none of them.

A yardstick for bench/sysbench.py --bare-relay, not a proxy: no login handling, no packet
reading, no metrics, no TLS. Each client connection gets one backend connection, opened before
the client's first byte is read. Measured beside the proxy and HAProxy in one interleaved run,
proxy/bare_relay says what the proxy's own reading of the protocol costs, and
bare_relay/haproxy what Python and uvloop cost per query before any of it.

With --epoll, established pairs are relayed by C instead (bench/epoll_relay.c, compiled at
start into a temporary directory): an epoll set of its own that the loop watches as one
descriptor, so a chunk costs one recv and one send and no transport, bytes object or Python
call of its own. It says what a relay that leaves uvloop's streams for its steady state could
reach from Python.

    .venv/bin/python bench/bare_relay.py [--epoll] LISTEN_PORT BACKEND_HOST BACKEND_PORT
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any, cast

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


def _epoll_relay() -> Any:
    """bench/epoll_relay.c, compiled and loaded (the build is removed once loaded)."""
    source = Path(__file__).with_name("epoll_relay.c")
    with tempfile.TemporaryDirectory(prefix="epoll-relay-") as tmp:
        built = Path(tmp) / f"epoll_relay{sysconfig.get_config_var('EXT_SUFFIX')}"
        subprocess.run(["cc", "-O2", "-fPIC", "-shared", f"-I{sysconfig.get_paths()['include']}",
                        str(source), "-o", str(built)], check=True)
        spec = importlib.util.spec_from_file_location("epoll_relay", built)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module.Relay()


async def _serve_epoll(port: int, backend: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    relay = _epoll_relay()
    loop.add_reader(relay.fileno(), relay.run)
    listener = socket.create_server(("127.0.0.1", port), backlog=1024)
    listener.setblocking(False)
    tasks: set[asyncio.Task[None]] = set()

    async def pair(client: socket.socket) -> None:
        with client, socket.socket() as server:
            server.setblocking(False)
            try:
                await loop.sock_connect(server, backend)
            except OSError:
                return
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.setblocking(False)
            relay.add(client.detach(), server.detach())  # the relay closes them

    while True:
        client, _ = await loop.sock_accept(listener)
        task = loop.create_task(pair(client))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def main(argv: list[str]) -> int:
    epoll = argv[:1] == ["--epoll"]
    args = argv[1:] if epoll else argv
    if len(args) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    serve = _serve_epoll if epoll else _serve
    uvloop.run(serve(int(args[0]), (args[1], int(args[2]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
