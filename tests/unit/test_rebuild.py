"""What a statement leaves for a rebuild without its backend (session/rebuild.py): literal
assignments kept to run again, staleness only a capture clears, statements that may run again."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tiproxy.protocol.constants import Command
from tiproxy.session.rebuild import (
    VARS_ALL,
    VARS_NONE,
    VARS_SYSTEM,
    VARS_USER,
    charset_change,
    read_only,
    retryable,
    variable_changes,
)


@pytest.mark.parametrize(
    ("sql", "replays"),
    [
        (b"SET @a = 5", [(b"@a", b"SET @a = 5")]),
        (b"set @a := -1.5e3, @`b c` = 'it''s, (x)'",
         [(b"@a", b"SET @a := -1.5e3"), (b"@`b c`", b"SET @`b c` = 'it''s, (x)'")]),
        (b"SET SESSION sql_mode = ANSI, autocommit = 0",
         [(b"sql_mode", b"SET SESSION sql_mode = ANSI"),
          (b"autocommit", b"SET SESSION autocommit = 0")]),
        (b"SET @@session.time_zone = '+01:00'",
         [(b"time_zone", b"SET @@session.time_zone = '+01:00'")]),
        (b"SET @s = _latin1 X'E9' COLLATE latin1_bin, @n = NULL",
         [(b"@s", b"SET @s = _latin1 X'E9' COLLATE latin1_bin"), (b"@n", b"SET @n = NULL")]),
        (b"EXECUTE IMMEDIATE 'SET @z = 1'", [(b"@z", b"SET @z = 1")]),
    ],
)
def test_literal_assignments_are_kept_to_run_again(sql: bytes,
                                                   replays: list[tuple[bytes, bytes]]) -> None:
    changes = variable_changes(sql)
    assert changes.replays == replays
    assert changes.stale == VARS_NONE


@pytest.mark.parametrize(
    ("sql", "stale"),
    [
        (b"SET @t = NOW()", VARS_USER),
        (b"SELECT @n := @n + 1", VARS_USER),
        (b"SELECT a INTO @x FROM t", VARS_USER),
        (b"SET CHARACTER SET utf8", VARS_ALL),  # the connection's from the database's
        (b"SET @s = 'x', NAMES latin1", VARS_ALL),  # @s read under the old character set
        (b"SET SESSION div_precision_increment = 3 + 4", VARS_SYSTEM),
        (b"SET character_set_client = CONCAT('lat', 'in1')", VARS_ALL),
        (b"CALL p()", VARS_ALL),
        (b"EXECUTE stmt", VARS_ALL),
        (b"SET @a = 1; CALL p()", VARS_ALL),
    ],
)
def test_what_only_a_capture_can_tell_is_stale(sql: bytes, stale: int) -> None:
    assert variable_changes(sql).stale == stale


@pytest.mark.parametrize(
    ("sql", "replays"),
    [
        (b"SET NAMES utf8mb4", [(b"names", b"SET NAMES utf8mb4")]),
        (b"set names 'latin1' collate 'latin1_bin'",
         [(b"names", b"SET names 'latin1' collate 'latin1_bin'")]),
        (b"SET character_set_results = NULL", [(b"character_set_results",
                                                 b"SET character_set_results = NULL")]),
        (b"SET NAMES latin1, @s = 'x'", [(b"names", b"SET NAMES latin1"), (b"@s", b"SET @s = 'x'")]),
    ],
)
def test_a_character_set_change_is_kept_while_no_literal_came_before_it(
        sql: bytes, replays: list[tuple[bytes, bytes]]) -> None:
    """What drivers send first (mysqlclient's SET NAMES) needs no capture; one that comes after
    a kept quoted literal does: replayed in order, the literal would be read under the new
    character set (charset_change)."""
    changes = variable_changes(sql)
    assert (changes.replays, changes.stale, changes.charset) == (replays, VARS_NONE, True)
    assert not charset_change(changes, [b"SET @n = 5", b"SET autocommit = 0"])
    assert charset_change(changes, [b"SET @n = 5", b"SET @s = 'caf\xc3\xa9'"])
    assert not charset_change(variable_changes(b"SET @t = 'x'"), [b"SET @s = 'y'"])
    # what a checkpoint read back by name: bytes written out, whatever the character set
    assert not charset_change(changes, [b"SET SESSION sql_mode = _utf8mb4 X'414e5349'"])


@pytest.mark.parametrize(("sql", "role", "role_set"), [
    (b"SET ROLE analyst", True, True),
    (b"set role none", True, True),
    (b"SET DEFAULT ROLE analyst", True, False),  # the account's default, not the current one
    (b"SET @a = 1; SET ROLE analyst", True, True),
    (b"CALL refresh()", True, False),  # a procedure may set it
    (b"EXECUTE stmt", True, False),
    (b"SET CHARACTER SET latin1", False, False),
    # Behind a statement the scan reads no further, or inside a compound statement.
    (b"SET CHARACTER SET x; SET ROLE r", True, True),
    (b"SET PASSWORD FOR u = PASSWORD('p'); SET ROLE r", True, True),
    (b"SET character_set_client = @x; SET ROLE r", True, True),
    (b"BEGIN NOT ATOMIC SET ROLE r1; END", True, True),
    (b"begin not atomic select 1; set role r1; end", True, True),
    (b"IF 1 THEN SET ROLE r; END IF", True, True),
    (b"BEGIN NOT ATOMIC SET @a = 1; END", True, False),
    (b"BEGIN", False, False),
    (b"SET CHARACTER SET x; CALL p()", True, False),
    (b"SET @role = 'x', rolex = 1", False, False),
    (b"SELECT 1", False, False),
])
def test_what_may_change_the_current_role(sql: bytes, role: bool, role_set: bool) -> None:
    """COM_RESET_CONNECTION keeps the current role, so a session that may have changed it does
    not leave its backend connection to the next login (net/pool.py); SET ROLE itself pins the
    session (a move cannot carry the role)."""
    changes = variable_changes(sql)
    assert (changes.role, changes.role_set) == (role, role_set)


def test_system_variables_assigned_from_expressions_are_read_back_by_name() -> None:
    """What Connector/J sends at every connect: the literals kept, sql_mode read back by name
    at the next command's checkpoint rather than every system variable."""
    changes = variable_changes(b"set autocommit=1, session_track_schema=1, "
                               b"sql_mode = concat(@@sql_mode,',STRICT_TRANS_TABLES')")
    assert (changes.stale, changes.system_names) == (VARS_SYSTEM, frozenset({b"sql_mode"}))
    assert changes.replays == [(b"autocommit", b"SET autocommit=1"),
                               (b"session_track_schema", b"SET session_track_schema=1")]


@pytest.mark.parametrize(
    "sql",
    [b"SELECT @a", b"SELECT * FROM t", b"INSERT INTO t VALUES (@client)",
     b"SET GLOBAL max_connections = 10", b"SET PASSWORD = 'secret'",
     b"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
     b"SET STATEMENT max_statement_time = 1 FOR SELECT 1", b"UPDATE t SET a = 1"],
)
def test_statements_that_change_no_session_variable(sql: bytes) -> None:
    changes = variable_changes(sql)
    assert (changes.replays, changes.stale) == ([], VARS_NONE)


def test_user_variables_assigned_in_a_reading_statement_are_read_back_by_name() -> None:
    check = variable_changes(b"SELECT COUNT(*), @client, @n := @n + 1, @@time_zone FROM t")
    assert check.rerun_names == frozenset({b"client", b"n"})
    # Writing data or locking: it may not run twice, so it stays stale instead.
    for sql in (b"UPDATE t SET a = (@x := a)", b"SELECT @x := a FROM t FOR UPDATE",
                b"SELECT GET_LOCK('l', 1) INTO @got"):
        changes = variable_changes(sql)
        assert changes.stale == VARS_USER and not changes.rerun_names, sql


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        (b"SELECT 1", True), (b"/* c */ SHOW TABLES", True), (b"SELECT LAST_INSERT_ID()", True),
        (b"BEGIN", True), (b"START TRANSACTION READ ONLY", True), (b"ROLLBACK", True),
        (b"SELECT * FROM t FOR UPDATE", False), (b"SELECT @a := 1", False),
        (b"SELECT GET_LOCK('a', 1)", False), (b"SELECT LAST_INSERT_ID(5)", False),
        (b"SELECT NEXTVAL(s)", False), (b"UPDATE t SET a = 1", False), (b"COMMIT", False),
        (b"ROLLBACK TO SAVEPOINT s", False), (b"SELECT 1; DELETE FROM t", False),
    ],
)
def test_read_only_statements(sql: bytes, expected: bool) -> None:
    assert read_only(sql) is expected


def _packet(cmd: int, body: bytes) -> bytes:
    payload = bytes((cmd,)) + body
    return len(payload).to_bytes(3, "little") + b"\x00" + payload


def test_retryable_commands() -> None:
    assert retryable(_packet(Command.QUERY, b"SELECT 1"), None)
    assert not retryable(_packet(Command.QUERY, b"DELETE FROM t"), None)
    assert retryable(_packet(Command.PING, b""), None)
    execute = _packet(Command.STMT_EXECUTE, b"\x01\x00\x00\x00\x00\x01\x00\x00\x00")
    assert retryable(execute, b"SELECT ?")
    assert not retryable(execute, b"INSERT INTO t VALUES (?)")
    assert not retryable(execute, None)  # a statement the proxy does not know
    cursor = _packet(Command.STMT_EXECUTE, b"\x01\x00\x00\x00\x01\x01\x00\x00\x00")
    assert not retryable(cursor, b"SELECT ?")  # its rows come with later fetches


@given(st.binary(max_size=300))
def test_any_text_is_judged_without_error(sql: bytes) -> None:
    changes = variable_changes(sql)
    assert changes.stale in (VARS_NONE, VARS_USER, VARS_ALL)
    read_only(sql)
