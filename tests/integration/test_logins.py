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

from support.backends import (
    ADMIN_TOML,
    APP,
    BACKEND_ARGS,
    BACKEND_USERS,
    EDU,
    MariaDBFactory,
    connect,
)
from support.proxy import ProxyFactory
from tiproxy.net.login_phase import LOGIN_TIMEOUT
from tiproxy.playground.mariadb import MariaDBServer
from tiproxy.protocol.auth import native_password_scramble
from tiproxy.protocol.constants import Capability
from tiproxy.protocol.packets import (
    HandshakeResponse,
    build_handshake_response,
    frame,
    parse_auth_switch,
    parse_greeting,
)

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


def _old_client_login(port: int, user: str, password: str) -> tuple[int, bytes]:
    """Log in as a client from before pluggable authentication does (mysqljs): no
    CLIENT_PLUGIN_AUTH, a native scramble, an auth switch answered when one comes. The number
    of switches and the final answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        _, greeting = _read_packet(sock)
        caps = Capability.PROTOCOL_41 | Capability.SECURE_CONNECTION | Capability.LONG_PASSWORD
        response = HandshakeResponse(
            capabilities=caps, max_packet=1 << 24, charset=33, user=user.encode(),
            auth_data=native_password_scramble(password.encode(), parse_greeting(greeting).salt))
        sock.sendall(frame(build_handshake_response(response), 1))
        seq, answer = _read_packet(sock)
        switches = 0
        while answer[:1] == b"\xfe":
            switches += 1
            switch = parse_auth_switch(answer)
            assert switch.plugin == "mysql_native_password", switch
            sock.sendall(frame(native_password_scramble(password.encode(), switch.data[:20]),
                               seq + 1))
            seq, answer = _read_packet(sock)
        return switches, answer


def test_a_client_without_pluggable_authentication_logs_in(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory,
) -> None:
    """As directly: a native-password account logs in (the first login by the switch to the
    backend's salt, the next ones while clients log in with none), another plugin's account
    gets the server's own refusal, 1251."""
    proxy = proxy_factory([backends[0].addr], ADMIN_TOML)
    switches = []
    for _ in range(6):
        switched, answer = _old_client_login(proxy.port, APP.name, APP.password)
        assert answer[:1] == b"\x00", answer
        switches.append(switched)
    assert switches[0] == 1 and set(switches) == {0, 1}  # (each worker switches its first)
    direct = _old_client_login(backends[0].port, EDU.name, EDU.password)[1]
    through = _old_client_login(proxy.port, EDU.name, EDU.password)[1]
    assert direct[:3] == through[:3] == b"\xff\xe3\x04"  # 1251
    assert through == direct
    assert proxy.alive and proxy.sessions() == []


def test_tcp_checks_of_an_idle_proxy_open_no_backend_connection(
    mariadb_factory: MariaDBFactory, proxy_factory: ProxyFactory,
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


def _threads_connected(server: MariaDBServer) -> int:
    with connect(server) as conn, conn.cursor() as cur:
        cur.execute("SHOW GLOBAL STATUS LIKE 'Threads_connected'")
        return int(cur.fetchone()[1]) - 1  # not this one


def _raw_login(port: int, pause: float) -> list[int]:
    """Log in as APP with a hand-made client that waits `pause` seconds between the greeting and
    its answer; the sequence ids of the answers it got (auth switch, OK)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        _, greeting = _read_packet(sock)
        time.sleep(pause)
        caps = (Capability.PROTOCOL_41 | Capability.SECURE_CONNECTION | Capability.PLUGIN_AUTH
                | Capability.LONG_PASSWORD)
        response = HandshakeResponse(
            capabilities=caps, max_packet=1 << 24, charset=45, user=APP.name.encode(),
            auth_data=native_password_scramble(APP.password.encode(),
                                               parse_greeting(greeting).salt),
            auth_plugin="mysql_native_password")
        sock.sendall(frame(build_handshake_response(response), 1))
        seqs = []
        seq, answer = _read_packet(sock)
        seqs.append(seq)
        if answer[:1] == b"\xfe":
            switch = parse_auth_switch(answer)
            sock.sendall(frame(native_password_scramble(APP.password.encode(),
                                                        switch.data[:20]), seq + 1))
            seq, answer = _read_packet(sock)
            seqs.append(seq)
        assert answer[:1] == b"\x00", answer
        return seqs


def _read_packet(sock: socket.socket) -> tuple[int, bytes]:
    header = b""
    while len(header) < 4:
        header += sock.recv(4 - len(header))
    length = int.from_bytes(header[:3], "little")
    data = b""
    while len(data) < length:
        chunk = sock.recv(length - len(data))
        assert chunk, "closed"
        data += chunk
    return header[3], data


def test_an_early_backend_that_hung_up_is_replaced(
    mariadb_factory: MariaDBFactory, proxy_factory: ProxyFactory,
) -> None:
    """The backend closes the early connection (its connect_timeout) while the client takes its
    time to answer the greeting: the login goes on over a new connection, at once."""
    server = mariadb_factory((*BACKEND_ARGS, "--connect-timeout=2"), BACKEND_USERS)
    proxy = proxy_factory([server.addr])
    assert _raw_login(proxy.port, 0) in ([2], [2, 4])  # whichever greeting, it logs in
    started = time.monotonic()
    assert _raw_login(proxy.port, 3) == [2, 4]  # the early salt is gone: an auth switch
    assert time.monotonic() - started < 10  # not the 30 s login timeout
    assert proxy.alive


def test_clients_that_hang_up_before_answering_leave_no_backend_connection(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory,
) -> None:
    proxy = proxy_factory([backends[0].addr])
    proxy.connect().close()  # clients are logging in: new ones get an early backend
    baseline = _threads_connected(backends[0])
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", proxy.port)):
            time.sleep(0.01)
    deadline = time.monotonic() + 3
    while _threads_connected(backends[0]) > baseline:
        assert time.monotonic() < deadline, "backend connections left behind"
        time.sleep(0.1)
    with proxy.connect() as conn, conn.cursor() as cur:  # and logins still work
        cur.execute("SELECT 1")


def test_a_client_that_stalls_in_its_login_is_cut_off(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory,
) -> None:
    """LOGIN_TIMEOUT after it connected, a client still logging in is cut off (one that never
    answers the greeting, one that sent half its answer); the others go on."""
    proxy = proxy_factory([backends[0].addr])
    started = time.monotonic()
    silent = socket.create_connection(("127.0.0.1", proxy.port), timeout=LOGIN_TIMEOUT + 10)
    halfway = socket.create_connection(("127.0.0.1", proxy.port), timeout=LOGIN_TIMEOUT + 10)
    try:
        for sock in (silent, halfway):
            assert sock.recv(4096)  # the greeting
        halfway.sendall(b"\x40\x00\x00\x01\x8d\xa2")  # the start of a handshake response
        with proxy.connect() as conn, conn.cursor() as cur:  # logins go on meanwhile
            cur.execute("SELECT 1")
            assert cur.fetchall() == ((1,),)
            for sock in (silent, halfway):
                assert sock.recv(4096) == b""  # cut off: the end of the stream
            assert time.monotonic() - started >= LOGIN_TIMEOUT - 0.5
            cur.execute("SELECT 2")  # a session logged in long ago is not
            assert cur.fetchall() == ((2,),)
    finally:
        silent.close()
        halfway.close()
    assert proxy.log().count(f"login not finished within {LOGIN_TIMEOUT:.0f}s") == 2
