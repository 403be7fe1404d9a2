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

import subprocess
import sys
import time
from collections.abc import Iterator

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
