"""Migration on server configurations the common path does not walk: no USER_VARIABLES table,
users without a password. Each test compares the session's state before and after moves."""

from __future__ import annotations

import time
from typing import Any

import mysql.connector
import pymysql
import pytest
from pymysql.constants import CLIENT

from support.backends import ADMIN, ADMIN_TOML, APP, BACKEND_ARGS, BACKEND_USERS, MariaDBFactory
from support.proxy import ProxyFactory
from tiproxy.playground.mariadb import MariaDBServer
from tiproxy.protocol.packets import frame

pytestmark = pytest.mark.integration

# Every type a user variable can have, strings in several character sets.
SET_VARS = (
    "SET @i = -42, @u = CAST(18446744073709551615 AS UNSIGNED), @d = 12.50, @f = 0.1e0 + 0.2e0,"
    " @s = _latin1 X'636166E9' COLLATE latin1_german1_ci, @b = X'00FF7F', @n = NULL,"
    " @w = _utf32 X'0001F600' COLLATE utf32_unicode_ci, @c = _ucs2 X'00E9' COLLATE ucs2_bin,"
    " @`odd name` = 'spaced'"
)
READ_VARS = (
    "SELECT @i, @u, @d, @f, HEX(@s), COLLATION(@s), HEX(@b), COLLATION(@b), @n, HEX(@w),"
    " COLLATION(@w), HEX(@c), COLLATION(@c), @`odd name`, @i + 0.5, @u DIV 2, @d * 3,"
    " @into, @assigned, @@sql_mode"
)


@pytest.fixture(scope="module")
def no_user_variables(mariadb_factory: MariaDBFactory) -> list[MariaDBServer]:
    """Two servers whose information_schema has no USER_VARIABLES (as in MariaDB's test setup)."""
    return [mariadb_factory((*BACKEND_ARGS, "--loose-skip-plugin-user-variables"), BACKEND_USERS)
            for _ in range(2)]




def _state(cur: Any) -> tuple[Any, ...]:
    cur.execute(READ_VARS)
    return tuple(cur.fetchall()[0])


def test_user_variables_move_where_the_server_cannot_list_them(
    no_user_variables: list[MariaDBServer], proxy_factory: ProxyFactory,
) -> None:
    server = no_user_variables[0]
    with pymysql.connect(host="127.0.0.1", port=server.port, user=ADMIN.name,
                         password=ADMIN.password) as direct, direct.cursor() as cur, \
            pytest.raises(pymysql.err.OperationalError, match=r"(?i)USER_VARIABLES"):
        cur.execute("SELECT * FROM information_schema.USER_VARIABLES")
    proxy = proxy_factory([s.addr for s in no_user_variables], ADMIN_TOML)
    with proxy.connect() as conn, conn.cursor() as cur:
        cur.execute(SET_VARS)
        cur.execute("SELECT 7 INTO @into")
        cur.execute("SELECT @assigned := 'by :='")
        cur.execute("SET SESSION sql_mode = 'ANSI_QUOTES'")
        before = _state(cur)
        assert before[0] == -42 and before[-3:] == (7, "by :=", "ANSI_QUOTES")
        ports = set()
        for _ in range(4):
            proxy.move(conn.thread_id())
            assert _state(cur) == before
            cur.execute("SELECT @@port")
            ports.add(cur.fetchone()[0])
        assert len(ports) == 2
        assert "has no information_schema.USER_VARIABLES" in proxy.log()
        metrics = proxy.api("/metrics")[1].decode()
        assert 'migrate_res="succeed"' in metrics
        assert 'migrate_res="fail"' not in metrics  # no move failed on the way


def test_a_user_without_a_password_moves(backends: list[MariaDBServer],
                                         proxy_factory: ProxyFactory) -> None:
    for b in backends:
        b.sql("CREATE OR REPLACE USER 'nopass'@'%' IDENTIFIED BY '';"
              "GRANT ALL ON test.* TO 'nopass'@'%';")
    proxy = proxy_factory([b.addr for b in backends], ADMIN_TOML)
    with pymysql.connect(host="127.0.0.1", port=proxy.port, user="nopass", password="",
                         database="test") as conn, conn.cursor() as cur:
        cur.execute("SET @kept = 'yes'")
        session = proxy.session(conn.thread_id())
        assert "no reusable credential" not in session["waiting"]
        proxy.move(conn.thread_id())
        cur.execute("SELECT @kept, CURRENT_USER()")
        assert cur.fetchall() == (("yes", "nopass@%"),)
    with pytest.raises(pymysql.err.OperationalError):  # and a wrong password still fails
        pymysql.connect(host="127.0.0.1", port=proxy.port, user=APP.name, password="",
                        database="test")


