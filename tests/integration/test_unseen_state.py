"""State a session makes where the proxy cannot read it (SessionState.unseen).

What is checked, against real MariaDB servers:
- state a stored procedure, function or trigger makes: the session moves with it when a capture
  can carry it (user and system variables), and is pinned with the reason when none can (a
  temporary table, a prepared statement), until the connection is reset; a named lock holds the
  move until it is released (where the server can list it: the metadata_lock_info plugin, or
  performance_schema);
- on servers whose information_schema has no USER_VARIABLES, the user variables stored programs
  set still move: listed by performance_schema where it is on, else named by the programs'
  bodies; where auth-sync-user can read neither, a session that ran a CALL is pinned;
- statements the proxy reads itself pin nothing they should not;
- what a client receives is byte for byte what the server sends it directly, with and without
  CLIENT_SESSION_TRACK (the proxy adds and takes away nothing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import mysql.connector
import pymysql
import pytest

from support.backends import (
    ADMIN_TOML,
    APP,
    BACKEND_ARGS,
    BACKEND_USERS,
    MariaDBFactory,
    connect,
)
from support.proxy import ProxyFactory
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

SESSION_TRACK = 1 << 23

ROUTINES = """
USE test;
CREATE OR REPLACE TABLE st_trig (a INT);
CREATE OR REPLACE TABLE st_plain (a INT) ENGINE=InnoDB;  -- each transcript rolls back its rows
DELIMITER //
CREATE OR REPLACE PROCEDURE st_temp() BEGIN CREATE TEMPORARY TABLE st_tmp (a INT); END//
CREATE OR REPLACE PROCEDURE st_var(OUT o INT) BEGIN SET @st_var = 'from st_var', o = 7; END//
CREATE OR REPLACE PROCEDURE st_into() BEGIN SELECT 'by into', 2.5 INTO @st_into, @st_dec; END//
CREATE OR REPLACE PROCEDURE st_sysvar() BEGIN SET SESSION time_zone = '+02:00'; END//
CREATE OR REPLACE PROCEDURE st_rows() BEGIN SELECT 1 AS one; END//
CREATE OR REPLACE PROCEDURE st_prepare() BEGIN PREPARE st_ps FROM 'SELECT 42'; END//
CREATE OR REPLACE PROCEDURE st_fail() BEGIN
  CREATE TEMPORARY TABLE st_fail_tmp (a INT);
  SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'st_fail';
END//
CREATE OR REPLACE FUNCTION st_fn() RETURNS INT BEGIN SET @st_fn = 'from st_fn'; RETURN 1; END//
CREATE OR REPLACE TRIGGER st_trig_ai AFTER INSERT ON st_trig FOR EACH ROW SET @st_trig = NEW.a//
DELIMITER ;
"""


LOCK_ROUTINE = ("DELIMITER //\nCREATE OR REPLACE PROCEDURE st_lock() "
                "BEGIN DO GET_LOCK('st lock', 0); END//\nDELIMITER ;\n")
NO_USER_VARIABLES = "--loose-skip-plugin-user-variables"


@pytest.fixture(scope="module")
def routines(backends: list[MariaDBServer]) -> list[MariaDBServer]:
    for b in backends:
        b.sql(ROUTINES)
    return backends


@pytest.fixture(scope="module")
def ps_routines(mariadb_factory: MariaDBFactory) -> list[MariaDBServer]:
    """Two servers without USER_VARIABLES, with performance_schema on and metadata locks
    instrumented: what lists a session's user variables and named locks there."""
    args = (*BACKEND_ARGS, NO_USER_VARIABLES, "--performance-schema=ON",
            "--performance-schema-instrument=wait/lock/metadata/sql/mdl=ON")
    servers = [mariadb_factory(args, BACKEND_USERS) for _ in range(2)]
    for server in servers:
        server.sql(ROUTINES + LOCK_ROUTINE)
    return servers


SYNC_TOML = '\n[security]\nauth-sync-user = "st_sync"\nauth-sync-password = "sync-pass"'


