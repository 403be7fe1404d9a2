"""A detached backend leg's reads (client/leg.py) against a local listener that does what a
backend that hangs does: accepts and says nothing. The login gives up on such a backend after
the read's timeout and tries the next one, so the timeout must fire, and a packet that arrives
afterwards must wait for the next read rather than be lost or answer a read that ended."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

import pytest

from tiproxy.client.leg import BackendLeg


@contextlib.asynccontextmanager
async def _hanging_backend() -> AsyncIterator[tuple[BackendLeg, asyncio.Event]]:
    """A leg to a listener that says nothing until the event is set, then one packet
    (sequence 0, payload 0x0a)."""
    greet = asyncio.Event()
    accepted: list[asyncio.StreamWriter] = []

    async def serve(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await greet.wait()
        writer.write(b"\x01\x00\x00\x00\x0a")
        await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    leg = await BackendLeg.open("127.0.0.1", server.sockets[0].getsockname()[1], timeout=2.0)
    try:
        yield leg, greet
    finally:
        leg.abort()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


def test_a_backend_that_says_nothing_times_out_and_a_late_packet_waits() -> None:
    async def main() -> None:
        async with _hanging_backend() as (leg, greet):
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await leg.read_packet(timeout=0.2)
            assert 0.15 < time.monotonic() - started < 2.0
            greet.set()
            assert await leg.read_packet(timeout=2.0) == (0, b"\x0a")

    asyncio.run(main())


def test_a_read_that_is_cancelled_leaves_no_waiter_behind() -> None:
    async def main() -> None:
        async with _hanging_backend() as (leg, greet):
            read = asyncio.ensure_future(leg.read_packet(timeout=30.0))
            await asyncio.sleep(0.05)
            read.cancel()
            with pytest.raises(asyncio.CancelledError):
                await read
            greet.set()
            assert await leg.read_packet(timeout=2.0) == (0, b"\x0a")

    asyncio.run(main())


def test_a_connect_that_is_not_answered_in_time_raises_timeout() -> None:
    async def main() -> None:
        # A listener whose queue is full: a further SYN is dropped, so the connect hangs.
        full = socket.socket()
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = []
        try:
            for _ in range(8):  # enough to fill a backlog of 0 (the kernel allows one or two)
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
                fillers.append(filler)
            await asyncio.sleep(0.1)
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await BackendLeg.open("127.0.0.1", port, timeout=0.3)
            assert time.monotonic() - started < 3.0
        finally:
            for sock in (*fillers, full):
                sock.close()

    asyncio.run(main())
