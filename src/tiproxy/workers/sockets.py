"""How many workers a proxy runs, and the listening sockets they share.

`[proxy] workers` left at 0 means one per CPU this process may use: its affinity, capped by a
cgroup v2 CPU quota (a container limited to 2.5 CPUs gets 3 workers, not one per host core).
Each listening address is bound once per worker, all in one SO_REUSEPORT group, so the kernel
spreads new connections over the workers' sockets; the control process keeps its copies open
so that a worker started again finds its queue as the last one left it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from tiproxy.balance.router import split_addr

if TYPE_CHECKING:
    from tiproxy.config import Config


def available_cpus() -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def worker_count(cfg: Config) -> int:
    return cfg.proxy.workers or available_cpus()


def bind_listeners(addr: str, count: int) -> list[list[socket.socket]]:
    """`count` listening sockets on `addr`, in one SO_REUSEPORT group (all interfaces for an
    empty host, as asyncio binds them): a list of sockets for each worker."""
    host, port = split_addr(addr, default_host="")
    infos = list(dict.fromkeys(
        (family, sockaddr[0]) for family, _, _, _, sockaddr in
        socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)))
    if port:
        for family, ip in infos:
            _must_be_free(family, str(ip), port)
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            for family, ip in infos:
                sock = socket.socket(family, socket.SOCK_STREAM)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((ip, port))
                port = port or sock.getsockname()[1]  # port 0: every socket on the first's
                sock.listen(1024)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    n = len(infos)
    return [socks[i * n:(i + 1) * n] for i in range(count)]


def _must_be_free(family: int, ip: str, port: int) -> None:
    """Raise EADDRINUSE if anything listens on (ip, port) already. SO_REUSEPORT would let the
    group join another process's (a second proxy started by mistake, run by the same user),
    and the kernel would split new connections between the two without a word; a socket
    bound without it is refused by any listener there. (An upgrade's new process takes the
    old one's sockets over a Unix socket and binds nothing.)"""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind((ip, port))
        except OSError as e:
            raise OSError(e.errno, f"cannot listen on {ip}:{port}: {e.strerror} "
                                   "(another process listens there)") from e