@pytest.mark.parametrize("collation", ["ucs2_general_ci", "utf32_unicode_ci", "utf16_bin"])
def test_a_session_with_a_wide_connection_character_set_moves_whole(
        backends: list[MariaDBServer], proxy_factory: ProxyFactory, collation: str) -> None:
    """character_set_connection may be ucs2, utf16 or utf32 (not character_set_client), and
    then every literal the proxy's own capture selects comes back in it: the capture must
    not depend on it (MariaDB's main.ctype_ucs2_general_ci_casefold lost its database to a
    move, and its collation_connection with it)."""
    proxy = proxy_factory([b.addr for b in backends], ADMIN_TOML)
    with proxy.connect() as conn, conn.cursor() as cur:
        cur.execute(f"SET collation_connection = {collation}, @kept = 'yes', time_zone = '+03:00'")
        before = _wide_state(cur)
        assert before[:2] == ("test", collation)
        for _ in range(2):
            proxy.move(conn.thread_id())
            assert _wide_state(cur) == before



def test_session_only_variables_move(backends: list[MariaDBServer],
                                     proxy_factory: ProxyFactory) -> None:
    """Variables with no global value, only a default, that a session sets for itself
    (MariaDB's main.strings sets default_master_connection to 190 letters, then expects CHANGE
    MASTER to name that connection)."""
    proxy = proxy_factory([b.addr for b in backends], ADMIN_TOML)
    query = ("SELECT @@default_master_connection, @@skip_replication, "
             "@@skip_parallel_replication, @@pseudo_slave_mode")
    with proxy.connect() as conn, conn.cursor() as cur:
        cur.execute("SET SESSION default_master_connection = REPEAT('m', 190), "
                    "skip_replication = ON, skip_parallel_replication = ON")
        cur.execute(query)
        before = cur.fetchone()
        assert before == ("m" * 190, 1, 1, 0)
        proxy.move(conn.thread_id())
        cur.execute(query)
        assert cur.fetchone() == before

def _wide_state(cur: Any) -> tuple[Any, ...]:
    cur.execute("SELECT DATABASE(), @@collation_connection, @kept, @@time_zone")
    row = cur.fetchone()
    assert row is not None
    return tuple(row)


@pytest.mark.parametrize(("statements", "reason"), [
    (["PREPARE s FROM 'CREATE TEMPORARY TABLE tmp_p (a INT)'", "EXECUTE s"],
     "temporary tables: tmp_p"),
    (["EXECUTE IMMEDIATE 'CREATE TEMPORARY TABLE tmp_i (a INT)'"], "temporary tables: tmp_i"),
    (["SET STATEMENT max_statement_time = 100 FOR CREATE TEMPORARY TABLE tmp_s (a INT)"],
     "temporary tables: tmp_s"),
    (["execute immediate 'DO GET_LOCK(''fid_lock'', 1)'"], "named locks (GET_LOCK)"),
    (["SET @sql = 'CREATE TEMPORARY TABLE tmp_v (a INT)'", "PREPARE s FROM @sql", "EXECUTE s"],
     "prepared from a text the proxy cannot read"),
])
def test_every_sql_path_to_session_state_pins(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory, statements: list[str],
    reason: str,
) -> None:
    proxy = proxy_factory([b.addr for b in backends], ADMIN_TOML)
    with proxy.connect() as conn, conn.cursor() as cur:
        for sql in statements:
            cur.execute(sql)
        proxy.waits(conn.thread_id(), reason)
        cur.execute("SELECT 1")  # the session goes on where its state is


@pytest.mark.parametrize("statement", ["SET ROLE fid_role", "SET\tROLE fid_role",
                                       "BEGIN NOT ATOMIC SET ROLE fid_role; END",
                                       "SET CHARACTER SET utf8mb4; SET ROLE fid_role"])
