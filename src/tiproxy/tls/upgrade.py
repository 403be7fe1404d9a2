"""Upgrading a live client transport to TLS, without losing bytes read before the upgrade.

A MySQL client sends its SSLRequest and, without waiting for an answer, the first record of its
TLS handshake. Both may arrive in one read, so the relay can hold the start of the handshake when
it decides to upgrade; `loop.start_tls` has no way to take such bytes. Those bytes belong to
the TLS stream and only there (never read them as plaintext MySQL: that is how STARTTLS
injection attacks work), so they are handed to the TLS protocol that `start_tls` installs, as if
the socket had just delivered them, before the socket delivers anything newer.

How: `start_tls` swaps the transport's protocol for its TLS protocol and schedules that
protocol's `connection_made` and the transport's `resume_reading` with `call_soon`, all before
its first await (asyncio and uvloop alike). A callback scheduled after that swap therefore runs
after `connection_made` and before the loop polls the socket again; it feeds the held bytes
through the TLS protocol's buffered-protocol interface (`get_buffer` / `buffer_updated`), the
interface transports themselves use.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any


async def start_server_tls(raw: asyncio.Transport, ctx: ssl.SSLContext, early: bytes,
                           timeout: float) -> asyncio.Transport:
    """The TLS transport over `raw` once the handshake is done; `early` are bytes of the
    client's handshake already read. Raises OSError, ssl.SSLError or TimeoutError."""
    loop = asyncio.get_running_loop()
    app_protocol = raw.get_protocol()
    upgrade = loop.create_task(loop.start_tls(raw, app_protocol, ctx, server_side=True,
                                              ssl_handshake_timeout=timeout))
    if early:
        loop.call_soon(_when_swapped, loop, raw, app_protocol, early, upgrade)
    try:
        tls = await upgrade
    except asyncio.CancelledError:
        raw.abort()
        raise
    if tls is None:
        raise ConnectionError("the client closed the connection during the TLS handshake")
    return tls


def _when_swapped(loop: asyncio.AbstractEventLoop, raw: asyncio.Transport,
                  app_protocol: asyncio.BaseProtocol, early: bytes,
                  upgrade: asyncio.Task[Any]) -> None:
    if raw.is_closing() or upgrade.done():
        return  # closed, or start_tls failed before it swapped the protocol
    if raw.get_protocol() is app_protocol:  # start_tls has not run its first step yet
        loop.call_soon(_when_swapped, loop, raw, app_protocol, early, upgrade)
        return
    loop.call_soon(_feed, raw.get_protocol(), early)  # after the TLS protocol's connection_made


def _feed(protocol: Any, data: bytes) -> None:
    # Duck-typed: uvloop's TLS protocol has get_buffer/buffer_updated (and no data_received)
    # but is not registered as an asyncio.BufferedProtocol.
    if not hasattr(protocol, "get_buffer"):
        protocol.data_received(data)
        return
    view = memoryview(data)
    while view:
        buf = memoryview(protocol.get_buffer(len(view)))
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        protocol.buffer_updated(n)
        view = view[n:]
