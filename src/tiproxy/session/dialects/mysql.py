"""The MySQL dialect (MariaDB, MySQL): capture a session's state with queries.

Theory of operation
-------------------
At a safe point the proxy asks the old backend, in one statement, for the current database,
LAST_INSERT_ID(), every session system variable that differs from its global value (with its
type) and the connection's character sets whatever their value (a new connection takes them
from the login's handshake, not from the global values), the session-only ones that differ
from their default (default_master_connection, skip_replication...) and the user variables
(with their types); string user variables need a second statement for their exact bytes and
collation. What it reads fills a CapturedState, which the new backend gets back in one SET
statement (session/dialects/mysql_restore.py).

Values travel as HEX() so that the session's character_set_results cannot change them on the
way. What the proxy selects must not depend on the session's character_set_connection either,
which may be ucs2, utf16 or utf32 (`SET collation_connection = ucs2_general_ci`): a string
literal and HEX()'s answer are in it, so the literals that name each row's kind are binary
(`_binary'db'`) and HEX()'s answer is converted to latin1.

Not carried over (documented limits): FOUND_ROWS(), ROW_COUNT() and warnings of the last
statement; variables only a stored program set. One-shot `SET TRANSACTION` characteristics are
not read either: they hold the session until its next transaction (SessionState.next_transaction).
References: https://mariadb.com/kb/en/information-schema-system_variables-table/ ,
https://mariadb.com/kb/en/information-schema-user_variables-table/
"""

from __future__ import annotations

from dataclasses import dataclass

from tiproxy.session.dialects.mysql_restore import (
    CapturedState,
    UserVariable,
    quoted_user_var,
    system_literal,
)

Row = list[bytes | None]


def _hex(expr: str) -> str:
    """HEX(expr) as ASCII whatever the session's character_set_connection (HEX() answers in
    it: ucs2 or utf32 would make `\0`7`\0`4 of 74)."""
    return f"CONVERT(HEX({expr}) USING latin1)"

# An explicit LIMIT: the session's own sql_select_limit would otherwise cut the capture short
# (an explicit LIMIT overrides it; a trailing one applies to the whole UNION).
_ALL_ROWS = " LIMIT 18446744073709551615"
# What the proxy reads on a session's own connection must not meet the terms the session set for
# its own statements. character_set_results re-encodes every text value, numbers too (utf32 sends
# 5 as '\0\0\0' '5'), but never a binary one: the proxy's columns are cast to BINARY.
# max_statement_time interrupts (ER_STATEMENT_TIMEOUT) and max_join_size refuses
# (ER_TOO_BIG_SELECT) a statement that reads tables: such a statement is run again with them
# lifted for its duration (https://mariadb.com/kb/en/set-statement/): sql_big_selects = 1
# rather than max_join_size, whose restoring would reset sql_big_selects. Only then, because
# SET STATEMENT reports the variables to a client that tracks them, in its next OK.
PROXY_TERMS = "SET STATEMENT max_statement_time = 0, sql_big_selects = 1 FOR "
ER_TOO_BIG_SELECT, ER_STATEMENT_TIMEOUT = 1104, 1969
# A statement sees the values SET STATEMENT gave it, and information_schema shows
# character_set_results = NULL as '': the capture reads these apart (terms_sql).
_TERMS = (("max_statement_time", "DOUBLE"), ("sql_big_selects", "BOOLEAN"),
          ("character_set_results", "ENUM"))
