"""Logins through the proxy: what a client sees of them, and what they cost the backends.

While clients are logging in, the proxy connects to a backend before it greets the next client
and greets it with that backend's salt: the client's answer is valid for the backend as it is,
so the login takes no authentication switch (the same exchange as directly). The first login
after a quiet spell, and a connection that is only a TCP check, never open a backend connection
early.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import MySQLdb
import pymysql
import pytest

from support.backends import ADMIN_TOML, APP, BACKEND_ARGS, BACKEND_USERS, EDU, connect
from support.proxy import ProxyFactory
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration


@contextmanager
def auth_switches() -> Iterator[list[str]]:
    """The authentication switches PyMySQL is asked for while logging in."""
    seen: list[str] = []
    original = pymysql.connections.Connection._process_auth

    def process(self: Any, plugin_name: bytes, *args: Any) -> Any:
        seen.append(plugin_name.decode())
        return original(self, plugin_name, *args)

    pymysql.connections.Connection._process_auth = process  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        pymysql.connections.Connection._process_auth = original  # type: ignore[method-assign]


def _aborted_connects(server: MariaDBServer) -> int:
    with connect(server) as conn, conn.cursor() as cur:
        cur.execute("SHOW GLOBAL STATUS LIKE 'Aborted_connects'")
        return int(cur.fetchone()[1])


def test_a_login_while_clients_log_in_needs_no_authentication_switch(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory,
) -> None:
    proxy = proxy_factory([backends[0].addr], ADMIN_TOML)
    with auth_switches() as direct:
        connect(backends[0]).close()
    assert direct == []  # the server's greeting named the user's plugin: no switch
    with auth_switches() as first:
        proxy.connect().close()
    assert first == ["mysql_native_password"]  # a greeting of the proxy's own: one switch
    for _ in range(3):
        with auth_switches() as next_ones, proxy.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT CURRENT_USER()")
            assert cur.fetchone() == (f"{APP.name}@%",)
        assert next_ones == []
    # The credential is recovered from that exchange as well: the session can move.
    with proxy.connect() as conn:
        assert "no reusable credential" not in proxy.session(conn.thread_id())["waiting"]
    # A user of another plugin: the backend asks for it, the proxy relays the switch.
    with auth_switches() as ed, pymysql.connect(host="127.0.0.1", port=proxy.port,
                                                user=EDU.name, password=EDU.password) as conn:
        assert ed == ["client_ed25519"]
        assert conn.open
    # And a wrong password is refused the same way.
    with pytest.raises(pymysql.err.OperationalError) as info:
        pymysql.connect(host="127.0.0.1", port=proxy.port, user=APP.name, password="wrong")
    assert info.value.args[0] == 1045
    # mysqlclient (Connector/C) too.
    conn = MySQLdb.connect(host="127.0.0.1", port=proxy.port, user=APP.name,
                           password=APP.password, database="test")
    conn.close()


def test_tcp_checks_of_an_idle_proxy_open_no_backend_connection(
    mariadb_factory: Any, proxy_factory: ProxyFactory,
) -> None:
    server = mariadb_factory(BACKEND_ARGS, BACKEND_USERS)
    # Health checks off: without an account they read greetings too, every few seconds.
    proxy = proxy_factory([server.addr], "\n[health]\nenable = false")
    before = _aborted_connects(server)
    for i in range(10):  # what a load balancer's TCP check does, some reading the greeting
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            if i % 2:
                assert sock.recv(4)  # the proxy's greeting begins
    time.sleep(0.5)
    # One backend connection at most: the proxy learning what to greet with, once.
    assert _aborted_connects(server) - before <= 1
