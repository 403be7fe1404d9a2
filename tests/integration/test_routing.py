"""Routing, limits, failures and KILL through the proxy, against real MariaDB servers."""

from __future__ import annotations

import socket
import struct
import threading
import time
import tomllib
from typing import Any

import pymysql
import pytest

from support.backends import ADMIN_TOML, BACKEND_ARGS, BACKEND_USERS, EDU, MariaDBFactory, connect
from support.proxy import ProxyFactory, ProxyProcess
from support.sleeper import SleepingQuery
from tiproxy.playground.mariadb import MariaDBServer
from tiproxy.playground.ports import free_port

pytestmark = pytest.mark.integration


def test_refused_backend_is_skipped(backends: list[MariaDBServer], proxy_factory: ProxyFactory) -> None:
    dead = f"127.0.0.1:{free_port()}"
    proxy = proxy_factory([dead, backends[0].addr])
    for _ in range(4):
        with proxy.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchall() == ((1,),)
    status = {b["addr"]: b["status"] for b in proxy.backends()}
    assert status == {dead: "down", backends[0].addr: "healthy"}
    assert "unavailable" in proxy.log()


def test_no_backend_gives_a_clear_error(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory([f"127.0.0.1:{free_port()}"])
    started = time.monotonic()
    with pytest.raises(pymysql.err.OperationalError) as info:
        proxy.connect()
    assert time.monotonic() - started < 15  # an answer, not a hang
    assert info.value.args[0] == 1105
    assert "no backend is available" in info.value.args[1]
    assert proxy.alive


def test_max_connections(backends: list[MariaDBServer], proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory([backends[0].addr], "max-connections = 3")
    held = [proxy.connect() for _ in range(3)]
    with pytest.raises(pymysql.err.OperationalError) as info:
        proxy.connect()
    assert info.value.args[0] == 1040
    assert "Too many connections" in info.value.args[1]
    for conn in held:  # the sessions already in are not disturbed
        with conn.cursor() as cur:
            cur.execute("SELECT 2")
            assert cur.fetchall() == ((2,),)
    held.pop().close()
    proxy.wait_sessions(len(held))
    with proxy.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT 3")
        assert cur.fetchall() == ((3,),)
    for conn in held:
        conn.close()



def test_a_full_backend_answers_with_its_own_1040_and_takes_the_next_login(
        mariadb_factory: MariaDBFactory, proxy_factory: ProxyFactory) -> None:
    """A server at max_connections (and its one place beyond, for CONNECTION ADMIN) refuses a
    new connection before its greeting: it is full, not down. The client gets the server's own
    1040, as it would connecting to the server itself; and once a connection there ends, the
    next login goes through at once, however many were refused and whatever the health checks
    (every 0.2 s here) met meanwhile, rather than "no backend is available" for a while."""
    server = mariadb_factory(BACKEND_ARGS, BACKEND_USERS)
    proxy = proxy_factory([server.addr], '\n[health]\ninterval = "0.2s"')
    with connect(server) as conn, conn.cursor() as cur:
        cur.execute("SET GLOBAL max_connections = 10")  # MariaDB's least
    held: list[pymysql.connections.Connection[Any]] = []
    try:
        refused = 0  # in a row: a health check's connection may have held a place a moment
        while refused < 5:  # APP has CONNECTION ADMIN: refused at once only beyond the extra one
            try:
                held.append(connect(server))
                refused = 0
            except pymysql.err.OperationalError as e:
                assert e.args == (1040, "Too many connections"), e.args
                refused += 1
                time.sleep(0.1)
            assert len(held) < 20, "the server never said it had too many connections"
        for _ in range(5):
            with pytest.raises(pymysql.err.OperationalError) as info:
                proxy.connect()
            assert info.value.args == (1040, "Too many connections")
        time.sleep(1.0)  # five health checks, each refused as one too many
        assert [b["status"] for b in proxy.backends()] == ["healthy"]
        held.pop().close()  # two places: a health check may take one for a moment
        held.pop().close()
        deadline = time.monotonic() + 10
        while threads(held[0]) > len(held):
            assert time.monotonic() < deadline, "the server did not see the connection end"
            time.sleep(0.05)
        with proxy.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT 7")
            assert cur.fetchall() == ((7,),)
    finally:
        if held:
            with held[0].cursor() as cur:
                cur.execute("SET GLOBAL max_connections = 151")
        for conn in held:
            conn.close()


def threads(conn: pymysql.connections.Connection[Any]) -> int:
    """The server's Threads_connected, as `conn` reads it."""
    with conn.cursor() as cur:
        cur.execute("SHOW GLOBAL STATUS LIKE 'Threads_connected'")
        row = cur.fetchone()
    assert row is not None
    return int(row[1])

def _raw_login(proxy: ProxyProcess) -> socket.socket:
    """Log in with PyMySQL and steal its socket, to write bytes no client library would."""
    conn = proxy.connect()
    sock = conn._sock
    assert sock is not None
    conn._sock = None
    return sock


def _logged_protocol_error(proxy: ProxyProcess, logged_before: int) -> str:
    """What the proxy logged after offset `logged_before`, once a protocol error is among it
    (or 5 s passed). A traceback there means the error escaped the relay's own handling."""
    deadline = time.monotonic() + 5
    while "protocol error from client" not in proxy.log()[logged_before:] \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    logged = proxy.log()[logged_before:]
    assert "Traceback" not in logged
    return logged


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x04\x00\x00\x07\x03SEL",  # a command packet with a wrong sequence id
        b"\x00\x00\x00\x00",  # an empty command
        b"\xff\xff\xff\x00" + b"\x03" + b"x" * 100,  # a 16 MiB packet that never comes
        b"\x03\x00\x00\x00\x17\x01\x00",  # COM_STMT_EXECUTE too short to hold a statement id
    ],
)
def test_malformed_packets_close_only_that_session(proxy: ProxyProcess, garbage: bytes) -> None:
    logged_before = len(proxy.log())
    with proxy.connect() as bystander:
        sock = _raw_login(proxy)
        sock.sendall(garbage)
        sock.settimeout(10)
        if garbage.startswith(b"\xff\xff\xff"):
            sock.close()
        else:
            data = b""
            try:
                while chunk := sock.recv(4096):
                    data += chunk
            except OSError:
                pass
            sock.close()
            assert b"SEL" not in data
        with bystander.cursor() as cur:
            cur.execute("SELECT 'still here'")
            assert cur.fetchall() == (("still here",),)
    assert proxy.alive
    if not garbage.startswith(b"\xff\xff\xff"):
        assert "protocol error from client" in _logged_protocol_error(proxy, logged_before)


