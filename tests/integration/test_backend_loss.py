"""Sessions outlive their backend: a MariaDB server killed with SIGKILL under sessions with state
of every kind, idle, inside a transaction and with a statement in flight (net/recovery.py).

Each test starts its own two servers (it kills one) and a proxy with `auth-sync-user`, so that
sessions have a reusable credential. Sessions are placed on the server to kill by opening more
until enough land there (least connections alternates between the two).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import mysql.connector
import pymysql
import pytest

from support.backends import ADMIN_TOML, APP, BACKEND_ARGS, BACKEND_USERS, MariaDBFactory
from support.proxy import ProxyFactory, ProxyProcess
from support.sleeper import StatementThread
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

# Everything a session can set that the test checks comes back: the database, system variables
# set by literals and by an expression, user variables of every type and character set (by
# literals, by an expression, by SELECT ... INTO), LAST_INSERT_ID(), SQL and server-side
# prepared statements.
SETUP = (
    "USE loss_db",
    "SET SESSION sql_mode = 'ANSI_QUOTES,NO_ZERO_DATE', time_zone = '+05:30',"
    " max_join_size = 1000000",
    "SET SESSION div_precision_increment = 3 + 4",  # an expression: only a capture knows it
    "SET NAMES utf8mb4 COLLATE utf8mb4_bin",
    "SET @i = -42, @u = CAST(18446744073709551615 AS UNSIGNED), @d = 12.50, @f = 0.1e0,"
    " @s = _latin1 X'636166E9' COLLATE latin1_german1_ci, @b = X'00FF7F', @n = NULL",
    "INSERT INTO loss_db.ai (v) VALUES (1)",
    "SELECT COUNT(*) INTO @counted FROM loss_db.ai",
    "PREPARE sql_stmt FROM 'SELECT ? * 2'",
    "SET @last = 'literal, after the checkpoint'",  # kept as a statement to run again
)
STATE = ("SELECT DATABASE(), @@sql_mode, @@time_zone, @@max_join_size, @@div_precision_increment,"
         " @@collation_connection, @@character_set_client, LAST_INSERT_ID(), @i, @u, @d, @f,"
         " HEX(@s), COLLATION(@s), HEX(@b), @n, @counted, @last")


@pytest.fixture
def pair(mariadb_factory: MariaDBFactory) -> list[MariaDBServer]:
    servers = [mariadb_factory(BACKEND_ARGS, BACKEND_USERS) for _ in range(2)]
    for server in servers:
        server.sql("CREATE DATABASE loss_db; CREATE TABLE loss_db.ai "
                   "(id INT AUTO_INCREMENT PRIMARY KEY, v INT);\n"
                   "GRANT ALL ON loss_db.* TO app;")
    return servers


@pytest.fixture
def lproxy(pair: list[MariaDBServer], proxy_factory: ProxyFactory) -> ProxyProcess:
    return proxy_factory([s.addr for s in pair], ADMIN_TOML)


def _port(conn: Any) -> int:
    cur = conn.cursor()
    cur.execute("SELECT @@port")
    port = int(cur.fetchone()[0])
    cur.close()
    return port


def _on(server: MariaDBServer, connect: Callable[[], Any], others: list[Any]) -> Any:
    """A new session on `server`; sessions that land elsewhere go to `others`, kept open."""
    for _ in range(20):
        conn = connect()
        if _port(conn) == server.port:
            return conn
        others.append(conn)
    raise AssertionError(f"no session landed on {server.addr}")


def _pymysql(proxy: ProxyProcess) -> Any:
    return proxy.connect(autocommit=True)


def _set_up(conn: Any) -> Any:
    """SETUP on a connector session, with a server-side prepared statement; returns it."""
    cur = conn.cursor()
    for statement in SETUP:
        cur.execute(statement)
        if cur.with_rows:
            cur.fetchall()
    prepared = conn.cursor(prepared=True)
    prepared.execute("SELECT ? + 1, DATABASE()", (41,))
    assert prepared.fetchall() == [(42, "loss_db")]
    return prepared


def _state(conn: Any) -> tuple[Any, ...]:
    cur = conn.cursor()
    cur.execute(STATE)
    row = tuple(cur.fetchall()[0])
    cur.close()
    return row


def test_idle_sessions_survive_a_killed_backend(pair: list[MariaDBServer],
                                                lproxy: ProxyProcess) -> None:
    doomed, survivor = pair
    others: list[Any] = []

    def connector() -> Any:
        return mysql.connector.connect(host="127.0.0.1", port=lproxy.port, user=APP.name,
                                       password=APP.password, database="test", autocommit=True)

    rich = _on(doomed, connector, others)
    prepared = _set_up(rich)
    before = _state(rich)  # a plain query: its arrival took the checkpoint first
    assert before[0] == "loss_db" and before[4] == 7 and before[-1] == "literal, after the checkpoint"
    rich.cursor().execute("SET @last = 'set last, then idle'")  # replayed, no checkpoint after
    quiet = _on(doomed, lambda: _pymysql(lproxy), others)  # never changed anything
    pinned = _on(doomed, lambda: _pymysql(lproxy), others)
    with pinned.cursor() as cur:
        cur.execute("CREATE TEMPORARY TABLE scratch (a INT)")
    timed = _on(doomed, lambda: _pymysql(lproxy), others)
    with timed.cursor() as cur:  # read back right after it: kept, whatever its value
        cur.execute("SELECT @t := NOW(6), @t2 := RAND()")
        assigned = cur.fetchone()
    timed_ps = _on(doomed, connector, others)  # the same, prepared: read after it too
    timed_ps.cursor(prepared=True).execute("SET @p = CONCAT(?, @@port)", ("on ",))
    stale = _on(doomed, lambda: _pymysql(lproxy), others)
    with stale.cursor() as cur:  # only its server knew the value: nothing ran after it
        cur.execute("SET SESSION div_precision_increment = 3 + 5")
    profiled = _on(doomed, lambda: _pymysql(lproxy), others)
    with profiled.cursor() as cur:  # pinned against moves; its profiles die with the backend
        cur.execute("SET @kept = 'profiled', profiling = 1")
        cur.execute("SELECT 'profiled'")

    doomed.kill()

    with profiled.cursor() as cur:  # rebuilt all the same, profiling anew
        cur.execute("SELECT @kept, @@profiling, @@port")
        assert cur.fetchone() == ("profiled", 1, survivor.port)

    after = _state(rich)
    assert after == (*before[:-1], "set last, then idle")
    assert _port(rich) == survivor.port
    prepared.execute("SELECT ? + 1, DATABASE()", (1,))  # the same statement, prepared again
    assert prepared.fetchall() == [(2, "loss_db")]
    cur = rich.cursor()
    cur.execute("EXECUTE sql_stmt USING 21")
    assert cur.fetchall() == [(42,)]
    assert _port(quiet) == survivor.port
    with timed.cursor() as cur:
        cur.execute("SELECT @t, @t2, @@port")
        assert cur.fetchone() == (*assigned, survivor.port)
    cur = timed_ps.cursor()
    cur.execute("SELECT @p, @@port")
    assert cur.fetchall() == [(f"on {doomed.port}", survivor.port)]
    for gone in (pinned, stale):  # closed, not continued with state they lost
        with pytest.raises(pymysql.err.OperationalError), gone.cursor() as cur:
            cur.execute("SELECT 1")
    log = lproxy.log()
    assert "the session cannot be rebuilt elsewhere: pinned: temporary tables: scratch" in log
    assert "changed since its last checkpoint in a way only its backend knew" in log
    assert f"backend {doomed.addr} was lost; the session goes on on {survivor.addr}" in log
    for conn in (rich, quiet, timed, timed_ps, profiled, *others):
        conn.close()


def test_statements_in_flight_and_an_open_transaction(pair: list[MariaDBServer],
                                                      lproxy: ProxyProcess) -> None:
    doomed, survivor = pair
    others: list[Any] = []
    reader, writer, in_trans = (_on(doomed, lambda: _pymysql(lproxy), others) for _ in range(3))
    for conn in (reader, writer, in_trans):
        with conn.cursor() as cur:
            cur.execute("SET @mine = CONNECTION_ID(), @@session.time_zone = '-03:00'")
            cur.execute("SELECT 1")  # the checkpoint comes before it
    with in_trans.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute("INSERT INTO loss_db.ai (v) VALUES (7)")
    read = StatementThread(reader, "SELECT SLEEP(2), @@port, @mine")
    write = StatementThread(writer, "UPDATE loss_db.ai SET v = v + SLEEP(2)")
    deadline = time.monotonic() + 10
    while len(doomed.sql("SELECT ID FROM information_schema.PROCESSLIST "
                         "WHERE INFO LIKE '%SLEEP(2)%' AND INFO NOT LIKE '%PROCESSLIST%'"
                         ).split()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    doomed.kill()

    read.join(30)
    write.join(30)
    assert read.error is None, read.error  # a read whose answer had not begun ran again
    assert read.rows == ((0, survivor.port, reader.thread_id()),)
    assert isinstance(write.error, pymysql.err.OperationalError), write.error
    assert write.error.args[0] == 1105 and "outcome is unknown" in write.error.args[1]
    with writer.cursor() as cur:  # ... and its session goes on
        cur.execute("SELECT @@port, @mine, @@time_zone")
        assert cur.fetchone() == (survivor.port, writer.thread_id(), "-03:00")
    with in_trans.cursor() as cur:
        with pytest.raises(pymysql.err.OperationalError) as info:
            cur.execute("INSERT INTO loss_db.ai (v) VALUES (8)")
        assert "open transaction, which was rolled back" in info.value.args[1]
        cur.execute("SELECT @@in_transaction, @@port, @mine")  # then it goes on, outside one
        assert cur.fetchone() == (0, survivor.port, in_trans.thread_id())
    for conn in (reader, writer, in_trans, *others):
        conn.close()


def test_character_sets_and_driver_settings_survive_a_killed_backend(pair: list[MariaDBServer],
                                                        lproxy: ProxyProcess) -> None:
    """`SET NAMES` is kept as a statement to run again (drivers send it first, and a capture
    would cost every such login two milliseconds); one that comes after a kept quoted literal
    takes a checkpoint instead: kept in the order of each variable's last assignment, the
    literal would run again after the first SET NAMES no more, and be read under the other
    character set. Either way the rebuilt session holds its strings' bytes as before."""
    doomed, survivor = pair
    others: list[Any] = []
    charset = "SELECT HEX(@s), COLLATION(@s), @@character_set_client, @@collation_connection"
    first = _on(doomed, lambda: _pymysql(lproxy), others)
    late = _on(doomed, lambda: _pymysql(lproxy), others)
    before = []
    for conn, statements in ((first, ["SET NAMES latin1", "SET @s = 'caf\u00e9'"]),
                             (late, ["SET NAMES latin1", "SET @s = 'caf\u00e9'",
                                     "SET NAMES utf8mb4"])):
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
            cur.execute(charset)
            before.append(cur.fetchone())
    assert before[0][:2] == before[1][:2]  # read under latin1 both times
    # What Connector/J sends at connect: sql_mode from an expression, read back by name by the
    # checkpoint the next statement takes (not a capture of every variable).
    jdbc = _on(doomed, lambda: _pymysql(lproxy), others)
    mode = "SELECT @@sql_mode, @@autocommit, @@session_track_schema"
    with jdbc.cursor() as cur:
        cur.execute("set autocommit=1, session_track_schema=1, "
                    "sql_mode = concat(@@sql_mode,',ANSI_QUOTES')")
        cur.execute(mode)
        modes = cur.fetchone()
    assert "ANSI_QUOTES" in modes[0]
    doomed.kill()
    for conn, want in zip((first, late), before, strict=True):
        with conn.cursor() as cur:
            cur.execute(charset)
            assert cur.fetchone() == want
        assert _port(conn) == survivor.port
    with jdbc.cursor() as cur:
        cur.execute(mode)
        assert cur.fetchone() == modes
    assert _port(jdbc) == survivor.port
    for conn in (first, late, jdbc, *others):
        conn.close()


