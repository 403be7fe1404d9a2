"""`[proxy] proxy-protocol = "v2"`: the proxy reads the PROXY header a load balancer puts before
a client's bytes, and starts every backend connection with one naming the client, so that MariaDB
(with `proxy_protocol_networks` set to the proxy's address) sees the real client: in USER(), and
in which account the login matches.

The accounts exist only for the client addresses (`pp@'192.0.2.7'`, `pp@NS_IP`): a login whose
header the backend did not honour would come from 127.0.0.1 and be refused.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

from support.backends import APP, BACKEND_ARGS, MariaDBFactory
from support.netns import VethNamespace, veth_namespace
from support.proxy import ProxyFactory, ProxyProcess
from tiproxy.playground.mariadb import MariaDBServer
from tiproxy.protocol.proxyproto import SIGNATURE, build

pytestmark = pytest.mark.integration

CLAIMED = ("192.0.2.7", 4321)  # TEST-NET-1: an address that is nowhere, as a header names it
NS = VethNamespace("tiproxy-pptest", "tpxpp0", "tpxpp1", "10.199.38.1", "10.199.38.2")
PP_TOML = '\nproxy-protocol = "v2"'

# Run inside the namespace: log in through the proxy, print who the backend says we are.
_CLIENT = """
import json, sys, pymysql
host, port = sys.argv[1], int(sys.argv[2])
conn = pymysql.connect(host=host, port=port, user="pp", password="pp-pass", connect_timeout=10)
cur = conn.cursor()
cur.execute("SELECT USER(), CURRENT_USER(), @@port")
print(json.dumps(list(cur.fetchone())))
"""


@pytest.fixture(scope="module")
def pp_pair(mariadb_factory: MariaDBFactory) -> list[MariaDBServer]:
    servers = [mariadb_factory([*BACKEND_ARGS, "--proxy-protocol-networks=127.0.0.0/8"], (APP,))
               for _ in range(2)]
    for server in servers:
        server.sql(f"CREATE USER pp@'{CLAIMED[0]}' IDENTIFIED BY 'pp-pass';\n"
                   f"CREATE USER pp@'{NS.ns_ip}' IDENTIFIED BY 'pp-pass';\n"
                   f"GRANT SELECT ON test.* TO pp@'{CLAIMED[0]}';\n")
    return servers


@pytest.fixture
def pp_proxy(pp_pair: list[MariaDBServer], proxy_factory: ProxyFactory,
             tmp_path: Path) -> ProxyProcess:
    users = tmp_path / "users"  # so that sessions can move (a reusable credential)
    users.write_text(pp_pair[0].sql("SELECT User, authentication_string FROM mysql.user "
                                    "WHERE User IN ('pp', 'app')"))
    return proxy_factory([s.addr for s in pp_pair],
                         f'{PP_TOML}\n[security]\nusers-file = "{users}"',
                         sql_host="0.0.0.0")


def _with_header(proxy: ProxyProcess, header: bytes, **kwargs: Any) -> Any:
    """A PyMySQL login on a socket that first sends `header`, as a load balancer would."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(header)
    conn = pymysql.connect(host="127.0.0.1", port=proxy.port, defer_connect=True,
                           connect_timeout=10, **kwargs)
    conn.connect(sock)
    return conn


def test_the_headers_client_is_who_the_backend_sees(pp_proxy: ProxyProcess) -> None:
    conn = _with_header(pp_proxy, build(CLAIMED, ("127.0.0.1", pp_proxy.port)),
                        user="pp", password="pp-pass")
    with conn.cursor() as cur:
        cur.execute("SELECT USER(), CURRENT_USER()")
        assert cur.fetchone() == (f"pp@{CLAIMED[0]}", f"pp@{CLAIMED[0]}")
    session = pp_proxy.session(conn.thread_id())
    assert session["client"] == f"{CLAIMED[0]}:{CLAIMED[1]}"
    pp_proxy.wait_log(f"client {CLAIMED[0]}:{CLAIMED[1]}")
    # A move logs in to the other backend as the same client.
    pp_proxy.move(conn.thread_id())
    with conn.cursor() as cur:
        cur.execute("SELECT USER(), CURRENT_USER()")
        assert cur.fetchone() == (f"pp@{CLAIMED[0]}", f"pp@{CLAIMED[0]}")
    conn.close()


def test_without_a_header_or_with_local_the_socket_is_the_client(pp_proxy: ProxyProcess) -> None:
    """The header is optional (as in TiProxy); LOCAL (a balancer's own check) names nobody."""
    plain = pp_proxy.connect()
    local = _with_header(pp_proxy, SIGNATURE + b"\x20\x00\x00\x00", user=APP.name,
                         password=APP.password, database="test")
    for conn in (plain, local):
        with conn.cursor() as cur:
            cur.execute("SELECT USER()")
            assert cur.fetchone()[0] in (f"{APP.name}@localhost", f"{APP.name}@127.0.0.1")
        assert pp_proxy.session(conn.thread_id())["client"].startswith("127.0.0.1:")
        conn.close()


def test_a_malformed_header_closes_only_that_connection(pp_proxy: ProxyProcess) -> None:
    other = pp_proxy.connect()
    sock = socket.create_connection(("127.0.0.1", pp_proxy.port), timeout=10)
    sock.sendall(SIGNATURE + b"\x21\x51\x00\x00")  # address family 5
    data = b""
    while chunk := sock.recv(4096):  # the greeting, then the close
        data += chunk
    sock.close()
    pp_proxy.wait_log("PROXY header with address family 0x51")
    with other.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    other.close()


@pytest.fixture
def netns() -> Iterator[VethNamespace]:
    with veth_namespace(NS) as ns:
        yield ns


def test_a_real_peer_is_passed_on_to_the_backend(netns: VethNamespace,
                                                 pp_proxy: ProxyProcess) -> None:
    """A client on another host (the namespace) sends no header: the proxy's own header names
    it, and the backend takes the login as coming from there."""
    out = subprocess.run(
        netns.exec_argv(sys.executable, "-c", _CLIENT, netns.root_ip, str(pp_proxy.port)),
        capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    user, current, _ = json.loads(out.stdout)
    assert user == f"pp@{netns.ns_ip}" and current == f"pp@{netns.ns_ip}"
