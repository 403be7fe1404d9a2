"""A steady session's sockets are read straight by the compiled path (net/_direct.c), and come
back to the event loop's transports for everything else: a result over several reads, an
error, a statement that changes state, a move, a KILL, a client or a backend that goes away.
Whatever happens, the answers are right, the session's backend connection ends with it, and
the proxy goes on. The API's `direct` says which reader a session has now.

(test_compiled_path.py checks that answers and counts are the same with it and without it.)
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

import pymysql
import pytest

from support.backends import ADMIN_TOML, APP
from support.proxy import ProxyFactory, ProxyProcess
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

STEADY = 20  # plain queries in a row: more than the compiled path needs before it reads directly


@pytest.fixture
def dproxy(backends: list[MariaDBServer], proxy_factory: ProxyFactory) -> ProxyProcess:
    return proxy_factory([b.addr for b in backends], ADMIN_TOML)


def _steady(conn: Any, proxy: ProxyProcess, direct: bool = True) -> None:
    """Plain queries until the session is read directly (unless the proxy's reader is off)."""
    with conn.cursor() as cur:
        for i in range(STEADY):
            cur.execute("SELECT %s + 1", (i,))
            assert cur.fetchall() == ((i + 1,),)
    assert proxy.session(conn.thread_id())["direct"] is direct, proxy.session(conn.thread_id())


def _app_connections(backends: list[MariaDBServer]) -> int:
    return sum(int(b.sql("SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                         f"WHERE USER = '{APP.name}'").split()[-1]) for b in backends)


def _wait_app_connections(backends: list[MariaDBServer], count: int) -> None:
    """The backends' connections of the app user come down to `count` (or fewer: an earlier
    test's may still have been ending when it was counted): a session's backend connection must
    end with it (a descriptor left open would keep it up)."""
    deadline = time.monotonic() + 10
    while (now := _app_connections(backends)) > count:
        assert time.monotonic() < deadline, f"{now} backend connections, not {count}"
        time.sleep(0.05)


def test_a_steady_session_is_read_directly_until_something_else_comes(
        dproxy: ProxyProcess, backends: list[MariaDBServer]) -> None:
    before = _app_connections(backends)
    conn = dproxy.connect()
    sid = conn.thread_id()
    _steady(conn, dproxy)
    with conn.cursor() as cur:
        cur.execute("SELECT seq, REPEAT('x', 100) FROM seq_1_to_20000")  # several reads
        rows = cur.fetchall()
        assert len(rows) == 20000 and rows[-1] == (20000, "x" * 100)
        assert not dproxy.session(sid)["direct"]  # back with the transports
        with pytest.raises(pymysql.err.ProgrammingError):
            cur.execute("SELECT * FROM test.no_such_table")
        cur.execute("SET @kept = 'kept'")
        cur.execute("SELECT @kept")
        assert cur.fetchall() == (("kept",),)
    _steady(conn, dproxy)
    with conn.cursor() as cur:
        cur.execute("SELECT @kept")
        assert cur.fetchall() == (("kept",),)
    conn.close()
    dproxy.wait_sessions(0)
    _wait_app_connections(backends, before)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "transports"])
def test_a_client_that_resets_its_connection_while_read_directly(
        direct: bool, backends: list[MariaDBServer], proxy_factory: ProxyFactory) -> None:
    """The same end, and the same line in the log, as when the transports read the socket."""
    dproxy = proxy_factory([b.addr for b in backends], ADMIN_TOML,
                           env={} if direct else {"TIPROXY_DIRECT_RELAY": "0"})
    before = _app_connections(backends)
    other = dproxy.connect()
    doomed = dproxy.connect()
    _steady(other, dproxy, direct)
    _steady(doomed, dproxy, direct)
    doomed_id = doomed.thread_id()
    sock = doomed._sock  # the point: a reset, not a goodbye
    assert sock is not None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    doomed._force_close()  # (its read file would hold the socket open)
    dproxy.wait_sessions(1)
    dproxy.wait_log(f"session {doomed_id} closed: client disconnected: [Errno 104] "
                    "Connection reset by peer")
    _wait_app_connections(backends, before + 1)
    with other.cursor() as cur:  # the other session goes on, still read directly
        cur.execute("SELECT 42")
        assert cur.fetchall() == ((42,),)
    assert dproxy.session(other.thread_id())["direct"] is direct
    other.close()
    assert dproxy.alive
    assert "Traceback" not in dproxy.log()


def test_a_backend_that_ends_the_connection_while_read_directly(
        dproxy: ProxyProcess, backends: list[MariaDBServer]) -> None:
    other = dproxy.connect()
    conn = dproxy.connect()
    _steady(other, dproxy)
    _steady(conn, dproxy)
    with conn.cursor() as cur:
        cur.execute("SELECT @@pseudo_thread_id, @@port")  # (CONNECTION_ID() is the proxy's)
        thread, port = cur.fetchone()
    server = next(b for b in backends if b.port == port)
    server.sql(f"KILL CONNECTION {thread}")
    # As without the direct reader: a connection killed on a server that runs on ends the
    # session (net/recovery.py), and nothing else.
    dproxy.wait_log(f"session {conn.thread_id()} closed: backend {server.addr} closed the "
                    "connection while the server runs on")
    with pytest.raises(pymysql.err.OperationalError), conn.cursor() as cur:
        cur.execute("SELECT 1")
    with other.cursor() as cur:
        cur.execute("SELECT 42")
        assert cur.fetchall() == ((42,),)
    other.close()
    assert "Traceback" not in dproxy.log()


def test_a_session_read_directly_moves_and_is_read_directly_again(
        dproxy: ProxyProcess) -> None:
    conn = dproxy.connect(autocommit=True)
    sid = conn.thread_id()
    with conn.cursor() as cur:
        cur.execute("SET @carried = 'carried'")
    for _ in range(3):
        _steady(conn, dproxy)
        old = dproxy.session(sid)["backend"]
        new = dproxy.move(sid)
        assert new != old
        with conn.cursor() as cur:
            cur.execute("SELECT @carried")
            assert cur.fetchall() == (("carried",),)
    conn.close()


def test_a_session_read_directly_is_killed_by_another(
        dproxy: ProxyProcess, backends: list[MariaDBServer]) -> None:
    before = _app_connections(backends)
    victim = dproxy.connect()
    killer = dproxy.connect()
    _steady(victim, dproxy)
    with killer.cursor() as cur:
        cur.execute(f"KILL {victim.thread_id()}")
    with pytest.raises(pymysql.err.OperationalError), victim.cursor() as cur:
        cur.execute("SELECT 1")
    killer.close()
    dproxy.wait_sessions(0)
    _wait_app_connections(backends, before)


def test_pings_are_read_directly_and_the_status_they_carry_holds_a_move(
        dproxy: ProxyProcess) -> None:
    """COM_PING's answer (one packet, as COM_STMT_RESET's) is taken on the compiled path too,
    with the transaction status it carries: a session in a transaction is not moved until
    its COMMIT."""
    conn = dproxy.connect(autocommit=True)
    sid = conn.thread_id()
    _steady(conn, dproxy)
    for i in range(16):
        conn.ping(reconnect=False)
        with conn.cursor() as cur:
            cur.execute("SELECT %s", (i,))
            assert cur.fetchall() == ((i,),)
    assert dproxy.session(sid)["direct"] is True  # the pings did not send it back to Python
    with conn.cursor() as cur:
        cur.execute("SET @carried = 'carried'")
        cur.execute("BEGIN")
        cur.execute("SELECT 1")
        for _ in range(10):
            conn.ping(reconnect=False)
        old = dproxy.session(sid)["backend"]
        dproxy.redirect()
        time.sleep(1)
        assert dproxy.session(sid)["backend"] == old  # in its transaction: it waits
        cur.execute("COMMIT")
        for _ in range(10):
            conn.ping(reconnect=False)
        dproxy.wait_moved(sid, old)
        cur.execute("SELECT @carried")
        assert cur.fetchall() == (("carried",),)
    conn.close()