def test_set_role_pins_the_session(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory, statement: str,
) -> None:
    """No capture reads the current role, and the new backend's login would have the account's
    default one: the session stays, with its privileges, and says why; also when the SET ROLE
    is inside a compound statement or behind a statement the proxy reads no further."""
    for server in backends:
        server.sql(f"CREATE ROLE IF NOT EXISTS fid_role; GRANT fid_role TO {APP.name}@'%'")
    proxy = proxy_factory([b.addr for b in backends], ADMIN_TOML)
    with proxy.connect(client_flag=CLIENT.MULTI_STATEMENTS) as conn, conn.cursor() as cur:
        cur.execute(statement)
        while cur.nextset():
            pass
        proxy.waits(conn.thread_id(), "SET ROLE")
        cur.execute("SELECT CURRENT_ROLE()")
        assert cur.fetchone() == ("fid_role",)


@pytest.mark.parametrize("statement", ["SET profiling = 1",
                                       "BEGIN NOT ATOMIC SET profiling = 1; END"])
def test_profiling_pins_the_session(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory, statement: str,
) -> None:
    """SHOW PROFILES lists what the connection ran, which no other connection can show: a
    session that turned profiling on stays with its profiles and says why, also when a compound
    statement turned it on where the proxy reads no statement (the capture sees it)."""
    proxy = proxy_factory([b.addr for b in backends], ADMIN_TOML)
    with proxy.connect() as conn, conn.cursor() as cur:
        cur.execute(statement)
        cur.execute("SELECT 'profiled'")
        proxy.waits(conn.thread_id(), "profiling (SET profiling)")
        cur.execute("SHOW PROFILES")
        ran = [row[2] for row in cur.fetchall()]
        assert "SELECT 'profiled'" in ran
        if statement.startswith("SET"):
            assert ran == ["SELECT 'profiled'"]  # the proxy ran nothing of its own there


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "no_autocommit"])
def test_set_transaction_for_the_next_one_holds_the_move_until_it_begins(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory, autocommit: bool,
) -> None:
    """SET TRANSACTION without SESSION is for the next transaction only, and no variable shows
    it: the session stays on its connection until that transaction has begun, the transaction
    runs as asked, and the session moves after it."""
    for server in backends:
        server.sql("CREATE TABLE IF NOT EXISTS test.next_trx (a INT) ENGINE=InnoDB")
    proxy = proxy_factory([b.addr for b in backends], ADMIN_TOML)
    # (the transaction whose statement this is: CONNECTION_ID() would be the proxy's id)
    isolation = ("SELECT trx_isolation_level FROM information_schema.INNODB_TRX "
                 "WHERE trx_query LIKE '%INNODB_TRX%'")
    with proxy.connect(autocommit=autocommit) as conn, conn.cursor() as cur:
        cur.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        cur.execute("SELECT 1")  # opens no transaction (an autocommit one on InnoDB would)
        proxy.waits(conn.thread_id(), "SET TRANSACTION for the next transaction only")
        if autocommit:
            cur.execute("BEGIN")
        cur.execute("SELECT COUNT(*) FROM test.next_trx LOCK IN SHARE MODE")
        cur.execute(isolation)
        assert cur.fetchall() == (("SERIALIZABLE",),)
        cur.execute("COMMIT")
        proxy.move(conn.thread_id())
        cur.execute("SELECT REPLACE(@@tx_isolation, '-', ' ')")
        usual = cur.fetchone()[0]
        cur.execute("BEGIN")  # the next transaction is as the session's variables say
        cur.execute("SELECT COUNT(*) FROM test.next_trx LOCK IN SHARE MODE")
        cur.execute(isolation)
        assert cur.fetchall() == ((usual,),)
        cur.execute("COMMIT")


def test_multi_statements_turned_on_by_com_set_option_stay_on_after_a_move(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory,
) -> None:
    """mysqli's multi_query turns multi-statements on with COM_SET_OPTION for the rest of the
    connection; the new backend's login after a move must have them on as well."""
    proxy = proxy_factory([b.addr for b in backends], ADMIN_TOML)
    with proxy.connect() as conn, conn.cursor() as cur:
        with pytest.raises(pymysql.err.ProgrammingError):
            cur.execute("SELECT 1; SELECT 2")  # off: logged in without them
        conn._write_bytes(frame(b"\x1b\x00\x00", 0))  # COM_SET_OPTION: on
        conn._next_seq_id = 1
        conn._read_packet()
        for _ in range(2):
            proxy.move(conn.thread_id())
            cur.execute("SELECT 1; SELECT 2")
            assert cur.fetchall() == ((1,),)
            assert cur.nextset() and cur.fetchall() == ((2,),)