@pytest.fixture(scope="module")
def unlisted_routines(mariadb_factory: MariaDBFactory) -> list[MariaDBServer]:
    """Two servers that list a session's user variables nowhere (no USER_VARIABLES,
    performance_schema off), with an account st_sync that may read the password hashes
    (what moves need) but not the stored programs' bodies."""
    servers = [mariadb_factory((*BACKEND_ARGS, NO_USER_VARIABLES), BACKEND_USERS)
               for _ in range(2)]
    for server in servers:
        server.sql(ROUTINES + "CREATE OR REPLACE USER st_sync IDENTIFIED BY 'sync-pass';"
                   "GRANT SELECT ON mysql.user TO st_sync;")
    return servers






# -- what the client receives -------------------------------------------------------------------

@contextmanager
def raw_packets() -> Iterator[list[bytes]]:
    """Every packet PyMySQL reads, as the server (or the proxy) sent it."""
    seen: list[bytes] = []
    original = pymysql.connections.Connection._read_packet

    def read(self: Any, *args: Any, **kwargs: Any) -> Any:
        packet = original(self, *args, **kwargs)
        seen.append(bytes(packet._data))
        return packet

    pymysql.connections.Connection._read_packet = read  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        pymysql.connections.Connection._read_packet = original  # type: ignore[method-assign]


SCRIPT = [
    "SET @a = 1",
    "SET NAMES utf8mb4",
    "SET SESSION time_zone = '+01:00'",
    "USE mysql",
    "USE test",
    "CALL st_var(@o)",
    "CALL st_rows()",
    "SELECT st_fn()",
    "DO st_fn()",
    "INSERT INTO st_plain VALUES (1), (2)",
    "UPDATE st_plain SET a = a + 1",
    "PREPARE s FROM 'SELECT 1'",
    "EXECUTE s",
    "DEALLOCATE PREPARE s",
    "SET STATEMENT max_statement_time = 10 FOR SELECT 1",
    "SET session_track_state_change = ON",
    "SET @b = 2",
    "CALL st_var(@o)",
    "SET session_track_state_change = OFF",
    "SET @c = 3",
    "CREATE TEMPORARY TABLE st_t (a INT)",
    "DROP TEMPORARY TABLE st_t",
]


def _transcript(port: int, client_flag: int) -> list[list[bytes]]:
    out = []
    with pymysql.connect(host="127.0.0.1", port=port, user=APP.name, password=APP.password,
                         database="test", client_flag=client_flag) as conn, conn.cursor() as cur:
        for sql in SCRIPT:
            with raw_packets() as seen:
                cur.execute(sql)
                cur.fetchall()
            out.append(seen)
    return out


@pytest.mark.parametrize("client_flag", [0, SESSION_TRACK], ids=["no_tracking", "tracking"])
def test_the_client_receives_what_the_server_would_send_it(
    routines: list[MariaDBServer], proxy_factory: ProxyFactory, client_flag: int,
) -> None:
    proxy = proxy_factory([routines[0].addr], ADMIN_TOML)
    direct = _transcript(routines[0].port, client_flag)
    through = _transcript(proxy.port, client_flag)
    for sql, want, got in zip(SCRIPT, direct, through, strict=True):
        assert got == want, sql
    if client_flag:
        # The client's own tracking shows: the schema, the variables, its own state-change
        # entries while it has them on, and nothing of the proxy's while it has them off.
        flat = [p for packets in direct for p in packets]
        assert any(b"\x01\x05\x04test" in p for p in flat)  # USE test: the schema entry
        assert any(b"\x02\x011" in p for p in direct[SCRIPT.index("SET @b = 2")])
        assert not any(b"\x02\x011" in p for p in direct[SCRIPT.index("SET @c = 3")])


# -- state where the proxy cannot see it ----------------------------------------------------------

@pytest.mark.parametrize("servers", ["routines", "ps_routines", "unlisted_routines"],
                         ids=["information_schema", "performance_schema", "program_bodies"])
