"""`[proxy.frontend-keepalive]`: a client that vanishes without a word (its host lost power, a
firewall began dropping its packets) is noticed by TCP keep-alive, and its session and backend
connection are closed, instead of holding a slot and a backend thread forever.

The client is real and remote: a process in a network namespace behind a veth pair. Taking the
namespace's end of the pair down drops every packet between the two, as a dead host would. Two
proxies see the same client vanish: the one with a short keep-alive closes the session within
seconds; the one with keep-alive off still holds its session afterwards, which is what shows
that keep-alive, and nothing else, did it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.netns import VethNamespace, veth_namespace
from support.proxy import ProxyFactory, ProxyProcess
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

NS = VethNamespace("tiproxy-katest", "tpxka0", "tpxka1", "10.199.39.1", "10.199.39.2")

# Run inside the namespace: log in, print the session's id, then sit idle until killed.
_IDLE_CLIENT = """
import sys, time, pymysql
conn = pymysql.connect(host=sys.argv[1], port=int(sys.argv[2]), user="app",
                       password="app-pass", database="test", connect_timeout=10)
print(conn.thread_id(), flush=True)
time.sleep(600)
"""

_SHORT = ('\n[proxy.frontend-keepalive]\nenabled = true\nidle = "1s"\nintvl = "1s"\n'
          'cnt = 2\n')
_OFF = "\n[proxy.frontend-keepalive]\nenabled = false\n"


@pytest.fixture
def netns() -> Iterator[VethNamespace]:
    with veth_namespace(NS) as ns:
        yield ns


def _idle_client(ns: VethNamespace, proxy: ProxyProcess) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        ns.exec_argv(sys.executable, "-c", _IDLE_CLIENT, ns.root_ip, str(proxy.port)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip().isdigit(), proc.stderr.read() if proc.poll() is not None else line
    return proc, int(line)


def _backend_threads(backend: MariaDBServer) -> int:
    return int(backend.sql("SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                           "WHERE USER = 'app'").strip())


def test_a_vanished_client_is_noticed_by_keepalive(
        netns: VethNamespace, backends: list[MariaDBServer],
        proxy_factory: ProxyFactory) -> None:
    backend = backends[0]
    short = proxy_factory([backend.addr], _SHORT, sql_host="0.0.0.0")
    off = proxy_factory([backend.addr], _OFF, sql_host="0.0.0.0")
    clients = [_idle_client(netns, short), _idle_client(netns, off)]
    try:
        for proxy, (_, conn_id) in zip((short, off), clients, strict=True):
            assert proxy.session(conn_id)["client"].startswith(f"{netns.ns_ip}:")
        before = _backend_threads(backend)
        subprocess.run(["ip", "-n", netns.name, "link", "set", netns.ns_if, "down"],
                       check=True, timeout=30)
        # idle 1 s + 2 probes 1 s apart: about 3 s; the deadline allows a loaded machine.
        deadline = time.monotonic() + 30
        while short.sessions():
            assert time.monotonic() < deadline, short.sessions()
            time.sleep(0.2)
        assert "timed out" in short.log(), short.log()[-2000:]
        while _backend_threads(backend) > before - 1:  # its backend thread went with it
            assert time.monotonic() < deadline, backend.sql("SHOW PROCESSLIST")
            time.sleep(0.2)
        # The same silence, without keep-alive: the session is still held.
        assert [s["id"] for s in off.sessions()] == [clients[1][1]]
    finally:
        for proc, _ in clients:
            proc.kill()
            proc.wait()


# What the proxy's sockets must carry: the client's (inherited from the listening socket) and
# the backend's, each from its own section, checked on the sockets themselves.
_SET = ('\n[proxy.frontend-keepalive]\nenabled = true\nidle = "33s"\nintvl = "4s"\ncnt = 6\n'
        'timeout = "11s"\n'
        '[proxy.backend-healthy-keepalive]\nenabled = true\nidle = "42s"\nintvl = "7s"\n'
        'cnt = 3\ntimeout = "9s"\n')
_SYS_PIDFD_GETFD = 438


def _tree(pid: int) -> list[int]:
    pids, pending = [], [pid]
    while pending:
        pid = pending.pop()
        pids.append(pid)
        with contextlib.suppress(OSError):
            pending += map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    return pids


def _socket_inode(local_port: int, remote_port: int) -> int:
    """The inode of the established IPv4 TCP socket with these ports (/proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], int(fields[9])
        if int(local.split(":")[1], 16) == local_port \
                and int(remote.split(":")[1], 16) == remote_port:
            return inode
    raise AssertionError(f"no TCP socket {local_port} -> {remote_port}")


def _proxy_socket(proxy: ProxyProcess, inode: int) -> socket.socket:
    """A copy of the proxy's descriptor for that socket (pidfd_getfd), in this process."""
    libc = ctypes.CDLL(None, use_errno=True)
    for pid in _tree(proxy.proc.pid):
        for fd_link in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd_link) == f"socket:[{inode}]":
                    pidfd = os.pidfd_open(pid)
                    try:
                        fd = libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(fd_link.name), 0)
                    finally:
                        os.close(pidfd)
                    assert fd >= 0, os.strerror(ctypes.get_errno())
                    return socket.socket(fileno=fd)
    raise AssertionError(f"socket {inode} is not the proxy's")


def _keepalive(sock: socket.socket) -> tuple[int, int, int, int, int]:
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))


def test_both_legs_carry_the_configured_keepalive(
        backends: list[MariaDBServer], proxy_factory: ProxyFactory) -> None:
    backend = backends[0]
    proxy = proxy_factory([backend.addr], _SET)
    conn = proxy.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT CONNECTION_ID()")
        client_port = conn._sock.getsockname()[1]  # type: ignore[attr-defined]
        client_side = _proxy_socket(proxy, _socket_inode(proxy.port, client_port))
        with client_side:
            assert _keepalive(client_side) == (1, 33, 4, 6, 11000)
        # The backend leg: the server names the proxy's end of it.
        hosts = backend.sql("SELECT HOST FROM information_schema.PROCESSLIST "
                            "WHERE USER = 'app'").split()
        assert len(hosts) == 1, hosts
        leg = _proxy_socket(proxy, _socket_inode(int(hosts[0].rsplit(":", 1)[1]), backend.port))
        with leg:
            assert _keepalive(leg) == (1, 42, 7, 3, 9000)
    finally:
        conn.close()