def test_a_server_side_prepared_statement_that_creates_a_temporary_table_pins(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory,
) -> None:
    proxy = proxy_factory([b.addr for b in backends], ADMIN_TOML)
    conn = mysql.connector.connect(host="127.0.0.1", port=proxy.port, user=APP.name,
                                   password=APP.password, database="test", use_pure=True)
    try:
        cur = conn.cursor(prepared=True)
        cur.execute("CREATE TEMPORARY TABLE tmp_ps (a INT)")
        conn.cursor().execute("INSERT INTO tmp_ps VALUES (1)")
        proxy.waits(conn.connection_id, "temporary tables: tmp_ps")
        plain = conn.cursor()
        plain.execute("SELECT COUNT(*) FROM tmp_ps")
        assert plain.fetchall() == [(1,)]
    finally:
        conn.close()


def test_user_variables_set_through_prepared_statements_move(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory,
) -> None:
    proxy = proxy_factory([b.addr for b in backends], ADMIN_TOML)
    with proxy.connect() as conn, conn.cursor() as cur:
        cur.execute("PREPARE s FROM 'SET @from_prepared = ?'")
        cur.execute("SET @arg = 'via execute'")
        cur.execute("EXECUTE s USING @arg")
        cur.execute("EXECUTE IMMEDIATE 'SET @immediate = 5'")
        proxy.move(conn.thread_id())
        cur.execute("SELECT @from_prepared, @immediate")
        assert cur.fetchall() == (("via execute", 5),)
        cur.execute("SET @arg = 'again'")
        cur.execute("EXECUTE s USING @arg")  # the SQL-level statement was prepared again
        cur.execute("SELECT @from_prepared")
        assert cur.fetchall() == (("again",),)