def test_execute_cut_short_closes_only_that_session(proxy: ProxyProcess) -> None:
    """A COM_STMT_EXECUTE of a prepared statement that stops before its parameters: the
    session ends with a protocol error, logged as one, and nothing else notices."""
    logged_before = len(proxy.log())
    with proxy.connect() as bystander:
        sock = _raw_login(proxy)
        sock.settimeout(10)
        sock.sendall(struct.pack("<I", 9) + b"\x16SELECT ?")  # COM_STMT_PREPARE, one parameter
        answer = b""
        while answer.count(b"\xfe\x00\x00") < 1 and len(answer) < 4096:  # through its EOF
            answer += sock.recv(4096)
        assert answer[4] == 0x00, answer  # PREPARE_OK
        stmt_id = answer[5:9]
        sock.sendall(struct.pack("<I", 10) + b"\x17" + stmt_id + b"\x00\x01\x00\x00\x00")
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass
        sock.close()
        with bystander.cursor() as cur:
            cur.execute("SELECT 'still here'")
            assert cur.fetchall() == (("still here",),)
    assert "protocol error from client: COM_STMT_EXECUTE without its parameters" \
        in _logged_protocol_error(proxy, logged_before)
    assert proxy.alive


def test_garbage_before_login(proxy: ProxyProcess) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.recv(4096)  # the greeting
        sock.sendall(struct.pack("<I", 40 | 1 << 24) + b"\x00" * 40)
        assert sock.recv(4096) == b""  # closed: a response without protocol 4.1
    with proxy.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
    assert proxy.alive