_CAPTURE_BASE = (
    "SELECT _binary'db' AS kind, NULL AS name, CONVERT(HEX(DATABASE()) USING latin1) AS value "
    "UNION ALL SELECT _binary'lii', NULL, LAST_INSERT_ID() "
    "UNION ALL SELECT _binary'sys', CONCAT(VARIABLE_TYPE, ' ', VARIABLE_NAME), "
    "CONVERT(HEX(SESSION_VALUE) USING latin1) "
    "FROM information_schema.SYSTEM_VARIABLES WHERE READ_ONLY = 'NO' AND ("
    "(VARIABLE_SCOPE = 'SESSION' AND NOT (SESSION_VALUE <=> GLOBAL_VALUE)) "
    # Set by the login's handshake, not from the global values: the new connection's may
    # differ from them even where the session's equal them (SET NAMES latin1 on a latin1
    # server, logged in as utf8mb4).
    "OR VARIABLE_NAME IN ('CHARACTER_SET_CLIENT', 'CHARACTER_SET_CONNECTION', "
    "'COLLATION_CONNECTION') "
    # Session-only variables with a fixed default (timestamp and insert_id have none: the
    # proxy reads those by name, when the session set them):
    "OR (VARIABLE_NAME IN ('DEFAULT_MASTER_CONNECTION', 'SKIP_REPLICATION', "
    "'SKIP_PARALLEL_REPLICATION', 'PSEUDO_SLAVE_MODE') "
    "AND NOT (SESSION_VALUE <=> DEFAULT_VALUE))) "
    "AND VARIABLE_NAME NOT IN ('MAX_STATEMENT_TIME', 'SQL_BIG_SELECTS', 'CHARACTER_SET_RESULTS') "
    # What the connection made, counted by the server wherever it was made (SessionState.unseen)
    "UNION ALL SELECT _binary'count', VARIABLE_NAME, VARIABLE_VALUE "
    "FROM information_schema.SESSION_STATUS "
    "WHERE VARIABLE_NAME IN ('COM_CREATE_TEMPORARY_TABLE', 'COM_PREPARE_SQL')"
)
_CAPTURE_USER = (
    " UNION ALL SELECT _binary'user', "
    "CONCAT(VARIABLE_TYPE, ' ', CONVERT(HEX(VARIABLE_NAME) USING latin1)), "
    "VARIABLE_VALUE FROM information_schema.USER_VARIABLES"
)
# Named locks (GET_LOCK) the connection holds, wherever it took them: only where the
# metadata_lock_info plugin is loaded (https://mariadb.com/kb/en/metadata-lock-info-plugin/).
_CAPTURE_LOCKS = (
    " UNION ALL SELECT _binary'lock', NULL, CONVERT(HEX(TABLE_SCHEMA) USING latin1) "
    "FROM information_schema.METADATA_LOCK_INFO "
    "WHERE THREAD_ID = CONNECTION_ID() AND LOCK_TYPE = 'User lock'"
)
# MariaDB's answer when a plugin's table is missing (the user_variables plugin disabled with
# --loose-skip-plugin-user-variables, metadata_lock_info not loaded):
# "Unknown table 'USER_VARIABLES' in information_schema".
ER_UNKNOWN_TABLE = 1109
USER_VARIABLES, METADATA_LOCK_INFO = "USER_VARIABLES", "METADATA_LOCK_INFO"


def capture_sql(user_variables: bool, lock_info: bool) -> str:
    """The one statement that captures a session, with the plugin tables the server has."""
    return _binary_rows(_CAPTURE_BASE + (_CAPTURE_USER if user_variables else "")
                        + (_CAPTURE_LOCKS if lock_info else ""))


def _binary_rows(union: str) -> str:
    """A UNION of the capture's rows (constant text), each value binary."""
    columns = "CAST(kind AS BINARY), CAST(name AS BINARY), CAST(value AS BINARY)"
    return f"SELECT {columns} FROM ({union}) AS capture{_ALL_ROWS}"  # noqa: S608


def lifted(sql: str, code: int) -> str | None:
    """`sql` once more with the session's limits lifted, if they are what refused it."""
    return PROXY_TERMS + sql if code in (ER_TOO_BIG_SELECT, ER_STATEMENT_TIMEOUT) else None


# performance_schema, for one backend connection (by its thread id), read by the proxy's own
# account (auth-sync-user): its tables need SELECT on performance_schema, which the sessions'
# users rarely have. First whether it is on, the connection instrumented and metadata locks
# instrumented (MariaDB and MySQL 5.7 leave that off); then the names of the connection's user
# variables (MySQL's way to list them, MariaDB's too since 10.5) and the named locks it holds.
# https://mariadb.com/kb/en/performance-schema-user_variables_by_thread-table/ ,
# https://mariadb.com/kb/en/performance-schema-metadata_locks-table/
_PS_THREAD = "(SELECT THREAD_ID FROM performance_schema.threads WHERE PROCESSLIST_ID = {id})"
_PS_BASE = (
    "SELECT _binary'ps', _binary'on', @@performance_schema "
    "UNION ALL SELECT _binary'ps', _binary'instrumented', "
    "(SELECT INSTRUMENTED FROM performance_schema.threads WHERE PROCESSLIST_ID = {id}) "
    "UNION ALL SELECT _binary'ps', _binary'mdl', "
    "(SELECT ENABLED FROM performance_schema.setup_instruments "
    "WHERE NAME = 'wait/lock/metadata/sql/mdl')"
)
_PS_USER = (" UNION ALL SELECT _binary'user', NULL, CONVERT(HEX(VARIABLE_NAME) USING latin1) "
            "FROM performance_schema.user_variables_by_thread WHERE THREAD_ID = {thread}")