@pytest.mark.parametrize(("statements", "reads", "want"), [
    (["CALL st_var(@o)"], "SELECT @st_var, @o", ("from st_var", 7)),
    (["CALL st_into()"], "SELECT @st_into, @st_dec", ("by into", Decimal("2.5"))),
    (["CALL st_sysvar()"], "SELECT @@time_zone", ("+02:00",)),
    (["SELECT st_fn()"], "SELECT @st_fn", ("from st_fn",)),
    (["INSERT INTO st_trig VALUES (5)"], "SELECT @st_trig", (5,)),
    (["CALL st_rows()"], "SELECT 'nothing to carry'", ("nothing to carry",)),
])
def test_state_a_capture_carries_moves(
    request: pytest.FixtureRequest, servers: str, proxy_factory: ProxyFactory, *,
    statements: list[str], reads: str, want: tuple[Any, ...],
) -> None:
    """Wherever the server lists user variables (information_schema, performance_schema) or
    the stored programs name them, what a program set moves with the session."""
    routines: list[MariaDBServer] = request.getfixturevalue(servers)
    with connect(routines[0], autocommit=True) as direct, direct.cursor() as cur:
        for sql in statements:
            cur.execute(sql)
            cur.fetchall()
        cur.execute(reads)
        assert cur.fetchone() == want  # what the server itself keeps after the statements
    proxy = proxy_factory([b.addr for b in routines], ADMIN_TOML)
    with proxy.connect(autocommit=True) as conn, conn.cursor() as cur:
        for sql in statements:
            cur.execute(sql)
            cur.fetchall()
        for _ in range(2):
            proxy.move(conn.thread_id())
            cur.execute(reads)
            assert cur.fetchone() == want
    log = proxy.log()
    if servers == "program_bodies":
        assert "performance_schema is off" in log  # the bodies named them
    elif servers == "performance_schema":
        assert "performance_schema lists what information_schema cannot (user variables" in log
        assert "auth-sync-user cannot read every stored program" not in log


def test_where_nothing_lists_user_variables_a_call_pins_until_reset(
    unlisted_routines: list[MariaDBServer], proxy_factory: ProxyFactory,
) -> None:
    """No USER_VARIABLES, performance_schema off, and an auth-sync-user that cannot read the
    stored programs: what a procedure set cannot be named, so the session stays where it is."""
    proxy = proxy_factory([b.addr for b in unlisted_routines], SYNC_TOML)
    conn = mysql.connector.connect(host="127.0.0.1", port=proxy.port, user=APP.name,
                                   password=APP.password, database="test", use_pure=True)
    try:
        cur = conn.cursor()
        cur.execute("SET @mine = 'named by the session'")
        proxy.move(conn.connection_id)  # what the session names itself moves
        cur.execute("SELECT @mine")
        assert cur.fetchall() == [("named by the session",)]
        cur.execute("CALL st_var(@o)")
        reason = "a stored procedure ran (CALL)"
        proxy.waits(conn.connection_id, reason)
        assert "reset the connection" in proxy.session(conn.connection_id)["waiting"]
        cur.execute("SELECT @st_var")
        assert cur.fetchall() == [("from st_var",)]  # still there, where it was set
        assert "cannot read every stored program's body" in proxy.log()
        pinned_on = proxy.session(conn.connection_id)["backend"]
        conn.cmd_reset_connection()
        proxy.wait_moved(conn.connection_id, pinned_on)
        cur = conn.cursor()
        cur.execute("SELECT @st_var")
        assert cur.fetchall() == [(None,)]
    finally:
        conn.close()