def test_a_user_variable_larger_than_a_packet_moves(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory,
) -> None:
    """A value assigned from an expression is read back at once (net/checkpoints.py) and at
    each move; 10 MiB is 20 MiB as HEX(), in a row the server sends in several packets."""
    proxy = proxy_factory([b.addr for b in backends], ADMIN_TOML)
    with proxy.connect(autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SET @big := REPEAT('ab', 5 * 1024 * 1024), @small = 1")
        for _ in range(2):
            cur.execute("SELECT @@port")
            port = cur.fetchone()[0]
            proxy.move(conn.thread_id())
            cur.execute("SELECT @@port, LENGTH(@big), @big = REPEAT('ab', 5 * 1024 * 1024), "
                        "@small")
            moved_to, *values = cur.fetchone()
            assert moved_to != port
            assert values == [10 * 1024 * 1024, 1, 1]


def test_the_last_statements_diagnostics_survive_a_move(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory,
) -> None:
    """A redirect comes between a statement and the command that reads its warnings or row
    counts: that command runs where they are, and the session moves right after."""
    proxy = proxy_factory([b.addr for b in backends], ADMIN_TOML)
    with proxy.connect() as conn, conn.cursor() as cur:
        checks = [
            ("SELECT CAST('12abc' AS INT)", "SHOW WARNINGS",
             lambda rows: rows and rows[0][1] == 1292),
            ("SELECT CAST('12abc' AS INT)", "SELECT @@warning_count",
             lambda rows: rows == ((1,),)),
            ("SELECT SQL_CALC_FOUND_ROWS seq FROM seq_1_to_50 LIMIT 3", "SELECT FOUND_ROWS()",
             lambda rows: rows == ((50,),)),
            ("DO CAST('7q' AS UNSIGNED)", "SHOW COUNT(*) WARNINGS", lambda rows: rows == ((1,),)),
        ]
        for statement, reader, ok in checks:
            cur.execute("SELECT @@port")
            port = cur.fetchone()[0]
            cur.execute(statement)
            proxy.redirect()  # the move is due now, before the reader arrives
            cur.execute(reader)
            rows = cur.fetchall()
            assert ok(rows), (statement, reader, rows)
            cur.execute("SELECT @@port")  # any other command: the move comes first
            assert cur.fetchone()[0] != port


def test_kill_with_an_expression_gets_the_servers_answer(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory,
) -> None:
    for server in backends:
        server.sql("CREATE OR REPLACE SEQUENCE test.kill_seq; "
                   "CREATE OR REPLACE FUNCTION test.kill_fn() RETURNS INT RETURN @v;")
    proxy = proxy_factory([b.addr for b in backends], ADMIN_TOML)
    direct = pymysql.connect(host="127.0.0.1", port=backends[0].port, user=APP.name,
                             password=APP.password, database="test")
    with proxy.connect() as killer, proxy.connect() as victim, killer.cursor() as cur, \
            direct, direct.cursor() as dcur:
        cur.execute(f"SET @v = {victim.thread_id()}")
        # The server refuses a KILL whose expression reads a table or calls a stored function
        # before it runs any of it: through the proxy kill_fn() must not name the victim, nor
        # NEXTVAL take a value.
        for statement in ("KILL abc", "KILL 1 2", "KILL QUERY", "KILL kill_fn()",
                          "KILL NEXTVAL(kill_seq)", "KILL (SELECT 0) + LASTVAL(no_such_seq)",
                          "KILL QUERY (SELECT 1 FROM kill_seq) + kill_fn()",
                          "KILL no_such_column"):
            with pytest.raises(pymysql.err.MySQLError) as through:
                cur.execute(statement)
            with pytest.raises(pymysql.err.MySQLError) as straight:
                dcur.execute(statement)
            assert through.value.args == straight.value.args, statement
        cur.execute("SELECT NEXTVAL(kill_seq)")
        assert cur.fetchall() == ((1,),)
        with victim.cursor() as vcur:
            vcur.execute("SELECT 'victim still here'")
            assert vcur.fetchall() == (("victim still here",),)
        with pytest.raises(pymysql.err.OperationalError) as info:
            cur.execute("SET @nobody = 999999")
            cur.execute("KILL @nobody")
        assert info.value.args == (1094, "Unknown thread id: 999999")
        cur.execute("KILL CONNECTION @v - 0")  # the proxy id the expression gives
        time.sleep(0.3)
        with pytest.raises(pymysql.err.OperationalError), victim.cursor() as vcur:
            vcur.execute("SELECT 1")
        cur.execute("SELECT 'killer goes on'")
        assert cur.fetchall() == (("killer goes on",),)
        assert [s["id"] for s in proxy.sessions()] == [killer.thread_id()]


@pytest.mark.parametrize("there", ["missing", "ed25519"])
def test_a_lasting_move_failure_is_reported_once_and_not_retried_in_a_loop(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory, there: str,
) -> None:
    """The user exists on one backend only, or has another plugin on the other: a move there
    fails at login (1045) every time. It is tried once, reported on the backend and in the
    metrics, and not again soon. (For a missing account MariaDB may first ask for the plugin
    of another account, not to tell: the proxy answers what it cannot speak empty, and the
    server's refusal decides.)"""
    only, other = backends
    only.sql("CREATE OR REPLACE USER 'onlyhere'@'%' IDENTIFIED BY 'here-pass';"
             "GRANT ALL ON test.* TO 'onlyhere'@'%';")
    other.sql("DROP USER IF EXISTS 'onlyhere'@'%'" if there == "missing" else
              "CREATE OR REPLACE USER 'onlyhere'@'%' IDENTIFIED VIA ed25519 "
              "USING PASSWORD('here-pass'); GRANT ALL ON test.* TO 'onlyhere'@'%';")
    proxy = proxy_factory([only.addr, other.addr], ADMIN_TOML)
    assert proxy.api(f"/api/admin/backends/{other.addr}/drain", method="POST", body=b"")[0] == 200
    with pymysql.connect(host="127.0.0.1", port=proxy.port, user="onlyhere",
                         password="here-pass", database="test") as conn, conn.cursor() as cur:
        assert proxy.api(f"/api/admin/backends/{other.addr}/undrain", method="POST",
                         body=b"")[0] == 200
        proxy.redirect()
        deadline = time.monotonic() + 10
        while "lasting reason" not in proxy.session(conn.thread_id())["waiting"]:
            assert time.monotonic() < deadline, (proxy.session(conn.thread_id())["waiting"],
                                                 proxy.log()[-3000:])
            time.sleep(0.05)
        # Refused at login: the backend is named once the stored hashes, read again from the
        # session's backend, show its password is still the account's there.
        while not {b["addr"]: b["move_problem"] for b in proxy.backends()}[other.addr]:
            assert time.monotonic() < deadline, proxy.backends()
            time.sleep(0.05)
        time.sleep(2.5)  # a retry loop would have tried again by now (first retry: 1 s)
        metrics = proxy.api("/metrics")[1].decode()
        assert 'tiproxy_server_err{type="migrate_lasting"} 1.0' in metrics
        problem = {b["addr"]: b["move_problem"] for b in proxy.backends()}[other.addr]
        assert "1045" in problem or "Access denied" in problem
        assert proxy.log().count("failed for a lasting reason; such moves are held") == 1
        cur.execute("SELECT CURRENT_USER()")  # the session goes on where it is
        assert cur.fetchall() == (("onlyhere@%",),)


def test_prepared_statements_are_prepared_again_in_their_own_database(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory,
) -> None:
    for b in backends:
        b.sql("CREATE DATABASE IF NOT EXISTS fid_a; CREATE DATABASE IF NOT EXISTS fid_b;"
              "CREATE OR REPLACE TABLE fid_a.here (w VARCHAR(10));"
              "CREATE OR REPLACE TABLE fid_b.here (w VARCHAR(10));"
              "INSERT INTO fid_a.here VALUES ('in a'); INSERT INTO fid_b.here VALUES ('in b');"
              "GRANT ALL ON fid_a.* TO 'app'@'%'; GRANT ALL ON fid_b.* TO 'app'@'%';")
    proxy = proxy_factory([b.addr for b in backends], ADMIN_TOML)
    conn = mysql.connector.connect(host="127.0.0.1", port=proxy.port, user=APP.name,
                                   password=APP.password, database="fid_a", use_pure=True,
                                   autocommit=True)
    try:
        text = conn.cursor()
        text.execute("PREPARE s FROM 'SELECT w FROM here'")
        ps = conn.cursor(prepared=True)
        ps.execute("SELECT w, ? FROM here", (1,))
        assert ps.fetchall() == [("in a", 1)]
        conn.cmd_init_db("fid_b")  # COM_INIT_DB
        text.execute("EXECUTE s")
        assert text.fetchall() == [("in a",)]  # prepared in fid_a: it reads fid_a.here
        for _ in range(2):
            old = proxy.session(conn.connection_id)["backend"]
            proxy.redirect()
            proxy.wait_moved(conn.connection_id, old)
            text.execute("EXECUTE s")
            assert text.fetchall() == [("in a",)]
            ps.execute("SELECT w, ? FROM here", (2,))
            assert ps.fetchall() == [("in a", 2)]
            text.execute("SELECT DATABASE(), w FROM here")  # the session is still in fid_b
            assert text.fetchall() == [("fid_b", "in b")]
        text.execute("USE fid_a")
        old = proxy.session(conn.connection_id)["backend"]
        proxy.redirect()
        proxy.wait_moved(conn.connection_id, old)
        text.execute("SELECT DATABASE()")
        assert text.fetchall() == [("fid_a",)]
    finally:
        conn.close()


def test_kill_connection_id_means_the_killers_own_session(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory,
) -> None:
    proxy = proxy_factory([b.addr for b in backends], ADMIN_TOML)
    direct = pymysql.connect(host="127.0.0.1", port=backends[0].port, user=APP.name,
                             password=APP.password, database="test")
    with proxy.connect() as conn, conn.cursor() as cur, direct, direct.cursor() as dcur:
        with pytest.raises(pymysql.err.MySQLError) as through:
            cur.execute("KILL QUERY CONNECTION_ID()")
        with pytest.raises(pymysql.err.MySQLError) as straight:
            dcur.execute("KILL QUERY CONNECTION_ID()")
        assert through.value.args == straight.value.args  # its own statement is interrupted
        cur.execute("SELECT 'still here'")
        assert cur.fetchall() == (("still here",),)
        assert len(proxy.sessions()) == 1


@pytest.mark.parametrize("settings", [
    "SET SESSION sql_mode = 'ORACLE'",
    "SET SESSION max_statement_time = 0.000001",
    "SET SESSION character_set_results = NULL",
    "SET NAMES latin1",
    "SET SESSION sql_select_limit = 1",
    "SET SESSION autocommit = 0",
    "SET SESSION sql_mode = 'ANSI', SESSION sql_safe_updates = 1, SESSION big_tables = 1",
    "SET SESSION max_join_size = 1",
    "SET SESSION character_set_results = utf32",
    "SET SESSION max_join_size = 1, SESSION sql_big_selects = 1",
    # The capture is refused (1969) and runs again lifted: sql_big_selects stays as it was.
    "SET SESSION max_join_size = 1000, SESSION sql_big_selects = 1,"
    " SESSION max_statement_time = 0.000001",
], ids=["oracle", "max_statement_time", "results_charset_null", "latin1", "select_limit",
        "autocommit_off", "ansi_safe_updates", "max_join_size", "results_utf32",
        "big_selects_after_join_size", "lifted_keeps_big_selects"])
def test_a_session_moves_whatever_it_set_for_its_own_statements(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory, settings: str,
) -> None:
    """Settings that change how the server parses, limits or encodes statements apply to the
    session's statements, never to the proxy's own capture and restore."""
    proxy = proxy_factory([b.addr for b in backends], ADMIN_TOML)
    # Binary, so that the test reads them whatever character_set_results says.
    seen = "SELECT " + ", ".join(f"CAST({e} AS BINARY)" for e in (
        "@@sql_mode", "@@max_statement_time", "@@max_join_size", "@@sql_big_selects",
        "@@character_set_results", "@@character_set_client", "@@collation_connection",
        "@@sql_select_limit", "@@autocommit", "@@sql_safe_updates", "@@big_tables", "HEX(@v)",
        "@n"))
    with proxy.connect() as conn, conn.cursor() as cur:
        cur.execute("SET @v = 'caf\u00e9', @n = 7")
        cur.execute(settings)
        if "autocommit = 0" in settings:
            cur.execute("COMMIT")  # a session without autocommit moves between transactions
        cur.execute(seen)
        before = cur.fetchone()
        for _ in range(2):
            proxy.move(conn.thread_id())
            cur.execute(seen)
            assert cur.fetchone() == before
            if "autocommit = 0" in settings:
                cur.execute("COMMIT")


def test_names_set_back_to_the_servers_own_move_too(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory,
) -> None:
    """The login's character set, not the server's, is what a new connection starts with: a
    session that logged in with another one and then chose the server's own keeps the server's
    (the server's after latin1, or after utf8mb4 on a latin1 server)."""
    proxy = proxy_factory([b.addr for b in backends], ADMIN_TOML)
    names = ("SELECT @@character_set_client, @@character_set_connection, "
             "@@character_set_results, @@collation_connection")
    server_set, server_collation = backends[0].sql(
        "SELECT @@global.character_set_server, @@global.collation_server").split()[-2:]
    login_set = "utf8mb4" if server_set == "latin1" else "latin1"
    with proxy.connect(charset=login_set) as conn, conn.cursor() as cur:
        cur.execute(f"SET NAMES {server_set} COLLATE {server_collation}")
        conn.encoding = "latin1" if server_set == "latin1" else "utf8"  # PyMySQL's name for it
        cur.execute(names)
        before = cur.fetchone()
        assert before == (server_set,) * 3 + (server_collation,)
        for _ in range(2):
            proxy.move(conn.thread_id())
            cur.execute(names)
            assert cur.fetchone() == before
            if server_set.startswith("utf8"):
                cur.execute("SELECT HEX('\u20ac'), '\u20ac'")  # the euro sign, three bytes
                assert cur.fetchone() == ("E282AC", "\u20ac")


def test_wait_timeout_counts_the_clients_idle_time_across_moves(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory,
) -> None:
    """The server closes a connection idle for its wait_timeout; a move gives the session a new
    connection whose count starts at the move. The proxy keeps the old count: idle 3.5 s in all
    (2 s since the move) with wait_timeout = 3, it is gone as it would be directly. One that
    keeps sending commands is not."""
    proxy = proxy_factory([b.addr for b in backends], ADMIN_TOML)
    with proxy.connect() as busy, busy.cursor() as cur:
        cur.execute("SET SESSION wait_timeout = 3")
        for _ in range(3):
            cur.execute("SELECT 1")
            time.sleep(1.2)
            proxy.move(busy.thread_id())
        cur.execute("SELECT @@wait_timeout")
        assert cur.fetchall() == ((3,),)
    idle = proxy.connect()
    with idle.cursor() as cur:
        cur.execute("SET SESSION wait_timeout = 3")
    time.sleep(1.5)
    proxy.move(idle.thread_id())
    moved = time.monotonic()
    time.sleep(2.0)
    with pytest.raises(pymysql.err.OperationalError) as gone, idle.cursor() as cur:
        cur.execute("SELECT 1")
    assert time.monotonic() - moved < 3  # the new connection's own count had not run out
    assert gone.value.args[0] in (2006, 2013)
    proxy.wait_log("idle for its wait_timeout (3s) since its last answer")