_PS_LOCKS = (" UNION ALL SELECT _binary'lock', NULL, CONVERT(HEX(OBJECT_NAME) USING latin1) "
             "FROM performance_schema.metadata_locks "
             "WHERE OWNER_THREAD_ID = {thread} AND OBJECT_TYPE = 'USER LEVEL LOCK'")


def performance_schema_sql(thread_id: int, users: bool, locks: bool) -> str:
    """What performance_schema says of backend connection `thread_id`: its user variables'
    names (`users`), the named locks it holds (`locks`)."""
    sql = _PS_BASE + (_PS_USER if users else "") + (_PS_LOCKS if locks else "") + _ALL_ROWS
    return sql.format(thread=_PS_THREAD.format(id=int(thread_id)), id=int(thread_id))


@dataclass
class PerformanceSchemaView:
    """performance_schema_sql's answer. `users` / `locks` are None where it cannot tell: the
    connection is not instrumented, or (locks) metadata locks are not."""

    on: bool
    mdl_instrumented: bool
    users: list[bytes] | None
    locks: list[bytes] | None


def parse_performance_schema(rows: list[Row], users: bool, locks: bool) -> PerformanceSchemaView:
    flags: dict[bytes, bytes | None] = {}
    names: list[bytes] = []
    held: list[bytes] = []
    for kind, key, value in (_three(r) for r in rows):
        if kind == b"ps" and key is not None:
            flags[key] = value
        elif kind == b"user" and value is not None:
            names.append(bytes.fromhex(value.decode()))
        elif kind == b"lock" and value is not None:
            held.append(bytes.fromhex(value.decode()))
    on = flags.get(b"on") == b"1"
    instrumented = on and flags.get(b"instrumented") == b"YES"
    mdl = on and flags.get(b"mdl") == b"YES"
    return PerformanceSchemaView(
        on, mdl, names if users and instrumented else None,
        held if locks and instrumented and mdl else None)


# The bodies of every stored procedure, function and trigger that names a user variable: where
# nothing lists a session's user variables, their names are read from the bodies, as the
# proxy's account. The first row says whether it sees every body: information_schema shows
# an account only the routines it may use, and their bodies only with the global SELECT
# privilege; triggers only with TRIGGER (https://mariadb.com/kb/en/information-schema-routines-table/).
STORED_PROGRAM_BODIES = (
    "SELECT 'sees', COUNT(*) FROM information_schema.USER_PRIVILEGES "
    "WHERE GRANTEE = CONCAT('''', SUBSTRING_INDEX(CURRENT_USER(), '@', 1), '''@''', "
    "SUBSTRING_INDEX(CURRENT_USER(), '@', -1), '''') AND PRIVILEGE_TYPE IN ('SELECT', 'TRIGGER') "
    "UNION ALL SELECT 'body', ROUTINE_DEFINITION FROM information_schema.ROUTINES "
    "WHERE ROUTINE_DEFINITION LIKE '%@%' "
    "UNION ALL SELECT 'body', ACTION_STATEMENT FROM information_schema.TRIGGERS "
    "WHERE ACTION_STATEMENT LIKE '%@%' LIMIT 18446744073709551615"
)


def stored_program_bodies(rows: list[Row]) -> list[bytes] | None:
    """STORED_PROGRAM_BODIES' answer: the bodies, or None if the account cannot see them all."""
    if not rows or rows[0][:2] != [b"sees", b"2"]:
        return None
    return [row[1] for row in rows[1:] if len(row) == 2 and row[1] is not None]


def capture_user_sql() -> str:
    """The user variables and LAST_INSERT_ID() alone, in capture_sql's rows (a checkpoint after
    a statement that changed only user variables: a tenth of the cost of the whole capture)."""
    return _binary_rows("SELECT _binary'lii' AS kind, NULL AS name, LAST_INSERT_ID() AS value"
                        + _CAPTURE_USER)