def test_backend_dies_mid_query(mariadb_factory: MariaDBFactory,
                                backends: list[MariaDBServer],
                                proxy_factory: ProxyFactory) -> None:
    doomed = mariadb_factory(BACKEND_ARGS, BACKEND_USERS)
    proxy = proxy_factory([doomed.addr, backends[0].addr])
    victim = proxy.connect()
    other = proxy.connect()
    on_doomed = victim if proxy.backends()[0]["connections"] else other
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with on_doomed.cursor() as cur:
                cur.execute("SELECT SLEEP(30)")
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.5)
    doomed.kill()
    t.join(20)
    assert not t.is_alive()
    assert errors and isinstance(errors[0], pymysql.err.OperationalError)
    assert errors[0].args[0] in (2013, 2006)
    survivor = other if on_doomed is victim else victim
    with survivor.cursor() as cur:
        cur.execute("SELECT 'alive'")
        assert cur.fetchall() == (("alive",),)
    with proxy.connect() as conn, conn.cursor() as cur:  # new sessions go to the live one
        cur.execute("SELECT 1")
    assert proxy.alive
    survivor.close()


def test_kill_query_and_connection(backends: list[MariaDBServer], proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory([backends[0].addr])
    victim = proxy.connect()
    killer = proxy.connect()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with victim.cursor() as cur:
                cur.execute("SELECT SLEEP(20)")
                errors.append(AssertionError(f"not interrupted: {cur.fetchall()}"))
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.5)
    started = time.monotonic()
    with killer.cursor() as cur:
        cur.execute(f"KILL QUERY {victim.thread_id()}")
    t.join(15)
    assert time.monotonic() - started < 10
    # MariaDB answers an interrupted SLEEP() with 1 (or error 1317 for other statements).
    assert errors == [] or isinstance(errors[0], pymysql.err.OperationalError)
    with victim.cursor() as cur:  # KILL QUERY leaves the connection usable
        cur.execute("SELECT 'alive'")
        assert cur.fetchall() == (("alive",),)
    with killer.cursor() as cur, pytest.raises(pymysql.err.OperationalError) as info:
        cur.execute("KILL 999999")
    assert info.value.args[0] == 1094
    with killer.cursor() as cur, pytest.raises(pymysql.err.OperationalError) as info:
        cur.execute("KILL 999990 + 9")  # evaluated, then read as a proxy id, never a backend's
    assert info.value.args == (1094, "Unknown thread id: 999999")
    killer.kill(victim.thread_id())  # COM_PROCESS_KILL
    time.sleep(0.3)
    with pytest.raises(pymysql.err.OperationalError), victim.cursor() as cur:
        cur.execute("SELECT 1")
    with killer.cursor() as cur:
        cur.execute("SELECT 'killer fine'")
        assert cur.fetchall() == (("killer fine",),)
    killer.close()


def test_api_reports_the_running_proxy(proxy: ProxyProcess, backends: list[MariaDBServer]) -> None:
    status, body = proxy.api("/api/debug/health")
    assert status == 200
    status, body = proxy.api("/api/admin/config")
    assert status == 200
    cfg = tomllib.loads(body.decode())
    assert cfg["proxy"]["backend-addrs"] == [b.addr for b in backends]
    status, body = proxy.api("/api/admin/config?format=json")
    assert status == 200
    with proxy.connect() as conn, conn.cursor() as cur:
        for _ in range(5):
            cur.execute("SELECT 1")
        listed = proxy.backends()
        assert {b["addr"] for b in listed} == {b.addr for b in backends}
        assert sum(b["connections"] for b in listed) >= 1
        status, body = proxy.api("/metrics")
    text = body.decode()
    assert status == 200
    assert "tiproxy_server_connections" in text
    queries = [line for line in text.splitlines()
               if line.startswith("tiproxy_session_query_total{") and 'cmd_type="Query"' in line]
    assert queries and sum(float(q.rsplit(" ", 1)[1]) for q in queries) >= 5


def _ignore(*_: Any) -> None:
    return None


