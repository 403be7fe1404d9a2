"""SessionState's counts of what the session made, against the server's (SessionState.unseen)."""

from __future__ import annotations

from tiproxy.session.dialects.mysql import (
    PROXY_TERMS,
    apply_terms,
    capture_sql,
    lifted,
    named_system_assignments,
    named_system_vars_sql,
    parse_capture,
    parse_performance_schema,
    performance_schema_sql,
    plugin_tables,
    terms_sql,
)
from tiproxy.session.dialects.mysql_restore import restore_sql
from tiproxy.session.state import SessionState
from tiproxy.session.statements import statement_effects

TEMP, PREP = "COM_CREATE_TEMPORARY_TABLE", "COM_PREPARE_SQL"


def test_what_the_proxy_saw_made_is_what_the_server_counted() -> None:
    state = SessionState()
    for sql in (b"CREATE TEMPORARY TABLE a (x INT); CREATE TEMPORARY TABLE b (x INT)",
                b"PREPARE s FROM 'SELECT 1'", b"PREPARE s FROM 'SELECT 2'",
                b"EXECUTE IMMEDIATE 'CREATE TEMPORARY TABLE c (x INT)'"):
        state.apply(statement_effects(sql))
    assert state.temp_tables == {"a", "b", "c"}
    assert state.unseen({TEMP: 3, PREP: 2}) == ""
    # Counted by the server, never seen by the proxy: made inside a stored program.
    assert "a temporary table made" in state.unseen({TEMP: 4, PREP: 2})
    assert state.unseen({TEMP: 3, PREP: 3}).startswith("a prepared statement made")
    assert "reset the connection" in state.unseen({TEMP: 4, PREP: 3})
    # A server that does not count (no such status variables) is not second-guessed.
    assert state.unseen({}) == ""
    state.reset()  # COM_RESET_CONNECTION: the server's counts start again too
    assert state.unseen({TEMP: 0, PREP: 0}) == ""


def test_the_capture_reads_the_counts() -> None:
    rows: list[list[bytes | None]] = [
        [b"db", None, b"74657374"], [b"lii", None, b"0"],
        [b"count", b"COM_CREATE_TEMPORARY_TABLE", b"2"], [b"count", b"com_prepare_sql", b"5"],
    ]
    assert parse_capture(rows).counts == {TEMP: 2, PREP: 5}


def test_the_capture_reads_named_locks_where_the_server_lists_them() -> None:
    assert "METADATA_LOCK_INFO" in capture_sql(True, True)
    assert "METADATA_LOCK_INFO" not in capture_sql(True, False)
    assert "USER_VARIABLES" not in capture_sql(False, True)
    for sql in (capture_sql(u, lk) for u in (False, True) for lk in (False, True)):
        assert sql.endswith("LIMIT 18446744073709551615")  # sql_select_limit cannot cut it
    rows: list[list[bytes | None]] = [[b"lock", None, b"7374206C6F636B"], [b"lock", None, b""]]
    assert parse_capture(rows).locks == [b"st lock", b""]
    assert plugin_tables([[b"user_variables"]]) == {"USER_VARIABLES"}
    assert plugin_tables([]) == set()


def test_what_the_capture_overrides_is_read_apart_and_restored_in_order() -> None:
    """A capture refused by the session's own limits runs again with them lifted, so the
    session's own values of those variables come from terms_sql; max_join_size is set before
    sql_big_selects, which setting it turns off."""
    for name in ("max_statement_time", "sql_big_selects", "character_set_results"):
        assert name.upper() in capture_sql(True, True)  # left out of the table's rows
        assert f"@@session.{name} AS BINARY" in terms_sql([])
    for name in ("CHARACTER_SET_CLIENT", "CHARACTER_SET_CONNECTION", "COLLATION_CONNECTION"):
        assert f"'{name}'" in capture_sql(True, True)  # read whatever the global value
    # Lifting max_join_size would reset sql_big_selects when it is restored: never lifted.
    assert "max_join_size" not in PROXY_TERMS and "sql_big_selects = 1" in PROXY_TERMS
    assert "character_set_results" not in PROXY_TERMS  # a binary column is never re-encoded
    assert capture_sql(True, True).startswith("SELECT CAST(kind AS BINARY)")
    assert lifted("SELECT 1", 1969) == PROXY_TERMS + "SELECT 1"  # max_statement_time
    assert lifted("SELECT 1", 1104) == PROXY_TERMS + "SELECT 1"  # max_join_size
    assert lifted("SELECT 1", 1146) is None
    assert terms_sql([("timestamp", "DOUBLE")]).endswith(
        "CAST(@@session.wait_timeout AS BINARY), CAST(@@session.timestamp AS BINARY)"
        " LIMIT 18446744073709551615")
    state = parse_capture([[b"sys", b"BIGINT UNSIGNED MAX_JOIN_SIZE", b"31"],
                           [b"sys", b"VARCHAR COLLATION_CONNECTION", b"6C6174696E315F62696E"]])
    # session, global of each term (max_statement_time, sql_big_selects,
    # character_set_results); wait_timeout; then the session-only variables
    apply_terms(state, [b"0.000001", b"0.000000", b"ON", b"ON", None, b"utf8mb4", b"28800",
                        b"1700000000.5"], [("timestamp", "DOUBLE")])
    assert [name for name, _, _ in state.system] == [
        "character_set_results", "collation_connection", "max_join_size", "max_statement_time",
        "sql_big_selects", "timestamp"]
    sql = restore_sql(state)
    assert sql is not None and "SESSION character_set_results = NULL" in sql
    assert "max_statement_time = 0.000001" in sql and "timestamp = 1700000000.5" in sql
    # the session's own, though equal to the global value: after max_join_size turned it off
    assert "SESSION sql_big_selects = _utf8mb4 X'4f4e'" in sql
    same = parse_capture([])
    apply_terms(same, [b"0", b"0", b"ON", b"ON", b"latin1", b"latin1", b"1"], [])
    # Equal to the global values: nothing of the session's own, but character_set_results,
    # which a new connection takes from its handshake, not from the global value.
    assert same.system == [("character_set_results", "ENUM", b"latin1")]
    assert (state.wait_timeout, same.wait_timeout) == (28800, 1)  # kept across a move