# Which of the plugin tables the server has: asked, not read from a refusal's message, which
# the session's character_set_results can garble (utf32 leaves it empty).
PLUGIN_TABLES_SQL = (
    "SELECT CAST(TABLE_NAME AS BINARY) FROM information_schema.TABLES "
    "WHERE TABLE_SCHEMA = 'information_schema' "
    "AND TABLE_NAME IN ('USER_VARIABLES', 'METADATA_LOCK_INFO') LIMIT 18446744073709551615"
)


def plugin_tables(rows: list[Row]) -> set[str]:
    return {row[0].decode().upper() for row in rows if row and row[0] is not None}

# Column types of `SELECT @v` (https://mariadb.com/kb/en/result-set-packets/#field-types):
# how a named user variable's type is read where USER_VARIABLES is missing.
_TYPE_DOUBLE, _TYPE_NULL, _TYPE_LONGLONG, _TYPE_NEWDECIMAL = 5, 6, 8, 246
_UNSIGNED_FLAG = 0x20

# System variables never worth restoring: derived from others, or owned by the server.
_SKIP_SYSTEM = frozenset(
    {"character_set_database", "collation_database", "wsrep_trx_fragment_size"}
)
# Charsets first, then collations: a collation implies its charset, not the other way round.
# max_join_size before sql_big_selects: setting it turns sql_big_selects off.
_ORDER = ("character_set_", "collation_", "max_join_size")


def parse_capture(rows: list[Row]) -> CapturedState:
    state = CapturedState()
    for kind, key, value in (_three(r) for r in rows):
        if kind == b"db":
            state.database = bytes.fromhex(value.decode()) if value else None
        elif kind == b"lii":
            state.last_insert_id = int(value or b"0")
        elif kind == b"sys" and key is not None:
            vtype, _, name = key.decode().rpartition(" ")
            name = name.lower()
            if name not in _SKIP_SYSTEM:
                raw = bytes.fromhex(value.decode()) if value is not None else None
                state.system.append((name, vtype, raw))
        elif kind == b"lock":
            state.locks.append(bytes.fromhex(value.decode()) if value else b"")
        elif kind == b"count" and key is not None:
            state.counts[key.decode().upper()] = int(value or b"0")
        elif kind == b"user" and key is not None:
            vtype, _, hexname = key.decode().rpartition(" ")
            state.user.append(UserVariable(bytes.fromhex(hexname), vtype, value))
        elif kind not in (b"sys", b"count", b"user"):
            raise ValueError(f"unexpected capture row kind {kind!r}")  # the move does not land
    state.system.sort(key=_system_order)
    return state


def terms_sql(session_only: list[tuple[str, str]]) -> str:
    """The session's own values of _TERMS, each with its global value, wait_timeout, then
    those of `session_only` (name, type): a statement without a table, which no limit stops,
    its values binary."""
    cols = [f"CAST(@@{scope}.{name} AS BINARY)" for name, _ in _TERMS
            for scope in ("session", "global")]
    cols += [f"CAST(@@session.{name} AS BINARY)" for name in
             ["wait_timeout", *(name for name, _ in session_only)]]
    return f"SELECT {', '.join(cols)}{_ALL_ROWS}"


def apply_terms(state: CapturedState, row: Row, session_only: list[tuple[str, str]]) -> None:
    """terms_sql's answer into `state.system`: the terms where the session's value is its own."""
    join_size = any(name == "max_join_size" for name, _, _ in state.system)
    for i, (name, vtype) in enumerate(_TERMS):
        # sql_big_selects also when equal to its global value if max_join_size is restored
        # (which turns it off): it is set after it (_ORDER).
        if row[2 * i] != row[2 * i + 1] or (join_size and name == "sql_big_selects") \
                or name == "character_set_results":  # the handshake sets it, as above
            state.system.append((name, vtype, row[2 * i]))
    after = 2 * len(_TERMS)
    state.wait_timeout = float(row[after] or b"0") or None
    for (name, vtype), value in zip(session_only, row[after + 1:], strict=True):
        state.system.append((name, vtype, value))
    state.system.sort(key=_system_order)


