"""Statement inspection: what a COM_QUERY or a prepared text does to the state the proxy tracks.

Every case goes through `may_change_state` first, as the relay does: a statement it lets pass
on the fast path is never parsed, so it must not pass anything that changes tracked state.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tiproxy.session.sqltext import MEMO_MAX_LEN, reads_diagnostics, user_variable_names
from tiproxy.session.state import PreparedStatement, SessionState
from tiproxy.session.statements import (
    OPAQUE,
    StatementEffects,
    literal_text,
    may_change_state,
    prepared_effects,
    split_statements,
    statement_effects,
)


def effects(sql: bytes, multi: bool = True, state: SessionState | None = None,
            ) -> StatementEffects | None:
    """What the relay would record for this COM_QUERY text (it reads every statement while
    LOCK TABLES holds)."""
    look = (state is not None and state.table_locks) or may_change_state(b"\x03" + sql, multi)
    return statement_effects(sql) if look else None


def applied(*statements: bytes) -> SessionState:
    state = SessionState()
    for sql in statements:
        fx = effects(sql, state=state)
        if fx:
            state.apply(fx)
    return state


@pytest.mark.parametrize("sql", [
    b"CREATE TEMPORARY TABLE t (a INT)",
    b"create temporary table t (a int)",
    b"Create Or Replace Temporary Table IF NOT EXISTS db.`t` (a INT)",
    b"  /* a comment */ CREATE TEMPORARY TABLE t (a INT)",
    b"-- a line comment\nCREATE TEMPORARY TABLE t (a INT)",
    b"# hash comment\n\tCREATE TEMPORARY TABLE t SELECT 1",
    b"SET STATEMENT max_statement_time = 10 FOR CREATE TEMPORARY TABLE t (a INT)",
    b"SELECT 1; CREATE TEMPORARY TABLE t (a INT)",
    b"EXECUTE IMMEDIATE 'CREATE TEMPORARY TABLE t (a INT)'",
])
def test_temporary_tables_are_seen_in_every_form(sql: bytes) -> None:
    assert applied(sql).temp_tables == {"t"}
    assert applied(sql, b"DROP TEMPORARY TABLE t").temp_tables == set()


def test_a_multi_statement_needs_the_multi_statement_flag_to_be_looked_at() -> None:
    # Without CLIENT_MULTI_STATEMENTS the server refuses the second statement anyway.
    assert effects(b"SELECT 1; CREATE TEMPORARY TABLE t (a INT)", multi=False) is None


@pytest.mark.parametrize(("sql", "pin"), [
    (b"SELECT GET_LOCK('a', 1)", "named locks (GET_LOCK)"),
    (b"select get_lock('a', 1)", "named locks (GET_LOCK)"),
    (b"DO GET_LOCK(CONCAT('a', 'b'), 1)", "named locks (GET_LOCK)"),
    (b"LOCK TABLES t READ", "LOCK TABLES"),
    (b"lock table t write", "LOCK TABLES"),
    (b"HANDLER t OPEN", "open HANDLER"),
    (b"EXECUTE IMMEDIATE @sql", "EXECUTE IMMEDIATE of a text the proxy cannot read"),
    (b"EXECUTE IMMEDIATE CONCAT('CREATE ', 'TEMPORARY TABLE t (a INT)')",
     "EXECUTE IMMEDIATE of a text the proxy cannot read"),
])
def test_pins(sql: bytes, pin: str) -> None:
    assert pin in applied(sql).pins()


def test_pins_are_released_by_their_undoing() -> None:
    assert applied(b"SELECT GET_LOCK('a', 1)", b"SELECT RELEASE_LOCK('a')").pins() == []
    assert applied(b"SELECT GET_LOCK('a', 1)", b"DO RELEASE_ALL_LOCKS()").pins() == []


def test_a_named_lock_taken_twice_is_held_until_given_back_twice() -> None:
    """MariaDB counts a named lock's GET_LOCKs and each RELEASE_LOCK gives back one (its
    main.func_isnull takes one inside a subquery, once per row, and releases it once): the
    session stays pinned while any is held, and where it cannot be counted, until
    RELEASE_ALL_LOCKS."""
    twice = (b"SELECT GET_LOCK('a', 1)", b"DO GET_LOCK('a', 1)")
    assert applied(*twice, b"SELECT RELEASE_LOCK('a')").pins() != []
    assert applied(*twice, b"SELECT RELEASE_LOCK('a')", b"SELECT RELEASE_LOCK('a')").pins() == []
    assert applied(b"SELECT GET_LOCK('a', 1), GET_LOCK('a', 1)",
                   b"SELECT RELEASE_LOCK('a')", b"SELECT RELEASE_LOCK('a')").pins() != []
    per_row = b"SELECT ISNULL((SELECT GET_LOCK('a', 0) FROM t1 GROUP BY f1)) FROM t1"
    for releases in (1, 3):
        state = applied(per_row, *[b"SELECT RELEASE_LOCK('a')"] * releases)
        assert state.pins() == ["named locks (GET_LOCK)"]
    assert applied(per_row, b"SELECT RELEASE_ALL_LOCKS()").pins() == []
    assert applied(b"SELECT GET_LOCK('b', 1)", b"SELECT RELEASE_LOCK('a')").pins() != []
    assert applied(b"LOCK TABLES t READ", b"UNLOCK TABLES").pins() == []
    assert applied(b"LOCK TABLES t READ", b"START TRANSACTION").pins() == []
    assert applied(b"HANDLER t OPEN", b"HANDLER t CLOSE").pins() == []


def test_sql_prepare_execute_and_deallocate() -> None:
    prepare = b"PREPARE s FROM 'CREATE TEMPORARY TABLE t (a INT)'"
    state = applied(prepare)
    assert state.sql_prepared == {"s": prepare}
    assert state.temp_tables == set()  # preparing creates nothing
    state = applied(prepare, b"EXECUTE s")
    assert state.temp_tables == {"t"}
    state = applied(prepare, b"DEALLOCATE PREPARE s", b"EXECUTE s")
    assert state.sql_prepared == {} and state.temp_tables == set()
    state = applied(b'PREPARE s FROM "SELECT GET_LOCK(\'x\', 1)"', b"execute s")
    assert state.named_locks == {"x"}
    state = applied(b"PREPARE s FROM 'SELECT ?'", b"EXECUTE s USING @a")
    assert state.pins() == []  # a statement without effects runs freely



def test_a_semicolon_in_a_prepared_text_is_part_of_it() -> None:
    """What a move prepares again is the whole PREPARE (MariaDB's main.lotofstack prepares
    `"select * from t3;"`): a `;` in a string, a quoted name or a comment ends nothing."""
    for prepare in (b'prepare stmt2 from "select * from t3;"',
                    b"PREPARE s FROM 'SELECT 1; SELECT 2'",
                    b"PREPARE s FROM 'SELECT `a;b` FROM t /* ; */'"):
        assert applied(prepare).sql_prepared == {prepare.split()[1].decode(): prepare}
    state = applied(b"SELECT ';'; PREPARE b FROM \"SELECT ';'\" -- ;\n")
    assert state.sql_prepared == {"b": b"PREPARE b FROM \"SELECT ';'\" -- ;"}



def test_a_multi_statement_text_is_recorded_statement_by_statement() -> None:
    """Each statement of the text in its order: two PREPAREs are two statements to prepare
    again after a move, and a DEALLOCATE after its PREPARE leaves nothing. MariaDB's
    main.lotofstack sends a PREPARE and then a CREATE PROCEDURE whose body prepares and
    deallocates another name (its statements are read as the text's own: a known limit)."""
    state = applied(b"PREPARE a FROM 'SELECT 1'; PREPARE b FROM 'SELECT 2'; DO 1")
    assert state.sql_prepared == {"a": b"PREPARE a FROM 'SELECT 1'",
                                  "b": b"PREPARE b FROM 'SELECT 2'"}
    state = applied(b"PREPARE a FROM 'SELECT 1'; DEALLOCATE PREPARE a; PREPARE b FROM 'DO 2'")
    assert state.sql_prepared == {"b": b"PREPARE b FROM 'DO 2'"}
    state = applied(b'prepare stmt2 from "select * from t3;";\n'
                    b"create procedure p(level int) begin\n"
                    b'  prepare stmt1 from "update t3 set a=a+2"; execute stmt1;\n'
                    b"  deallocate prepare stmt1; execute stmt2; end")
    assert state.sql_prepared == {"stmt2": b'prepare stmt2 from "select * from t3;"'}


def test_the_global_read_lock_and_backup_stages_pin_until_released() -> None:
    """What a backup tool holds on its connection: a move would drop it unseen."""
    for hold, release in ((b"FLUSH TABLES WITH READ LOCK", b"UNLOCK TABLES"),
                          (b"flush local tables t1, t2 with read lock", b"unlock tables"),
                          (b"FLUSH TABLES t1 FOR EXPORT", b"UNLOCK TABLES"),
                          (b"BACKUP STAGE START", b"BACKUP STAGE END"),
                          (b"BACKUP LOCK test.t1", b"BACKUP UNLOCK")):
        state = applied(hold)
        assert len(state.pins()) == 1, hold
        assert applied(hold, b"BACKUP STAGE BLOCK_DDL", b"SELECT 1").pins() == state.pins()
        assert applied(hold, release).pins() == [], release
    assert applied(b"FLUSH TABLES").pins() == []
    assert applied(b"FLUSH TABLES WITH READ LOCK", b"BEGIN").pins() != []  # BEGIN keeps it


def test_reading_the_optimizer_trace_reads_the_last_statement() -> None:
    assert reads_diagnostics(b"\0\0\0\0\x03SELECT * FROM information_schema.OPTIMIZER_TRACE")


def test_preparing_show_warnings_reads_the_last_statement() -> None:
    """mysqltest --ps-protocol prepares SHOW WARNINGS: no move may come before the prepare."""
    assert reads_diagnostics(b"\0\0\0\0\x16show warnings")
    assert not reads_diagnostics(b"\0\0\0\0\x16SELECT 1")
    assert reads_diagnostics(b"\0\0\0\0\x19\x01\0\0\0")  # a close between them keeps them


def test_statements_split_where_the_server_splits_them() -> None:
    assert split_statements(b"SELECT 1") == [b"SELECT 1"]
    assert split_statements(b"SELECT ';' ; SELECT 2 -- x;y\nSELECT 3 /* ; */;;") == [
        b"SELECT ';' ", b" SELECT 2 -- x;y\nSELECT 3 /* ; */"]
    assert split_statements(b"SELECT `a;b`; SELECT \"c\"\";d\"; SELECT 'e'';f'") == [
        b"SELECT `a;b`", b' SELECT "c"";d"', b" SELECT 'e'';f'"]
    # A backslash escapes a quote unless NO_BACKSLASH_ESCAPES, which the text does not say:
    # the split points of both readings (more, shorter parts, never a statement hidden).
    assert split_statements(b"SELECT 'a\\'; SET autocommit=0; SELECT 'b'") == [
        b"SELECT 'a\\'", b" SET autocommit=0", b" SELECT 'b'"]
    assert split_statements(b"SELECT 'a\\';' ; SELECT 2") == [
        b"SELECT 'a\\'", b"' ", b" SELECT 2"]
    assert split_statements(b"SELECT 1 --\nSELECT 2; SELECT 3") == [  # `--` then a newline
        b"SELECT 1 --\nSELECT 2", b" SELECT 3"]
    # /*! ... */ is code to the server; an unterminated quote runs to the end, as it does there.
    assert split_statements(b"SELECT 1 /*! ; */") == [b"SELECT 1 /*! ", b" */"]
    assert split_statements(b"SELECT 'x; y") == [b"SELECT 'x; y"]
    assert split_statements(b"SELECT 1; SELECT 'x; y") == [b"SELECT 1", b" SELECT 'x; y"]


@given(st.lists(st.sampled_from([b"SELECT 1", b"SET @a = 'p;q'", b"DO `x;y`", b"SELECT 2 /* ; */",
                                 b"SELECT \"r;\"\"s\"", b"SELECT 'it''s'"]),
                min_size=1, max_size=5))
def test_joined_statements_split_back(statements: list[bytes]) -> None:
    assert split_statements(b";".join(statements)) == statements

def test_a_statement_prepared_from_a_variable_pins_and_running_it_pins_for_good() -> None:
    # Prepared again after a move it would take the variable's text of then: pinned at once.
    state = applied(b"PREPARE s FROM @sql")
    assert len(state.pins()) == 1 and "prepared from a variable" in state.pins()[0]
    # What it did when it ran cannot be known: that pin stays even once it is deallocated.
    state = applied(b"PREPARE s FROM @sql", b"EXECUTE s", b"DEALLOCATE PREPARE s")
    assert state.pins() == [OPAQUE.opaque]
    state.reset()
    assert state.pins() == []


def test_prepared_text_of_com_stmt_prepare() -> None:
    fx = prepared_effects(b"CREATE TEMPORARY TABLE t (a INT)")
    assert fx is not None and fx.temp_created == ("t",)
    assert prepared_effects(b"SELECT ? + 1") is None
    assert prepared_effects(b"SELECT GET_LOCK(?, 1)") is not None


@pytest.mark.parametrize("sql", [
    b"SELECT 1", b"SELECT * FROM t WHERE c = 'CREATE TEMPORARY TABLE'", b"INSERT INTO t VALUES (1)",
    b"UPDATE t SET a = 1", b"DELETE FROM t", b"COMMIT", b"SHOW TABLES", b"EXPLAIN SELECT 1",
    b"SELECT * FROM calls", b"CALLBACK",
])
def test_ordinary_statements_change_nothing(sql: bytes) -> None:
    fx = effects(sql)
    assert not fx


@pytest.mark.parametrize("sql", [
    b"CALL p()", b"call db.p(@o)", b"/* c */ CALL p", b"SELECT 1; CALL p()",
    b"SET STATEMENT max_statement_time = 1 FOR CALL p()", b"EXECUTE IMMEDIATE 'CALL p()'",
])
def test_a_procedure_call_is_noted_in_every_form(sql: bytes) -> None:
    """What a procedure sets cannot be named from the statement: where the server cannot list
    user variables, a session that ran one is pinned at its next move (net/migration.py)."""
    assert applied(sql).procedure_called
    assert not applied(b"SELECT 1").procedure_called


def test_a_failed_call_is_noted_too_and_a_reset_forgets_it() -> None:
    state = SessionState()
    failed = effects(b"CALL p()")
    assert failed is not None
    state.ran(failed, failed=True)  # it may have set variables before it failed
    assert state.procedure_called
    state.reset()
    assert not state.procedure_called
    state.apply(statement_effects(b"PREPARE s FROM 'CALL p()'"))
    assert not state.procedure_called  # prepared, not run
    state.ran(statement_effects(b"EXECUTE s"), failed=True)
    assert state.procedure_called
    state = SessionState()
    state.ran(statement_effects(b"CREATE TEMPORARY TABLE t (a INT)"), failed=True)
    assert state.temp_tables == set()  # a failed statement leaves nothing else


def test_literal_text() -> None:
    assert literal_text(b"'SELECT 1'") == b"SELECT 1"
    assert literal_text(b"\"SELECT 'a'\"") == b"SELECT 'a'"
    assert literal_text(b"'it''s'") == b"it's"
    assert literal_text(b"'a\\'b\\nc'") == b"a'b\nc"
    assert literal_text(b"_utf8mb4'SELECT 1' ;") == b"SELECT 1"
    assert literal_text(b"@sql") is None
    assert literal_text(b"CONCAT('a', 'b')") is None
    assert literal_text(b"'a' 'b'") is None


def test_user_variable_names() -> None:
    names = user_variable_names(b"SET @a = 1, @`odd ``name` = 2, @'q' = 3, @\"d\" := @@port, "
                                b"@b.c = 4; SELECT 1 INTO @into; SELECT x@y")
    assert names == {b"a", b"odd `name", b"q", b"d", b"b.c", b"into"}


@given(st.binary(max_size=200))
def test_inspection_never_raises(sql: bytes) -> None:
    may_change_state(b"\x03" + sql, True)
    statement_effects(sql)
    user_variable_names(sql)
    literal_text(sql)


def test_handler_aliases_and_execute_immediate_using() -> None:
    assert applied(b"HANDLER t OPEN AS h", b"HANDLER h CLOSE").pins() == []
    assert applied(b"HANDLER t OPEN h", b"HANDLER h CLOSE").pins() == []
    assert "open HANDLER" in applied(b"HANDLER t OPEN AS h", b"HANDLER t CLOSE").pins()
    state = applied(b"EXECUTE IMMEDIATE 'SELECT ? INTO @x' USING 5")
    assert state.pins() == []
    state = applied(b"EXECUTE IMMEDIATE 'CREATE TEMPORARY TABLE t (a INT)' USING 1")
    assert state.temp_tables == {"t"}
    assert literal_text(b"'a' USING 1") is None  # PREPARE ... FROM takes no USING


def test_session_only_variables_are_noted_until_unset() -> None:
    state = applied(b"SET timestamp = 946684800, @@session.insert_id = 5000")
    assert state.session_only == {"timestamp", "insert_id"}
    state = applied(b"SET timestamp = 946684800", b"SET timestamp = DEFAULT")
    assert state.session_only == set()
    assert applied(b"SET @timestamp = 5").session_only == set()


def test_reading_diagnostics() -> None:
    def query(sql: bytes) -> bytes:
        return b"\x00\x00\x00\x00\x03" + sql

    for sql in (b"SHOW WARNINGS", b"show count(*) errors", b"GET DIAGNOSTICS @n = NUMBER",
                b"SELECT @@warning_count", b"SELECT @@session.error_count",
                b"SELECT FOUND_ROWS()", b"SELECT row_count()"):
        assert reads_diagnostics(query(sql)), sql
    assert not reads_diagnostics(query(b"SELECT 1"))
    execute = b"\x00\x00\x00\x00\x17\x01\x00\x00\x00"
    assert reads_diagnostics(execute, b"SELECT FOUND_ROWS()")
    assert not reads_diagnostics(execute, b"SELECT ?")


def test_a_statement_prepared_from_a_variable_pins_until_deallocated() -> None:
    state = applied(b"SET @q = 'SELECT 1'", b"PREPARE s FROM @q")
    assert any("prepared from a variable" in p for p in state.pins())
    assert applied(b"PREPARE s FROM @q", b"DEALLOCATE PREPARE s").pins() == []
    assert applied(b"PREPARE s FROM @q", b"PREPARE s FROM 'SELECT 2'").pins() == []


def test_hostile_whitespace_does_not_stall_the_parsers() -> None:
    """Runs of spaces before a stray byte made the old patterns backtrack for minutes (a KILL
    or PREPARE is parsed on the event loop, before any backend sees it)."""
    from tiproxy.session.commands import (  # noqa: PLC0415
        is_unmapped_kill,
        parse_kill_query,
        split_kill_expression,
    )

    tail = b" " * 200_000 + b"x"
    assert parse_kill_query(b"KILL 1" + tail) is None
    assert is_unmapped_kill(b"KILL 1" + tail)
    parts = split_kill_expression(b"KILL 1" + tail)
    assert parts is not None and parts.expression.endswith(b"x")
    assert literal_text(b"'x'" + tail) is None
    assert effects(b"PREPARE s FROM 'x'" + tail) is not None


def test_user_variable_names_past_the_servers_limit_are_not_kept() -> None:
    state = SessionState()
    state.note_user_vars({b"a" * 10_000, b"ok"})
    assert state.user_var_names == {b"ok"}


@pytest.mark.parametrize("pin", [
    {"temp_tables": {"t"}}, {"named_locks": {"a"}}, {"table_locks": True}, {"handlers": {"t"}},
    {"no_credential": "no reusable credential"}, {"opaque": "a statement"},
    {"hidden": "a temporary table the proxy did not see"}, {"opaque_prepared": {"s"}},
    {"long_data": True}, {"cursor_open": True}, {"profiling": True}, {"role_set": True},
    {"next_transaction": True}, {},
])
def test_pinned_says_what_pins_says(pin: dict[str, object]) -> None:
    """The rebalancer's quick test (every session, once a second) agrees with the reasons."""
    state = SessionState()
    state.stmts[1] = PreparedStatement(1, 1, b"SELECT ?", 1, 1)
    for name, value in pin.items():
        setattr(state.stmts[1] if name in ("long_data", "cursor_open") else state, name, value)
    assert state.pinned() == bool(state.pins()) == bool(pin)
    assert not SessionState().pinned()


def test_a_statement_text_is_read_once_and_any_buffer_still_works() -> None:
    """memo_by_text: the same text gives the same (shared) result without a second reading;
    a bytearray, which cannot be a key, is read afresh and agrees; long texts are not kept."""
    sql = b"CREATE TEMPORARY TABLE memo_t (a INT)"
    first = statement_effects(sql)
    assert statement_effects(bytes(sql)) is first
    assert first.temp_created == ("memo_t",)
    again = statement_effects(bytearray(sql))
    assert again == first and again is not first
    long_sql = sql + b" " * MEMO_MAX_LEN
    assert statement_effects(long_sql) == first and statement_effects(long_sql) is not first


def test_a_session_setting_its_own_password_is_read_and_never_shown() -> None:
    for sql, want in ((b"SET PASSWORD = PASSWORD('n3w')", b"n3w"),
                      (b"set password for current_user() = password(\"it''s\") ;", b"it''s"),
                      (b"SET PASSWORD FOR CURRENT_USER = PASSWORD('a\\'b\\\\c')", b"a'b\\c"),
                      (b"SET PASSWORD = PASSWORD('')", b"")):
        fx = statement_effects(sql)
        assert fx.own_password == want, sql
        assert bool(fx) and repr(want) not in repr(fx)
    for sql in (b"SET PASSWORD FOR bob@'%' = PASSWORD('x')",  # another account, maybe
                b"SET PASSWORD = '*0123456789ABCDEF0123456789ABCDEF01234567'",  # a hash
                b"ALTER USER CURRENT_USER() IDENTIFIED BY 'x'",  # MariaDB 10.11 ignores it
                b"SET @p = PASSWORD('x')"):
        assert statement_effects(sql).own_password is None, sql


@pytest.mark.parametrize(("sql", "on"), [
    (b"SET profiling = 1", True), (b"set @@profiling=ON", True),
    (b"SET SESSION profiling = TRUE", True), (b"SET @@local.profiling := 2", True),
    (b"SET sql_mode = '', profiling = 1", True),
    (b"SET STATEMENT profiling = 1 FOR SELECT 1", True),
    (b"SET profiling = 0", False), (b"SET profiling = OFF", False),
    (b"SET profiling = DEFAULT", False), (b"SET profiling_history_size = 20", False),
    (b"SET @profiling = 1", False), (b"SELECT 'SET profiling = 1'", False),
])
def test_profiling_turned_on_pins_for_the_connections_life(sql: bytes, on: bool) -> None:
    """The server keeps the profiles SHOW PROFILES lists with the connection, through
    COM_RESET_CONNECTION too: a session that turned profiling on stays, whatever follows."""
    state = applied(sql, b"SET profiling = 0")
    assert ("profiling" in state.pin_kinds()) is on
    state.reset()
    assert state.pinned() is on


@pytest.mark.parametrize(("statements", "waiting"), [
    ([b"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"], True),
    ([b"set  transaction read only", b"SELECT 1"], True),
    ([b"SET\n  TRANSACTION ISOLATION LEVEL READ COMMITTED"], True),
    ([b"/* c */ SET TRANSACTION READ WRITE"], True),
    ([b"SET TRANSACTION ISOLATION LEVEL READ COMMITTED", b"BEGIN"], False),
    ([b"SET TRANSACTION READ ONLY; START TRANSACTION"], False),
    ([b"BEGIN", b"COMMIT", b"SET TRANSACTION READ ONLY"], True),
    ([b"SET SESSION TRANSACTION ISOLATION LEVEL SERIALIZABLE"], False),  # a variable: carried
    ([b"SET GLOBAL TRANSACTION READ ONLY"], False),
    ([b"SET @transaction = 1"], False),
])
def test_set_transaction_for_the_next_one_pins_until_a_transaction_begins(
        statements: list[bytes], waiting: bool) -> None:
    """Every statement read, as while a move is due (BEGIN is read only then)."""
    state = SessionState()
    for sql in statements:
        state.apply(statement_effects(sql))
    assert ("next_transaction" in state.pin_kinds()) is waiting
    state.reset()
    assert not state.pinned()


@pytest.mark.parametrize("sql", [b"SET\tROLE r", b"set\nrole r", b"SET\r\nTRANSACTION READ ONLY",
                                 b"SET/**/ROLE r", b"SET#x\nROLE r", b"USE\ttest", b"use\ntest"])
def test_set_and_use_followed_by_any_space_or_comment_are_read(sql: bytes) -> None:
    """The fast path's four-byte look: `SET\t` and `USE\n` are SET and USE (a role set there
    went unseen, and a move gave the session the account's default role)."""
    assert may_change_state(b"\x03" + sql, False)