def _read_packets(sock: socket.socket, count: int) -> list[bytes]:
    """Read `count` packets; return their payloads."""
    buf = b""
    out: list[bytes] = []
    while len(out) < count:
        while len(buf) >= 4:
            length = int.from_bytes(buf[:3], "little")
            if len(buf) < 4 + length:
                break
            out.append(buf[4 : 4 + length])
            buf = buf[4 + length :]
            if len(out) == count:
                break
        if len(out) < count:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {out!r}"
            buf += chunk
    return out


def _command(payload: bytes) -> bytes:
    return struct.pack("<I", len(payload)) + payload


def test_pipelined_commands_keep_their_order(proxy: ProxyProcess) -> None:
    """Commands sent back to back, one of them answered by the proxy itself, answer in order."""
    sock = _raw_login(proxy)
    sock.settimeout(10)
    try:
        sock.sendall(_command(b"\x03SELECT SLEEP(0.2)") + _command(b"\x20") + _command(b"\x0e"))
        # result set: count, column, EOF, row, EOF; then the proxy's ERR; then PING's OK
        packets = _read_packets(sock, 7)
        assert packets[3] == b"\x010"  # the row: SLEEP() returned 0
        assert packets[5][0] == 0xFF and b"0x20" in packets[5]
        assert packets[6][0] == 0x00
    finally:
        sock.close()


def test_kill_across_backends(backends: list[MariaDBServer], proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory([b.addr for b in backends], ADMIN_TOML)
    victim = proxy.connect()
    killer = proxy.connect()
    filler = proxy.connect()
    outsider = proxy.connect(EDU)  # another user, on the killer's backend
    assert sorted(b["connections"] for b in proxy.backends()) == [2, 2]
    with victim.cursor() as cur:
        cur.execute("SELECT @@port")
        victim_port = cur.fetchone()[0]
    with killer.cursor() as cur:
        cur.execute("SELECT @@port")
        assert cur.fetchone()[0] != victim_port  # fewest connections: another backend
    sleeping = SleepingQuery(victim)
    with killer.cursor() as cur:
        cur.execute(f"KILL QUERY {victim.thread_id()}")
    assert sleeping.wait(), "KILL QUERY did not interrupt the query on the other backend"
    assert sleeping.codes == [1317]  # Query execution was interrupted
    with outsider.cursor() as cur, pytest.raises(pymysql.err.OperationalError) as info:
        cur.execute(f"KILL {victim.thread_id()}")
    assert info.value.args[0] == 1095
    with victim.cursor() as cur:
        cur.execute("SELECT 'alive'")
        assert cur.fetchall() == (("alive",),)
    with killer.cursor() as cur:
        cur.execute(f"KILL {victim.thread_id()}")
    time.sleep(0.3)
    with pytest.raises(pymysql.err.OperationalError), victim.cursor() as cur:
        cur.execute("SELECT 1")
    assert "admin-pass" not in proxy.log()
    _, body = proxy.api("/api/admin/config")
    assert b"admin-pass" not in body
    with outsider.cursor() as cur:
        cur.execute("SELECT @@port")
        assert cur.fetchone()[0] != victim_port
    for conn in (killer, outsider, filler):
        conn.close()


def test_a_slow_reader_holds_the_proxy_to_its_buffer(backends: list[MariaDBServer],
                                                     proxy_factory: ProxyFactory) -> None:
    """A client that asks for a large result and reads none of it: the proxy stops reading the
    backend once `conn-buffer-size` waits for the client, so its memory stays flat while the
    result is far larger; then the client reads the whole result, intact."""
    proxy = proxy_factory([backends[0].addr], "conn-buffer-size = 16384")
    conn = proxy.connect()
    rows, size = 200, 1 << 20  # 200 MiB in all
    before = proxy.rss_kb()
    with conn.cursor(pymysql.cursors.SSCursor) as cur:
        cur.execute(f"SELECT REPEAT('x', {size}) FROM seq_1_to_{rows}")
        peak = before
        deadline = time.monotonic() + 3  # the backend produces it far faster than that
        while time.monotonic() < deadline:
            peak = max(peak, proxy.rss_kb())
            time.sleep(0.1)
        assert peak - before < 32 * 1024, (before, peak)  # kB: a fraction of the 200 MiB
        total = 0
        for (value,) in cur:
            assert value == "x" * size
            total += 1
        assert total == rows
    conn.close()