@pytest.mark.parametrize("release", ["SET completion_type = 'RELEASE'", "COMMIT RELEASE"])
def test_a_connection_the_server_ends_after_a_commit_ends_the_session(
        pair: list[MariaDBServer], lproxy: ProxyProcess, release: str) -> None:
    """A COMMIT that releases the connection (completion_type = RELEASE, COMMIT RELEASE) ends
    the session as it would directly, even when a move waited for that transaction to end: the
    move finds the connection closed by a server that runs on, and does not carry the session
    anywhere from its checkpoint."""
    for _ in range(20):  # (the move and the server's hang-up race: 20 chances to lose it)
        conn = _pymysql(lproxy)
        with conn.cursor() as cur:
            if release.startswith("SET"):
                cur.execute(release)
            cur.execute("BEGIN")
            cur.execute("INSERT INTO loss_db.ai (v) VALUES (5)")
            lproxy.redirect()  # the move waits for the transaction's end
            assert lproxy.session(conn.thread_id())["moving"]
            cur.execute("COMMIT RELEASE" if release == "COMMIT RELEASE" else "COMMIT")
            with pytest.raises(pymysql.err.OperationalError) as lost:
                cur.execute("SELECT 1")
            assert lost.value.args[0] in (2006, 2013), lost.value
        conn.close()
    log = lproxy.log()
    assert "closed the connection while the server runs on" in log
    assert "goes on on" not in log and "moving it from its snapshot" not in log