def test_system_variables_read_by_name_become_assignments() -> None:
    names = ["div_precision_increment", "sql_mode", "max_statement_time"]
    assert named_system_vars_sql(names).startswith(
        "SELECT @@session.div_precision_increment, "
        "CAST(@@session.div_precision_increment AS BINARY), @@session.sql_mode")
    row: list[bytes | None] = [b"7", b"7", b"ANSI", b"ANSI", b"1.5", b"1.500000"]
    types = [(8, 0), (253, 0), (253, 0), (253, 0), (5, 0), (253, 0)]  # LONGLONG, ..., DOUBLE
    assert named_system_assignments(names, row, types) == [
        ("div_precision_increment", b"SET SESSION div_precision_increment = 7"),
        ("sql_mode", b"SET SESSION sql_mode = _utf8mb4 X'414e5349'"),
        ("max_statement_time", b"SET SESSION max_statement_time = 1.500000")]


def test_performance_schema_answers_only_for_what_it_instruments() -> None:
    """user_variables_by_thread and metadata_locks list what a connection holds only where
    performance_schema is on, the connection instrumented and (locks) metadata locks too."""
    sql = performance_schema_sql(42, users=True, locks=True)
    assert "PROCESSLIST_ID = 42" in sql and "user_variables_by_thread" in sql
    assert "metadata_locks" in sql and sql.endswith("LIMIT 18446744073709551615")
    assert "metadata_locks" not in performance_schema_sql(42, users=True, locks=False)
    assert "user_variables" not in performance_schema_sql(42, users=False, locks=True)

    def rows(on: bytes, instrumented: bytes | None, mdl: bytes) -> list[list[bytes | None]]:
        return [[b"ps", b"on", on], [b"ps", b"instrumented", instrumented], [b"ps", b"mdl", mdl],
                [b"user", None, b"77C3A9697264"], [b"user", None, b"6E"],
                [b"lock", None, b"4C31"]]

    view = parse_performance_schema(rows(b"1", b"YES", b"YES"), users=True, locks=True)
    assert view.on and view.users == ["wéird".encode(), b"n"] and view.locks == [b"L1"]
    view = parse_performance_schema(rows(b"1", b"YES", b"NO"), users=True, locks=True)
    assert view.users is not None and view.locks is None and not view.mdl_instrumented
    view = parse_performance_schema(rows(b"1", b"NO", b"YES"), users=True, locks=True)
    assert view.on and view.users is None and view.locks is None  # this connection unseen
    view = parse_performance_schema(rows(b"1", None, b"YES"), users=True, locks=True)
    assert view.users is None  # the thread is gone
    view = parse_performance_schema(rows(b"0", b"YES", b"YES"), users=True, locks=True)
    assert not view.on and view.users is None and view.locks is None
    assert parse_performance_schema(rows(b"1", b"YES", b"YES"), users=False, locks=True).users \
        is None


def test_routine_bodies_and_flush_status() -> None:
    """A stored program's body runs later, elsewhere: creating one makes nothing now. FLUSH
    STATUS zeroes the server's counts, so they cannot be compared any more."""
    body = (b"CREATE DEFINER=`app`@`%` PROCEDURE fill() BEGIN DROP TEMPORARY TABLE IF EXISTS t;"
            b" CREATE TEMPORARY TABLE tmp_ids (id INT); PREPARE s FROM 'SELECT 1'; END")
    assert not statement_effects(body)
    for create in (b"create or replace function f() returns int return 1",
                   b"/* c */ CREATE TRIGGER tr AFTER INSERT ON t FOR EACH ROW SET @x = 1",
                   b"CREATE EVENT e ON SCHEDULE EVERY 1 DAY DO CREATE TEMPORARY TABLE x (a INT)"):
        assert not statement_effects(create)
    state = SessionState()
    state.apply(statement_effects(b"FLUSH LOCAL STATUS"))
    assert "FLUSH STATUS" in state.unseen({TEMP: 0, PREP: 0})
    assert state.unseen({}) == ""  # a server without the counts: nothing to compare anyway
    state.reset()
    assert state.unseen({TEMP: 0, PREP: 0}) == ""


def test_set_role_pins_until_a_new_login() -> None:
    """SET ROLE: no capture reads the current role and a new login gets the account's default,
    so the session cannot move; COM_RESET_CONNECTION keeps the role, so the pin stays."""
    state = SessionState()
    state.role_set = True
    assert state.pinned()
    assert "role" in state.pin_kinds()
    state.reset()
    assert state.pinned()