def _three(row: Row) -> tuple[bytes, bytes | None, bytes | None]:
    if len(row) != 3 or row[0] is None:
        raise ValueError("unexpected capture row")
    return row[0], row[1], row[2]


def _system_order(item: tuple[str, str, bytes | None]) -> tuple[int, str]:
    name = item[0]
    for rank, prefix in enumerate(_ORDER):
        if name.startswith(prefix):
            return rank, name
    return len(_ORDER), name


def named_user_vars_sql(names: list[bytes], last_insert_id: bool = False) -> str:
    """Capture named user variables without USER_VARIABLES: each as itself (its column type
    says its type, its value may be re-encoded), its value as BINARY, as HEX() and with its
    COLLATION(); LAST_INSERT_ID() first if asked."""
    cols = ["CAST(LAST_INSERT_ID() AS BINARY)"] if last_insert_id else []
    for n in names:
        var = quoted_user_var(n)
        cols += [var, *(f"CAST({e} AS BINARY)" for e in (var, _hex(var), f"COLLATION({var})"))]
    return f"SELECT {', '.join(cols)}{_ALL_ROWS}"


def apply_named_user_vars(state: CapturedState, names: list[bytes], row: Row,
                          types: list[tuple[int, int]], last_insert_id: bool = False) -> None:
    """The answer of named_user_vars_sql into `state.user` (and `last_insert_id`); variables
    that are NULL (or were never set) are left out."""
    if last_insert_id:
        state.last_insert_id = int(row[0] or b"0")
        row, types = row[1:], types[1:]
    for i, name in enumerate(names):
        value, hexvalue, collation = row[4 * i + 1], row[4 * i + 2], row[4 * i + 3]
        column_type, flags = types[4 * i]
        if value is None or column_type == _TYPE_NULL:
            continue
        if column_type == _TYPE_LONGLONG:
            vtype = "INT UNSIGNED" if flags & _UNSIGNED_FLAG else "INT"
            state.user.append(UserVariable(name, vtype, value))
        elif column_type == _TYPE_NEWDECIMAL:
            state.user.append(UserVariable(name, "DECIMAL", value))
        elif column_type == _TYPE_DOUBLE:
            state.user.append(UserVariable(name, "DOUBLE", value))
        else:
            state.user.append(UserVariable(name, "VARCHAR", hexvalue,
                                           collation.decode() if collation else None))


# Column types of `SELECT @@x` that are numbers: its value goes unquoted into a SET.
_INTEGER_TYPES = frozenset({1, 2, 3, 8, 9})  # TINY, SHORT, LONG, LONGLONG, INT24
_FRACTION_TYPES = frozenset({0, 4, 5, 246})  # DECIMAL, FLOAT, DOUBLE, NEWDECIMAL


def named_system_vars_sql(names: list[str]) -> str:
    """System variables by name, each as itself (its column type says whether it is a number)
    and as BINARY (its value, which no character set re-encodes)."""
    cols = ", ".join(f"@@session.{n}, CAST(@@session.{n} AS BINARY)" for n in names)
    return f"SELECT {cols}{_ALL_ROWS}"


def named_system_assignments(names: list[str], row: Row,
                             types: list[tuple[int, int]]) -> list[tuple[str, bytes]]:
    """named_system_vars_sql's answer as (name, the SET statement that gives it back)."""
    out = []
    for i, name in enumerate(names):
        column_type, value = types[2 * i][0], row[2 * i + 1]
        vtype = "INT" if column_type in _INTEGER_TYPES else \
            "DOUBLE" if column_type in _FRACTION_TYPES else "VARCHAR"
        out.append((name, f"SET SESSION {name} = {system_literal(vtype, value)}".encode()))
    return out


def string_values_sql(state: CapturedState) -> str | None:
    """The second capture statement: exact bytes and collation of string user variables."""
    strings = state.strings()
    if not strings:
        return None
    cols = ", ".join(f"CAST({_hex(quoted_user_var(v.name))} AS BINARY), "
                     f"CAST(COLLATION({quoted_user_var(v.name)}) AS BINARY)" for v in strings)
    return f"SELECT {cols}{_ALL_ROWS}"


def apply_string_values(state: CapturedState, row: Row) -> None:
    for i, var in enumerate(state.strings()):
        hexvalue, collation = row[2 * i], row[2 * i + 1]
        var.value = hexvalue
        var.collation = collation.decode() if collation else None