@pytest.mark.parametrize(("statements", "reason", "check"), [
    (["CALL st_temp()"], "a temporary table made where the proxy cannot see",
     "SELECT COUNT(*) FROM st_tmp"),
    (["CALL st_prepare()"], "a prepared statement made where the proxy cannot see",
     "EXECUTE st_ps"),
])
def test_state_no_capture_carries_pins_until_reset(
    routines: list[MariaDBServer], proxy_factory: ProxyFactory, statements: list[str],
    reason: str, check: str,
) -> None:
    proxy = proxy_factory([b.addr for b in routines], ADMIN_TOML)
    conn = mysql.connector.connect(host="127.0.0.1", port=proxy.port, user=APP.name,
                                   password=APP.password, database="test", use_pure=True)
    try:
        cur = conn.cursor()
        for sql in statements:
            cur.execute(sql)
            cur.fetchall()
        proxy.waits(conn.connection_id, reason)
        cur.execute(check)  # the state is there, on the backend that has it
        cur.fetchall()
        assert "reset the connection" in proxy.session(conn.connection_id)["waiting"]
        pinned_on = proxy.session(conn.connection_id)["backend"]
        conn.cmd_reset_connection()  # the server forgets it: the session moves
        proxy.wait_moved(conn.connection_id, pinned_on)
        cur = conn.cursor()
        cur.execute("SELECT 1")
        assert cur.fetchall() == [(1,)]
        # The server's counts and the proxy's start again with the reset: they still agree.
        for sql in statements:
            cur.execute(sql)
            cur.fetchall()
        proxy.waits(conn.connection_id, reason)
    finally:
        conn.close()



def test_after_flush_status_a_move_waits_without_reading_the_session(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory,
) -> None:
    """FLUSH STATUS zeroes the counts the proxy compares before a move, so the session waits
    until it is reset; and the proxy decides that without running its capture, a checkpoint or a
    read of variables on the session's connection, whose counters the session is about to read (MariaDB's
    main.long_unique_bugs_no_sp_protocol found Handler_tmp_write counting the capture's rows)."""
    proxy = proxy_factory([b.addr for b in backends], ADMIN_TOML)
    with proxy.connect() as conn, conn.cursor() as cur:
        cur.execute("FLUSH STATUS")
        cur.execute("SET @t = NOW(6)")  # an expression the proxy would read back by name
        for _ in range(2):
            proxy.waits(conn.thread_id(), "FLUSH STATUS")
        cur.execute("SHOW SESSION STATUS WHERE Variable_name IN "
                    "('Handler_tmp_write', 'Handler_read_rnd_next', 'Com_select')")
        assert {name: int(value) for name, value in cur.fetchall()} == {
            "Com_select": 0, "Handler_read_rnd_next": 0, "Handler_tmp_write": 0}

def test_a_failed_call_that_left_a_temporary_table_pins(
    routines: list[MariaDBServer], proxy_factory: ProxyFactory,
) -> None:
    proxy = proxy_factory([b.addr for b in routines], ADMIN_TOML)
    with proxy.connect() as conn, conn.cursor() as cur:
        with pytest.raises(pymysql.err.OperationalError, match="st_fail"):
            cur.execute("CALL st_fail()")
        proxy.waits(conn.thread_id(), "a temporary table made where the proxy cannot see")
        cur.execute("SELECT COUNT(*) FROM st_fail_tmp")
        assert cur.fetchone() == (0,)


def test_a_prepared_call_is_watched_like_a_plain_one(
    routines: list[MariaDBServer], proxy_factory: ProxyFactory,
) -> None:
    proxy = proxy_factory([b.addr for b in routines], ADMIN_TOML)
    conn = mysql.connector.connect(host="127.0.0.1", port=proxy.port, user=APP.name,
                                   password=APP.password, database="test", use_pure=True)
    try:
        conn.cursor(prepared=True).execute("CALL st_temp()")
        proxy.waits(conn.connection_id, "a temporary table made where the proxy cannot see")
    finally:
        conn.close()


