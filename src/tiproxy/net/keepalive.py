"""TCP keep-alive on the proxy's sockets, from TiProxy's keep-alive objects.

`[proxy] frontend-keepalive` applies to client connections; `backend-healthy-keepalive` to
backend connections while their backend is healthy and `backend-unhealthy-keepalive` (shorter
by default, to notice a dead backend sooner) while it is not: the maintenance loop switches a
session's backend socket when its backend's health changes. Each object: `enabled` turns
SO_KEEPALIVE on; `idle`, `intvl` and `cnt` (TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT) are set
when above 0, else the kernel's defaults stay; `timeout` is TCP_USER_TIMEOUT, how long sent
data may stay unacknowledged before the kernel gives up on the connection.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from pathlib import Path

from tiproxy.config.model import KeepAliveConfig

try:
    from tiproxy.net import _hotpath
except ImportError:  # pragma: no cover - built by setup.py; the Python path does the same
    _hotpath = None  # type: ignore[assignment]

log = logging.getLogger("tiproxy.net")


def apply_keepalive(transport: asyncio.BaseTransport | None, cfg: KeepAliveConfig) -> None:
    """On a connection's socket (a backend connection's, once per login or health change)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or (fd := sock.fileno()) < 0:
        return
    try:
        if _hotpath is not None:
            _hotpath.setsockopts(fd, _options(cfg))
            return
        # uvloop's socket object makes a socket.socket for each setsockopt, and each of those
        # asks the kernel for the address (getsockname): one wrapper told its kind does all.
        own = socket.socket(sock.family, sock.type, sock.proto, fd)
        try:
            for level, name, value in _options(cfg):
                own.setsockopt(level, name, value)
        finally:
            own.detach()  # the descriptor stays the transport's
    except OSError as e:  # a socket closing under us: nothing to keep alive
        log.debug("keep-alive not set: %s", e)


def apply_keepalive_socket(sock: socket.socket, cfg: KeepAliveConfig) -> None:
    """On a listening socket, for the connections it accepts from then on (Linux copies these
    options to each accepted socket)."""
    try:
        for level, name, value in _options(cfg):
            sock.setsockopt(level, name, value)
    except OSError as e:
        log.debug("keep-alive not set: %s", e)


@functools.lru_cache(maxsize=16)
def _options(cfg: KeepAliveConfig) -> tuple[tuple[int, int, int], ...]:
    """(level, option, value) for each option `cfg` sets, worked out once per config object. A
    value of 0 sets the kernel's default explicitly, so a reload back to 0 undoes what an
    earlier value set on the listening socket."""
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(cfg.enabled))]
    if cfg.enabled:
        for option, value in ((socket.TCP_KEEPIDLE, cfg.idle),
                              (socket.TCP_KEEPINTVL, cfg.intvl),
                              (socket.TCP_KEEPCNT, cfg.cnt)):
            chosen = max(1, int(value)) if value > 0 else _kernel_default(option)
            if chosen:
                options.append((socket.IPPROTO_TCP, option, chosen))
    options.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                    int(cfg.timeout * 1000) if cfg.timeout > 0 else 0))  # 0: the default
    return tuple(options)


_SYSCTL = {socket.TCP_KEEPIDLE: "tcp_keepalive_time", socket.TCP_KEEPINTVL: "tcp_keepalive_intvl",
           socket.TCP_KEEPCNT: "tcp_keepalive_probes"}


@functools.cache
def _kernel_default(option: int) -> int:
    """The kernel's value for a keep-alive option (net.ipv4.*); 0 where it cannot be read."""
    try:
        return int(Path("/proc/sys/net/ipv4", _SYSCTL[option]).read_text())
    except (OSError, ValueError):
        return 0
