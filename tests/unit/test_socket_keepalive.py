"""net/keepalive.py on a real TCP connection of the event loop: the compiled setsockopts and the
Python fallback set the same options, and a value of 0 restores the kernel's default."""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvloop

from tiproxy.config.model import KeepAliveConfig
from tiproxy.net import keepalive


def _options_after(cfg: KeepAliveConfig) -> tuple[int, ...]:
    async def run() -> tuple[int, ...]:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await asyncio.get_running_loop().create_connection(
            asyncio.Protocol, "127.0.0.1", port)
        try:
            keepalive.apply_keepalive(transport, cfg)
            sock = transport.get_extra_info("socket")
            return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))
        finally:
            transport.close()
            server.close()
            await server.wait_closed()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run())


@pytest.mark.parametrize("compiled", [True, False])
def test_keepalive_options_reach_the_socket(compiled: bool,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    if compiled:
        assert keepalive._hotpath is not None, "net/_hotpath.c is not built"
    else:
        monkeypatch.setattr(keepalive, "_hotpath", None)
    cfg = KeepAliveConfig(enabled=True, idle=42.0, cnt=3, intvl=7.0, timeout=9.0)
    assert _options_after(cfg) == (1, 42, 7, 3, 9000)
    defaults = KeepAliveConfig(enabled=True)  # idle, intvl, cnt: the kernel's own values
    expected = tuple(keepalive._kernel_default(o) for o in (
        socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT))
    assert _options_after(defaults) == (1, *expected, 0)
    assert _options_after(KeepAliveConfig(enabled=False))[0] == 0