def test_statements_the_proxy_follows_do_not_pin(
    routines: list[MariaDBServer], proxy_factory: ProxyFactory,
) -> None:
    """The server's counts agree with the proxy's after temporary tables and prepared
    statements the client made itself, and after moves (which prepare statements again)."""
    proxy = proxy_factory([b.addr for b in routines], ADMIN_TOML)
    with proxy.connect(client_flag=pymysql.constants.CLIENT.MULTI_STATEMENTS) as conn, \
            conn.cursor() as cur:
        for sql in ("SET @x = 1", "SET SESSION sql_mode = 'ANSI_QUOTES'", "USE test",
                    "PREPARE p FROM 'SELECT @x'", "PREPARE p FROM 'SELECT @x'",
                    "EXECUTE IMMEDIATE 'CREATE TEMPORARY TABLE gone1 (a INT)'",
                    "CREATE TEMPORARY TABLE gone2 (a INT); CREATE TEMPORARY TABLE gone3 (a INT)",
                    "DROP TEMPORARY TABLE gone1, gone2, gone3", "CALL st_var(@o)",
                    "KILL (SELECT 0)"):
            with contextlib.suppress(pymysql.err.OperationalError):  # KILL: no such thread
                cur.execute(sql)
                while cur.nextset():
                    pass
        for _ in range(3):
            proxy.move(conn.thread_id())
            cur.execute("EXECUTE p")
            assert cur.fetchall() == ((1,),)
        cur.execute("SELECT @@sql_mode, @st_var")
        assert cur.fetchone() == ("ANSI_QUOTES", "from st_var")


@pytest.fixture(scope="module")
def lock_info_servers(mariadb_factory: MariaDBFactory) -> list[MariaDBServer]:
    """Two servers with the metadata_lock_info plugin (information_schema.METADATA_LOCK_INFO)."""
    servers = [mariadb_factory((*BACKEND_ARGS, "--plugin-load-add=metadata_lock_info"),
                               BACKEND_USERS) for _ in range(2)]
    for server in servers:
        server.sql(ROUTINES + LOCK_ROUTINE)
    return servers


@pytest.mark.parametrize("servers", ["lock_info_servers", "ps_routines"],
                         ids=["metadata_lock_info", "performance_schema"])
def test_a_named_lock_taken_in_a_procedure_holds_the_move_until_released(
    request: pytest.FixtureRequest, servers: str, proxy_factory: ProxyFactory,
) -> None:
    lock_servers: list[MariaDBServer] = request.getfixturevalue(servers)
    proxy = proxy_factory([s.addr for s in lock_servers], ADMIN_TOML)
    with proxy.connect(autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("CALL st_lock()")
        proxy.waits(conn.thread_id(), "named locks taken where the proxy cannot see")
        assert "st lock" in proxy.session(conn.thread_id())["waiting"]
        cur.execute("SELECT IS_USED_LOCK('st lock') = CONNECTION_ID()")
        assert cur.fetchone() == (1,)  # still held, where it was taken
        pinned_on = proxy.session(conn.thread_id())["backend"]
        cur.execute("SELECT RELEASE_LOCK('st lock')")
        proxy.wait_moved(conn.thread_id(), pinned_on, timeout=15)  # checked again: moves
        cur.execute("SELECT IS_USED_LOCK('st lock')")
        assert cur.fetchone() == (None,)


def test_a_failed_change_user_resets_what_the_proxy_counts(
    routines: list[MariaDBServer], proxy_factory: ProxyFactory,
) -> None:
    """MariaDB resets the session even when COM_CHANGE_USER fails (the user stays): the proxy
    must forget what it counted too, or a temporary table a procedure makes afterwards would
    look like the one the client made before."""
    proxy = proxy_factory([b.addr for b in routines], ADMIN_TOML)
    conn = mysql.connector.connect(host="127.0.0.1", port=proxy.port, user=APP.name,
                                   password=APP.password, database="test", use_pure=True)
    try:
        cur = conn.cursor()
        cur.execute("CREATE TEMPORARY TABLE st_tmp (a INT)")
        with pytest.raises(mysql.connector.Error):
            conn.cmd_change_user(username=APP.name, password="wrong", database="test")
        cur = conn.cursor()
        cur.execute("SELECT CURRENT_USER()")
        assert cur.fetchall() == [(f"{APP.name}@%",)]
        with pytest.raises(mysql.connector.Error):  # the server dropped it
            cur.execute("SELECT * FROM st_tmp")
        cur.execute("CALL st_temp()")  # makes st_tmp again, where the proxy cannot see
        proxy.waits(conn.connection_id, "a temporary table made where the proxy cannot see")
    finally:
        conn.close()
