"""Migration under stress (issue 8, "How it is checked"): a long, varied script runs through the
proxy while every session is asked to move every 100 ms, and its results are compared statement
by statement with the same script run directly against the server: identical results, zero
errors, and the session really moved, dozens of times.

Theory of operation
-------------------
The proxy's two backends are two addresses of ONE MariaDB server, `127.0.0.1:PORT` and
`localhost:PORT` (the router keys backends by their address string): both runs see the same
tables, so results are comparable, while every move is a real one, a new login and a new backend
connection that gets the session's state from the proxy's capture and restore.

The script is generated deterministically (`build_script(SEED)`): session variables, user
variables of every type read back with their types, database switches (USE and COM_INIT_DB),
temporary tables, SQL PREPARE/EXECUTE/DEALLOCATE and EXECUTE IMMEDIATE, server-side prepared
statements, a server-side cursor fetched in chunks and a streamed text result, stored procedures
and a function, transactions (with SAVEPOINT, ROLLBACK, and BEGIN inside a transaction), SET
STATEMENT, GET_LOCK, LOCK TABLES, HANDLER, a fixed SET timestamp, warnings, FOUND_ROWS(),
ROW_COUNT(), LAST_INSERT_ID(), multi-statements. Nothing in it may legitimately differ between
the runs (no CONNECTION_ID(), no clock, no @@port: it is one server).

Before each run the tables are created afresh (same AUTO_INCREMENT values, same rows). One
driver, mysql-connector-python (pure Python), runs both: its text cursor, its prepared cursors
(COM_STMT_PREPARE/EXECUTE/CLOSE) and its low-level COM_STMT_FETCH. Each statement's result is
recorded as text: every result set's column names, types and flags and its rows (repr, so a
decimal's scale and a value's Python type count), the affected rows, the insert id and the
warning count; an error is recorded as its code and message. The proxy run pauses a few ms
between statements (never between a statement and the one that reads its diagnostics) and reads
the session's move count and wait reason from /api/admin/sessions after each, so a difference
can be placed among the moves. Every failing aspect is reported at once: the first differing
statements (index, text, both results, the last move before), failed moves, too few moves (with
why the session waited). `build_script(skip=...)` leaves blocks out, to narrow a failure down.
"""

from __future__ import annotations

import datetime
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import mysql.connector
import pytest

from support.backends import ADMIN_TOML, APP, BACKEND_ARGS, BACKEND_USERS, MariaDBFactory
from support.proxy import ProxyFactory, ProxyProcess
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

SEED = 8
TARGET_STEPS = 800  # the script ends with the first block past this many statements
REDIRECT_INTERVAL = 0.1
PACE_MAX = 0.004  # the proxy run's pause between statements: up to this, at random
PS_SLOTS = 3  # server-side prepared statements (prepared cursors) alive at once
MIN_MOVES = 20
SHOWN_MISMATCHES = 6

# -- the data, created afresh before each run ------------------------------------------------

SETUP = (
    "DROP DATABASE IF EXISTS stress_a",
    "DROP DATABASE IF EXISTS stress_b",
    "CREATE DATABASE stress_a",
    "CREATE DATABASE stress_b CHARACTER SET latin1",
    "CREATE TABLE stress_a.ai (id INT AUTO_INCREMENT PRIMARY KEY, v INT, note VARCHAR(40))"
    " ENGINE=InnoDB",
    "CREATE TABLE stress_a.ledger (id INT AUTO_INCREMENT PRIMARY KEY, acct INT NOT NULL,"
    " amount DECIMAL(12,2) NOT NULL) ENGINE=InnoDB",
    "INSERT INTO stress_a.ledger (acct, amount) SELECT seq % 5, seq * 1.25 FROM seq_1_to_20",
    "CREATE TABLE stress_a.here (k INT PRIMARY KEY, w VARCHAR(20))",
    "INSERT INTO stress_a.here VALUES (1, 'a one'), (2, 'a two'), (3, 'a three')",
    "CREATE TABLE stress_b.here (k INT PRIMARY KEY, w VARCHAR(20))",
    "INSERT INTO stress_b.here VALUES (1, 'b one'), (2, 'b two'), (4, 'b four'), (5, 'b five')",
    "CREATE TABLE stress_b.items (id INT PRIMARY KEY, name VARCHAR(30) CHARACTER SET utf8mb4"
    " COLLATE utf8mb4_unicode_ci, price DECIMAL(10,2), code CHAR(6)) ENGINE=InnoDB",
    "INSERT INTO stress_b.items SELECT seq, CONCAT('item-', seq, IF(seq % 7 = 0,"
    " _utf8mb4 X'F09F8E81', '')), seq * 3.5, LPAD(seq, 3, '0') FROM seq_1_to_40",
    "CREATE PROCEDURE stress_a.p_tally(IN n INT, OUT total INT)\n"
    "BEGIN\n"
    "  SET @tally = IFNULL(@tally, 0) + n;\n"
    "  SELECT n AS n, n * n AS square, @tally AS tally;\n"
    "  SET total = @tally * 10;\n"
    "END",
    "CREATE PROCEDURE stress_a.p_two()\n"
    "BEGIN\n"
    "  SELECT COUNT(*) AS ai_rows, IFNULL(MAX(id), 0) AS last_id FROM ai;\n"
    "  SELECT k, w FROM here ORDER BY k;\n"
    "END",
    "CREATE FUNCTION stress_a.f_mix(x INT) RETURNS VARCHAR(60) DETERMINISTIC\n"
    "  RETURN CONCAT('f', x * 3, '/', IFNULL(@tally, 'none'))",
)

# -- the script -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One statement (or driver command) of the script."""

    kind: str  # sql | ps | cursor | stream | initdb | ping
    sql: str
    params: tuple[Any, ...] = ()
    slot: int = 0  # ps: which prepared cursor runs it
    fetch: int = 0  # cursor: rows per COM_STMT_FETCH; stream: rows read one by one, slowly
    tight: bool = False  # the next step reads this one's diagnostics: no pause in between

    def __str__(self) -> str:
        where = f"{self.kind}{self.slot}" if self.kind == "ps" else self.kind
        params = f" params={self.params!r}" if self.params else ""
        return f"[{where}] {self.sql}{params}"


SESSION_VARIABLES: dict[str, tuple[str, ...]] = {
    "sql_mode": ("''", "'STRICT_ALL_TABLES'", "'ANSI_QUOTES,NO_ZERO_DATE'",
                 "'PIPES_AS_CONCAT,ERROR_FOR_DIVISION_BY_ZERO'", "'NO_BACKSLASH_ESCAPES'",
                 "'ONLY_FULL_GROUP_BY,STRICT_TRANS_TABLES'", "'HIGH_NOT_PRECEDENCE'",
                 "'PAD_CHAR_TO_FULL_LENGTH,NO_UNSIGNED_SUBTRACTION'", "'ANSI'", "DEFAULT"),
    "time_zone": ("'+00:00'", "'+05:30'", "'-08:00'", "'+13:00'", "DEFAULT"),
    "div_precision_increment": ("0", "2", "9", "12", "DEFAULT"),
    # not ucs2/utf16/utf32: MariaDB then refuses string values in SET (Unknown time zone)
    "collation_connection": ("'utf8mb4_bin'", "'utf8mb4_unicode_ci'", "'latin1_german1_ci'",
                             "'utf8mb3_general_ci'", "'latin1_bin'", "'utf8mb4_general_ci'"),
    "lc_time_names": ("'de_DE'", "'fr_FR'", "'ja_JP'", "'en_US'"),
    "default_week_format": ("0", "3", "5"),
    "group_concat_max_len": ("8", "64", "1024"),
    "sql_select_limit": ("5", "100", "DEFAULT"),
    "auto_increment_increment": ("1", "5", "DEFAULT"),
    "auto_increment_offset": ("1", "3", "DEFAULT"),
    "max_statement_time": ("0", "30"),
    "sql_notes": ("0", "1"),
    "tx_isolation": ("'READ-COMMITTED'", "'SERIALIZABLE'", "'REPEATABLE-READ'"),
    "max_sort_length": ("64", "1024"),
    "net_write_timeout": ("60", "90"),
    "optimizer_search_depth": ("0", "10", "62"),
}
# Whose current value the state check reads (the SYSTEM_VARIABLES check covers the rest).
STATE_SQL = (
    "SELECT DATABASE(), @@sql_mode, @@time_zone, @@div_precision_increment,"
    " @@collation_connection, @@character_set_connection, @@character_set_results,"
    " @@autocommit, @@tx_isolation, @@tx_read_only, @@lc_time_names, @@sql_select_limit,"
    " @@group_concat_max_len, @@auto_increment_increment, @@auto_increment_offset,"
    " @@default_week_format, @@sql_notes, LAST_INSERT_ID(), @@in_transaction"
)
SYSVARS_SQL = (
    "SELECT VARIABLE_NAME, SESSION_VALUE FROM information_schema.SYSTEM_VARIABLES"
    " WHERE VARIABLE_SCOPE = 'SESSION' AND NOT (SESSION_VALUE <=> GLOBAL_VALUE) ORDER BY 1"
)
USERVARS_SQL = (
    "SELECT VARIABLE_NAME, VARIABLE_TYPE, CHARACTER_SET_NAME, HEX(VARIABLE_VALUE)"
    " FROM information_schema.USER_VARIABLES ORDER BY VARIABLE_NAME"
)
# Not @acc: it only ever holds an integer (uservar() adds to it), so arithmetic on it cannot
# overflow (@i may be 2**64 - 1).
USER_VARIABLES = ("i", "u", "d", "f", "lat", "mb4", "w32", "u2", "bin", "plain", "n",
                  "`odd name`", "`ünï`")
DATA_QUERIES = (
    "SELECT 1/7, 2/3, 10/4",
    "SELECT UNIX_TIMESTAMP('2000-01-01 00:00:00'), FROM_UNIXTIME(1000000000)",
    "SELECT DATE_FORMAT('2024-03-05', '%W %M %a %b'), DAYNAME('2024-03-05'),"
    " MONTHNAME('2024-12-01')",
    "SELECT WEEK('2024-01-01'), WEEK('2024-12-31'), YEARWEEK('2021-01-03')",
    "SELECT 'a' = 'A', 'abc' < 'ABD', COLLATION('x'), CHARSET('x'), HEX('xy')",
    "SELECT GROUP_CONCAT(seq ORDER BY seq) FROM seq_1_to_30",
    "SELECT k, w FROM here ORDER BY k",
    "SELECT DATABASE(), CURRENT_USER()",
    "SELECT id, v, note FROM stress_a.ai ORDER BY id DESC LIMIT 3",
    "SELECT acct, COUNT(*), SUM(amount) FROM stress_a.ledger GROUP BY acct ORDER BY acct",
    "SELECT name, price, code FROM stress_b.items WHERE id BETWEEN 5 AND 16 ORDER BY name",
    "SELECT RAND(42), ROUND(RAND(7) * 1000), CRC32('stress')",
    "SELECT 'x' || 'y', 1 || 0, NOT 1 BETWEEN 2 AND 3",
    "SELECT seq, seq * seq FROM seq_1_to_12 ORDER BY seq DESC",
    "SELECT CAST('2024-02-29 12:34:56' AS DATETIME), CAST('12:00' AS TIME), DATE('2024-02-29')",
    "SELECT 1.5e0 * 3, 0.1e0 + 0.2e0, CAST(18446744073709551615 AS UNSIGNED),"
    " -9223372036854775808",
    "SELECT CONVERT(_utf8mb4 X'F09F9880' USING utf8mb4), _latin1 X'E9', LENGTH(_ucs2 X'00E9')",
    "SELECT COUNT(*), SUM(price), MIN(name) FROM stress_b.items",
)
# SQL-level prepared statements: (text, number of parameters). MariaDB binds a statement when
# it is prepared: its tables to the current database, its literals to collation_connection, its
# operators to sql_mode; the last two show that plainly once the session has changed those.
SQL_PREPARES = (
    ("SELECT ? - 0.5, ? DIV 3, ? * 0.5", 3),
    ("SELECT CONCAT(?, '-', ?), LENGTH(?)", 3),
    ("INSERT INTO stress_a.ai (v, note) VALUES (?, 'sqlps')", -1),  # -1: one integer
    ("SET @from_ps = ?", 1),
    ("SELECT COUNT(*), SUM(amount) FROM stress_a.ledger WHERE acct = ?", 1),
    ("SELECT DATE_FORMAT(?, '%W %d %M %Y'), UNIX_TIMESTAMP(?)", 2),
    ("SELECT k, w FROM here WHERE k <= ? ORDER BY k", 1),
    ("SELECT ? || 'x', COLLATION('lit'), 'lit' = 'LIT'", 1),
)
SQL_PREPARE_NAMES = ("s_one", "s_two", "s_three", "`s four`")
# Server-side prepared statements (a prepared cursor's operation): (text, parameter makers).
PS_OPERATIONS: tuple[tuple[str, tuple[Callable[[random.Random], Any], ...]], ...] = (
    ("SELECT ? + 1, ?, CONCAT('v', ?)",
     (lambda r: r.randint(-999, 999), lambda r: f"s{r.randint(0, 99)}",
      lambda r: Decimal(f"{r.randint(0, 999)}.{r.randint(0, 99):02d}"))),
    ("SELECT id, v, note FROM stress_a.ai WHERE id > ? ORDER BY id LIMIT 4",
     (lambda r: r.randint(0, 30),)),
    ("INSERT INTO stress_a.ai (v, note) VALUES (?, ?)",
     (lambda r: r.randint(0, 10**6), lambda r: f"ps-{r.randint(0, 999)}")),
    ("UPDATE stress_a.ai SET note = ? WHERE id = ?",
     (lambda r: f"upd-{r.randint(0, 99)}", lambda r: r.randint(1, 20))),
    ("SELECT @plain, @acc + ?, @i", (lambda r: r.randint(0, 9),)),
    ("SELECT name, price FROM stress_b.items WHERE price > ? ORDER BY id LIMIT 3",
     (lambda r: Decimal(f"{r.randint(0, 120)}.5"),)),
    ("SELECT ?, ?, ?, ?", (lambda r: None, lambda r: bytes([r.randint(0, 255), 0, 255]),
                           lambda r: datetime.date(2024, 2, r.randint(1, 29)),
                           lambda r: r.random() * 1000)),
    ("SELECT CAST(? AS DECIMAL(20,6)) / 3, ? / 7", (lambda r: Decimal(r.randint(1, 10**6)),
                                                     lambda r: r.randint(1, 99))),
    ("SELECT k, w FROM here WHERE k >= ? ORDER BY k", (lambda r: r.randint(0, 3),)),
    ("CALL stress_a.p_tally(?, @ps_out)", (lambda r: r.randint(1, 9),)),
)
SET_STATEMENTS = (
    "SET STATEMENT max_statement_time=20 FOR SELECT COUNT(*) FROM seq_1_to_5000",
    "SET STATEMENT sql_select_limit=3 FOR SELECT seq FROM seq_1_to_10",
    "SET STATEMENT div_precision_increment=10, time_zone='+02:00' FOR"
    " SELECT 1/7, UNIX_TIMESTAMP('2001-02-03 04:05:06')",
    "SET STATEMENT sql_mode='PIPES_AS_CONCAT' FOR SELECT 'a' || 'b'",
    "SET STATEMENT lc_time_names='de_DE' FOR SELECT DATE_FORMAT('2024-03-05', '%W %M')",
    "SET STATEMENT sql_select_limit=2, group_concat_max_len=5 FOR"
    " SELECT GROUP_CONCAT(seq), COUNT(*) FROM seq_1_to_9 GROUP BY seq % 3",
)


class ScriptBuilder:
    """Blocks of statements drawn at random (from one seed), until the script is long enough.

    Blocks that pin the session (a transaction, a temporary table, a lock, HANDLER) run a few
    ordinary blocks inside; the rest move freely wherever a redirect finds them.
    """

    def __init__(self, seed: int, skip: Collection[str] = ()) -> None:
        self.rng = random.Random(seed)
        # Block names (or "sysvar:NAME") to leave out, to narrow a failure down.
        self.skip = set(skip)
        self.steps: list[Step] = []
        self.sql_prepared: dict[str, int] = {}  # name -> parameters
        self.temp_tables = 0

    def add(self, sql: str, kind: str = "sql", **kw: Any) -> None:
        self.steps.append(Step(kind, sql, **kw))

    def build(self, target: int) -> list[Step]:
        self.add(STATE_SQL)
        self.add(SYSVARS_SQL)
        blocks = self._blocks()
        names = list(blocks)
        weights = [blocks[n][1] for n in names]
        while len(self.steps) < target:
            name = self.rng.choices(names, weights)[0]
            if name not in self.skip:
                blocks[name][0]()
        self.add(STATE_SQL)
        self.add(SYSVARS_SQL)
        self.add(USERVARS_SQL)
        self.add("SELECT COUNT(*), SUM(v), MAX(id) FROM stress_a.ai")
        self.add("SELECT COUNT(*), SUM(amount) FROM stress_a.ledger")
        return self.steps

    def _blocks(self) -> dict[str, tuple[Callable[[], None], int]]:
        return {
            "sysvar": (self.sysvar, 10), "names": (self.names, 2), "uservar": (self.uservar, 10),
            "read_uservars": (self.read_uservars, 7), "state": (self.state, 4),
            "use": (self.use, 4), "data": (self.data, 10), "sqlps": (self.sqlps, 8),
            "execute_immediate": (self.execute_immediate, 2), "ps": (self.ps, 9),
            "cursor": (self.cursor, 2), "stream": (self.stream, 2),
            "proc": (self.proc, 3), "trx": (self.trx, 4), "autocommit": (self.autocommit, 1),
            "temp": (self.temp, 2), "named_lock": (self.named_lock, 2),
            "lock_tables": (self.lock_tables, 1), "handler": (self.handler, 1),
            "set_statement": (self.set_statement, 3), "diagnostics": (self.diagnostics, 4),
            "insert": (self.insert, 4), "timestamp": (self.timestamp, 1),
            "multi": (self.multi, 2), "ping": (self.ping, 1),
        }

    def inner(self) -> None:
        """A few ordinary blocks, for inside a pin (nothing that changes the database)."""
        inside = (self.sysvar, self.uservar, self.read_uservars, self.data, self.ps, self.insert,
                  self.diagnostics, self.set_statement, self.state)
        for _ in range(self.rng.randint(1, 4)):
            self.rng.choice(inside)()

    # -- session state ---------------------------------------------------------------------

    def sysvar(self) -> None:
        r = self.rng
        pool = sorted(n for n in SESSION_VARIABLES if f"sysvar:{n}" not in self.skip)
        chosen = r.sample(pool, r.randint(1, 3))
        form = r.choice(("SET SESSION {} = {}", "SET @@session.{} = {}", "SET {} = {}"))
        parts = [form.format(n, r.choice(SESSION_VARIABLES[n]))[4:] for n in chosen]
        self.add("SET " + ", ".join(parts))
        if r.random() < 0.5:
            self.add("SELECT " + ", ".join(f"@@{n}" for n in chosen))

    def names(self) -> None:
        self.add(self.rng.choice((
            "SET NAMES utf8mb4 COLLATE utf8mb4_unicode_ci", "SET NAMES utf8mb4",
            "SET character_set_results = utf8mb3", "SET character_set_results = utf8mb4",
            "SET SESSION TRANSACTION ISOLATION LEVEL READ UNCOMMITTED",
        )))

    def literal(self) -> str:
        """A value of one of a user variable's types, as SQL."""
        r = self.rng
        kind = r.randrange(12)
        word = "".join(r.choice("abcxyz") for _ in range(r.randint(1, 6)))
        if kind == 0:
            return str(r.randint(-10**12, 10**12))
        if kind == 1:
            return f"CAST({r.randint(2**63, 2**64 - 1)} AS UNSIGNED)"
        if kind == 2:
            return f"{r.randint(-10**6, 10**6)}.{r.randint(0, 9999):04d}"
        if kind == 3:
            return f"{r.randint(1, 999)}.{r.randint(0, 99)}e{r.randint(-30, 30)}"
        if kind == 4:
            return f"_latin1 X'{(word + 'é').encode('latin1').hex()}' COLLATE latin1_german1_ci"
        if kind == 5:
            return f"_utf8mb4 X'{(word + '😀').encode().hex()}' COLLATE utf8mb4_bin"
        if kind == 6:
            return f"_utf32 X'{(word + '🎁').encode('utf-32-be').hex()}' COLLATE utf32_unicode_ci"
        if kind == 7:
            return f"_ucs2 X'{(word + 'ü').encode('utf-16-be').hex()}' COLLATE ucs2_bin"
        if kind == 8:
            return f"X'{r.randbytes(r.randint(1, 5)).hex()}'"
        if kind == 9:
            return f"'plain-{word}'"  # in the session's collation_connection
        if kind == 10:
            return "NULL"
        return r.choice(("@acc + 1", "(SELECT COUNT(*) FROM stress_a.ai)", "CONCAT(@plain, 'x')",
                         "1/3", "@acc * 2"))

    def uservar(self) -> None:
        r = self.rng
        form = r.randrange(5)
        if form == 0:
            names = r.sample(USER_VARIABLES, r.randint(1, 4))
            self.add("SET " + ", ".join(f"@{n} = {self.literal()}" for n in names))
        elif form == 1:
            self.add(f"SELECT {self.literal()} INTO @{r.choice(USER_VARIABLES)}")
        elif form == 2:
            self.add(f"SELECT @{r.choice(USER_VARIABLES)} := {self.literal()}")
        elif form == 3:
            self.add(f"SET @acc = IFNULL(@acc, 0) + {r.randint(1, 100)}")
        else:  # every type at once, as the fidelity test sets them
            self.add("SET @i = -42, @u = CAST(18446744073709551615 AS UNSIGNED), @d = 12.50,"
                     " @f = 0.1e0 + 0.2e0, @lat = _latin1 X'636166E9' COLLATE latin1_german1_ci,"
                     " @bin = X'00FF7F', @n = NULL, @w32 = _utf32 X'0001F600' COLLATE"
                     " utf32_unicode_ci, @u2 = _ucs2 X'00E9' COLLATE ucs2_bin")

    def read_uservars(self) -> None:
        r = self.rng
        if r.random() < 0.25:
            self.add(USERVARS_SQL)
            return
        cols = []
        for n in r.sample(USER_VARIABLES, r.randint(2, 4)):
            cols += [f"@{n}", f"HEX(@{n})", f"COLLATION(@{n})", f"@{n} + 0"]
        self.add("SELECT " + ", ".join(cols))

    def state(self) -> None:
        self.add(self.rng.choice((STATE_SQL, SYSVARS_SQL, USERVARS_SQL)))

    def use(self) -> None:
        db = self.rng.choice(("stress_a", "stress_b"))
        if self.rng.random() < 0.3:
            self.add(db, kind="initdb")
        else:
            self.add(f"USE {db}")
        self.add("SELECT DATABASE(), @@character_set_database, @@collation_database")

    # -- queries -----------------------------------------------------------------------------

    def data(self) -> None:
        self.add(self.rng.choice(DATA_QUERIES))

    def sqlps(self) -> None:
        r = self.rng
        name = r.choice(SQL_PREPARE_NAMES)
        action = r.random()
        if name not in self.sql_prepared or action < 0.15:
            text, params = r.choice(SQL_PREPARES)
            quoted = text.replace("'", "''")
            self.add(f"PREPARE {name} FROM '{quoted}'")
            self.sql_prepared[name] = params
        elif action < 0.25:
            self.add(f"DEALLOCATE PREPARE {name}")
            del self.sql_prepared[name]
            return
        params = self.sql_prepared[name]
        if params < 0:  # it inserts into an INT column: integers only, strict modes refuse text
            args = [r.choice(("@acc", str(r.randint(0, 50))))]
        else:
            args = [r.choice(("@i", "@plain", "@d", "@n", "@from_ps", str(r.randint(0, 50)),
                              "'2024-06-07 08:09:10'", "'lit'")) for _ in range(params)]
        self.add(f"EXECUTE {name} USING {', '.join(args)}")

    def execute_immediate(self) -> None:
        r = self.rng
        self.add(r.choice((
            f"EXECUTE IMMEDIATE 'SELECT {r.randint(0, 99)} * 3, CONCAT(''imm-'', DATABASE())'",
            f"EXECUTE IMMEDIATE 'SELECT ? * 3, CONCAT(''imm-'', ?)' USING {r.randint(0, 99)},"
            f" '{r.choice('pqr')}'",
            f"EXECUTE IMMEDIATE 'SET @imm = ?' USING {r.randint(0, 99)}",
        )))

    def ps(self) -> None:
        r = self.rng
        text, makers = r.choice(PS_OPERATIONS)
        self.add(text, kind="ps", params=tuple(m(r) for m in makers), slot=r.randrange(PS_SLOTS))
        if text.startswith("CALL"):
            self.add("SELECT @ps_out, @tally")

    def cursor(self) -> None:
        r = self.rng
        if r.random() < 0.5:
            self.add("SELECT seq, seq * 1.5, CONCAT('row', seq) FROM seq_1_to_37 WHERE seq > ?",
                     kind="cursor", params=(r.randint(0, 10),), fetch=r.choice((3, 5, 10)))
        else:
            self.add("SELECT id, acct, amount FROM stress_a.ledger WHERE id > ? ORDER BY id",
                     kind="cursor", params=(r.randint(0, 8),), fetch=r.choice((2, 4)))

    def stream(self) -> None:
        self.add("SELECT seq, REPEAT('x', seq % 50), seq / 7 FROM seq_1_to_300", kind="stream",
                 fetch=self.rng.randint(3, 8))

    def proc(self) -> None:
        r = self.rng
        which = r.randrange(3)
        if which == 0:
            self.add(f"CALL stress_a.p_tally({r.randint(1, 20)}, @out)")
            self.add("SELECT @out, @tally")
        elif which == 1:
            self.add("CALL stress_a.p_two()")
        else:
            self.add(f"SELECT stress_a.f_mix({r.randint(0, 50)})")

    def set_statement(self) -> None:
        self.add(self.rng.choice(SET_STATEMENTS))

    def diagnostics(self) -> None:
        r = self.rng
        which = r.randrange(3)
        if which == 0:
            # Each warns in every sql_mode: MariaDB keeps the warnings of an earlier statement
            # through one that has none and reads no table, and those are not carried.
            self.add(r.choice(("SELECT CAST('12abc' AS INT), 1/0", "DO CAST('7x' AS INT), 1/0",
                               "SELECT CAST(-1 AS UNSIGNED), CAST('x' AS DECIMAL)")), tight=True)
            self.add(r.choice(("SHOW WARNINGS", "SELECT @@warning_count",
                               "SHOW COUNT(*) WARNINGS", "GET DIAGNOSTICS @dn = NUMBER")))
        elif which == 1:
            self.add("SELECT SQL_CALC_FOUND_ROWS seq FROM seq_1_to_100 WHERE seq % 3 = 0"
                     f" LIMIT {r.randint(1, 4)}", tight=True)
            self.add("SELECT FOUND_ROWS()")
        else:
            self.add(f"UPDATE stress_a.ai SET v = v + 1 WHERE id <= {r.randint(1, 6)}",
                     tight=True)
            self.add("SELECT ROW_COUNT()")

    def insert(self) -> None:
        r = self.rng
        which = r.randrange(3)
        if which == 0:
            self.add(f"INSERT INTO stress_a.ai (v, note) VALUES ({r.randint(0, 999)}, 'one')")
        elif which == 1:
            rows = ", ".join(f"({r.randint(0, 999)}, 'multi')" for _ in range(r.randint(2, 4)))
            self.add(f"INSERT INTO stress_a.ai (v, note) VALUES {rows}")
        else:
            self.add(f"SELECT LAST_INSERT_ID({r.randint(1, 10**6)})")
        self.add("SELECT LAST_INSERT_ID(), @@last_insert_id")

    def multi(self) -> None:
        n = self.rng.randint(1, 99)
        self.add(self.rng.choice((
            f"SET @m = {n}; SELECT @m * 2, DATABASE()",
            f"SELECT {n}; SELECT @i, @plain; DO {n}",
        )))

    def ping(self) -> None:
        self.add("COM_PING", kind="ping")

    # -- pins --------------------------------------------------------------------------------

    def trx(self) -> None:
        r = self.rng
        acct = r.randint(0, 6)
        self.add(r.choice(("BEGIN", "START TRANSACTION", "START TRANSACTION WITH CONSISTENT"
                                                        " SNAPSHOT", "BEGIN WORK")))
        self.add(f"INSERT INTO stress_a.ledger (acct, amount) VALUES ({acct},"
                 f" {r.randint(1, 999)}.{r.randint(0, 99):02d})")
        self.inner()
        self.add(f"UPDATE stress_a.ledger SET amount = amount + 1 WHERE acct = {acct}")
        if r.random() < 0.3:
            self.add("SAVEPOINT sp1")
            self.add(f"INSERT INTO stress_a.ledger (acct, amount) VALUES ({acct}, 0.01)")
            self.add("ROLLBACK TO SAVEPOINT sp1")
        if r.random() < 0.3:  # BEGIN inside a transaction commits it: the shortcut's path
            self.add("BEGIN")
            self.add(f"INSERT INTO stress_a.ledger (acct, amount) VALUES ({acct}, 2.50)")
        self.add(f"SELECT COUNT(*), SUM(amount) FROM stress_a.ledger WHERE acct = {acct}")
        self.add(r.choice(("COMMIT", "COMMIT", "ROLLBACK")))
        self.add("SELECT COUNT(*), SUM(amount), @@in_transaction FROM stress_a.ledger")
        if r.random() < 0.3:
            self.add("START TRANSACTION READ ONLY")
            self.add("SELECT COUNT(*) FROM stress_a.ai")
            self.add("COMMIT")

    def autocommit(self) -> None:
        self.add("SET autocommit = 0")
        self.add(f"INSERT INTO stress_a.ai (v, note) VALUES ({self.rng.randint(0, 9)}, 'noauto')")
        self.inner()
        self.add(self.rng.choice(("COMMIT", "ROLLBACK")))
        self.add("SET autocommit = 1")
        self.add("SELECT COUNT(*), @@autocommit, @@in_transaction FROM stress_a.ai")

    def temp(self) -> None:
        self.temp_tables += 1
        name = "here" if self.rng.random() < 0.3 else f"tmp_{self.temp_tables}"
        self.add(f"CREATE TEMPORARY TABLE {name} (id INT AUTO_INCREMENT PRIMARY KEY,"
                 " k INT, w VARCHAR(30), d DECIMAL(10,3))")
        self.add(f"INSERT INTO {name} (k, w, d) VALUES (1, 'temp one', 1.5), (2, 'temp two', 2.25)")
        self.inner()
        self.add(f"SELECT k, w, d FROM {name} ORDER BY id")
        self.add(f"UPDATE {name} SET d = d * 2 WHERE k = 1")
        self.add("SELECT k, w FROM here ORDER BY k")
        self.add(f"DROP TEMPORARY TABLE {name}")
        self.add("SELECT k, w FROM here ORDER BY k")

    def named_lock(self) -> None:
        lock = f"stress_lock_{self.rng.randint(1, 3)}"
        self.add(self.rng.choice((f"SELECT GET_LOCK('{lock}', 0)", f"DO GET_LOCK('{lock}', 0)")))
        self.add(f"SELECT IS_FREE_LOCK('{lock}')")
        self.inner()
        self.add(self.rng.choice((f"SELECT RELEASE_LOCK('{lock}')", "SELECT RELEASE_ALL_LOCKS()")))
        self.add(f"SELECT IS_FREE_LOCK('{lock}')")

    def lock_tables(self) -> None:
        self.add("LOCK TABLES stress_a.ai WRITE, stress_a.ledger READ")
        self.add(f"INSERT INTO stress_a.ai (v, note) VALUES ({self.rng.randint(0, 99)}, 'locked')")
        self.add("SELECT COUNT(*), MAX(id) FROM stress_a.ai")
        self.add("SELECT SUM(amount) FROM stress_a.ledger")
        self.add("SELECT LAST_INSERT_ID()")
        self.add("UNLOCK TABLES")

    def handler(self) -> None:
        self.add("HANDLER stress_b.items OPEN AS h")
        self.add("HANDLER h READ `PRIMARY` FIRST")
        self.add("HANDLER h READ `PRIMARY` NEXT")
        self.inner()
        self.add(f"HANDLER h READ `PRIMARY` = ({self.rng.randint(1, 40)})")
        self.add("HANDLER h CLOSE")

    def timestamp(self) -> None:
        """A fixed clock: NOW() means the same in both runs until SET timestamp = DEFAULT."""
        self.add(f"SET timestamp = {946684800 + self.rng.randint(0, 10**8)}")
        self.add("SELECT NOW(), UNIX_TIMESTAMP(), CURDATE(), @@timestamp")
        self.inner()
        self.add("SELECT NOW(), UNIX_TIMESTAMP()")
        self.add("SET timestamp = DEFAULT")


def build_script(seed: int = SEED, target: int = TARGET_STEPS,
                 skip: Collection[str] = ()) -> list[Step]:
    return ScriptBuilder(seed, skip).build(target)


# -- running it -------------------------------------------------------------------------------


def _columns(description: Any) -> tuple[tuple[Any, ...], ...]:
    return tuple((d[0], d[1], d[7]) for d in description or ())


class Runner:
    """Runs steps on one mysql-connector connection; each step's result as comparable text."""

    def __init__(self, conn: Any, pause: Callable[[], None]) -> None:
        self.conn = conn
        self.pause = pause
        self.text = conn.cursor()  # unbuffered: rows are read as they are fetched
        self.prepared = [conn.cursor(prepared=True) for _ in range(PS_SLOTS)]

    def run(self, step: Step) -> str:
        try:
            return repr(getattr(self, "_" + step.kind)(step))
        except mysql.connector.Error as e:
            return f"ERROR {e.errno} ({e.sqlstate}): {e.msg}"

    def _results(self, cur: Any) -> list[Any]:
        sets: list[Any] = []
        while True:
            if cur.with_rows:
                sets.append((_columns(cur.description), cur.fetchall()))
            else:
                sets.append(("ok", cur.rowcount, cur.lastrowid))
            if not cur.nextset():
                break
        sets.append(("warnings", cur.warning_count))
        return sets

    def _sql(self, step: Step) -> list[Any]:
        self.text.execute(step.sql)
        return self._results(self.text)

    def _ps(self, step: Step) -> list[Any]:
        cur = self.prepared[step.slot]
        cur.execute(step.sql, step.params)
        if cur.with_rows:
            result: list[Any] = [(_columns(cur.description), cur.fetchall())]
        else:
            result = [("ok", cur.rowcount, cur.lastrowid)]
        while cur.nextset():  # CALL: its OK packet after the result sets
            result.append((_columns(cur.description), cur.fetchall()) if cur.with_rows
                          else ("ok", cur.rowcount))
        return [*result, ("warnings", cur.warning_count)]

    def _cursor(self, step: Step) -> list[Any]:
        """COM_STMT_EXECUTE with a read-only cursor, then COM_STMT_FETCH in chunks."""
        conn = self.conn
        stmt = conn.cmd_stmt_prepare(step.sql.encode())
        try:
            result = conn.cmd_stmt_execute(stmt["statement_id"], data=step.params,
                                           parameters=stmt["parameters"], flags=1)
            columns = result["columns"] if isinstance(result, dict) else result[1]
            chunks = []
            while True:
                self.pause()  # the session is pinned by its open cursor meanwhile
                conn.cmd_stmt_fetch(stmt["statement_id"], step.fetch)
                rows, eof = conn.get_rows(binary=True, columns=columns)
                chunks.append(rows)
                if eof is None or eof.get("status_flag", 0) & 0x80:  # LAST_ROW_SENT
                    break
        finally:
            conn.cmd_stmt_close(stmt["statement_id"])
        return [_columns(columns), chunks]

    def _stream(self, step: Step) -> list[Any]:
        """A text result read a row at a time, slowly, then the rest."""
        self.text.execute(step.sql)
        rows = []
        for _ in range(step.fetch):
            rows.append(self.text.fetchone())
            self.pause()
        rows.extend(self.text.fetchall())
        return [_columns(self.text.description), rows, self.text.warning_count]

    def _initdb(self, step: Step) -> list[Any]:
        ok = self.conn.cmd_init_db(step.sql)
        return ["init_db", ok.get("warning_count")]

    def _ping(self, step: Step) -> list[Any]:
        self.conn.ping()
        return ["pong"]


def connect(port: int, database: str = "stress_a") -> Any:
    return mysql.connector.connect(host="127.0.0.1", port=port, user=APP.name,
                                   password=APP.password, database=database, use_pure=True,
                                   autocommit=True, connection_timeout=10)


def setup_tables(server: MariaDBServer) -> None:
    conn = connect(server.port, APP.database)
    try:
        cur = conn.cursor()
        for sql in SETUP:
            cur.execute(sql)
    finally:
        conn.close()


def run_direct(server: MariaDBServer, script: list[Step]) -> list[str]:
    setup_tables(server)
    conn = connect(server.port)
    try:
        runner = Runner(conn, lambda: None)
        return [runner.run(step) for step in script]
    finally:
        conn.close()


@dataclass
class ProxyRun:
    results: list[str]
    moves_after: list[int]  # the session's move count after each step
    waits: Counter[str]  # why a requested move waited, as seen after the steps
    moves: int
    redirects: int
    redirect_errors: list[str]
    seconds: float


class Redirector(threading.Thread):
    """POST /api/debug/redirect every `interval` seconds until stopped."""

    def __init__(self, proxy: ProxyProcess, interval: float) -> None:
        super().__init__(daemon=True)
        self.proxy = proxy
        self.interval = interval
        self.sent = 0
        self.errors: list[str] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                status, body = self.proxy.api("/api/debug/redirect", method="POST", body=b"")
            except Exception as e:
                self.errors.append(repr(e))
                continue
            if status == 200:
                self.sent += 1
            else:
                self.errors.append(f"{status}: {body!r}")

    def stop(self) -> None:
        self._done.set()
        self.join(10)


def run_through_proxy(server: MariaDBServer, proxy: ProxyProcess,
                      script: list[Step]) -> ProxyRun:
    setup_tables(server)
    pacer = random.Random(SEED + 1)  # timing only: results do not depend on it

    def pause() -> None:
        time.sleep(pacer.uniform(0, PACE_MAX))

    conn = connect(proxy.port)
    redirector = Redirector(proxy, REDIRECT_INTERVAL)
    results: list[str] = []
    moves_after: list[int] = []
    waits: Counter[str] = Counter()
    try:
        session_id = conn.connection_id
        runner = Runner(conn, pause)
        started = time.monotonic()
        redirector.start()
        try:
            for step in script:
                results.append(runner.run(step))
                if step.tight:  # its diagnostics are read next, at once, as a client would
                    moves_after.append(moves_after[-1] if moves_after else 0)
                    continue
                session = proxy.session(session_id)
                moves_after.append(int(session["moves"]))
                if session["waiting"]:
                    waits[session["waiting"]] += 1
                pause()
        finally:
            redirector.stop()
        seconds = time.monotonic() - started
        moves = int(proxy.session(session_id)["moves"])
    finally:
        conn.close()
    return ProxyRun(results, moves_after, waits, moves, redirector.sent, redirector.errors,
                    seconds)


def failed_moves(proxy: ProxyProcess) -> int:
    _, body = proxy.api("/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith("tiproxy_balance_migrate_total{") and 'migrate_res="fail"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def _excerpts(a: str, b: str, width: int = 600) -> tuple[str, str]:
    """Both results whole when short, else from a little before where they first differ."""
    if len(a) <= width and len(b) <= width:
        return a, b
    pairs = enumerate(zip(a, b, strict=False))
    same = next((k for k, (x, y) in pairs if x != y), min(len(a), len(b)))
    start = max(0, same - 150)

    def cut(text: str) -> str:
        tail = "..." if len(text) > start + width else ""
        return f"[from character {start}] {text[start:start + width]}{tail}" if start \
            else text[:width] + tail

    return cut(a), cut(b)


def describe_mismatch(i: int, script: list[Step], direct: str, through: str,
                      run: ProxyRun) -> str:
    direct, through = _excerpts(direct, through)
    moved = run.moves_after[i]
    last = next((j for j in range(i, -1, -1)
                 if run.moves_after[j] != (run.moves_after[j - 1] if j else 0)), None)
    where = (f"the session had moved {moved} times by then, last just before or at"
             f" statement {last}: {script[last]}" if last is not None else "no move before it")
    return (f"statement {i} of {len(script)}: {script[i]}\n"
            f"  direct: {direct}\n  proxy:  {through}\n  ({where})")


# -- the test ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(mariadb_factory: MariaDBFactory) -> MariaDBServer:
    return mariadb_factory(BACKEND_ARGS, BACKEND_USERS)


@pytest.mark.timeout(110)
def test_a_long_varied_script_gives_the_same_results_while_moving_every_100ms(
    server: MariaDBServer, proxy_factory: ProxyFactory, record_property: Any,
) -> None:
    script = build_script()
    # Two addresses, one server: the same tables on both backends, but real moves.
    proxy = proxy_factory([server.addr, f"localhost:{server.port}"], ADMIN_TOML)
    assert len(proxy.backends()) == 2

    direct = run_direct(server, script)
    direct_errors = [f"{i}: {script[i]} -> {r}" for i, r in enumerate(direct)
                     if r.startswith("ERROR")]
    assert not direct_errors, "the script itself fails (a bug in the test):\n" + \
        "\n".join(direct_errors[:10])

    run = run_through_proxy(server, proxy, script)
    fails = failed_moves(proxy)
    summary = (f"migration stress: {len(script)} statements, {run.moves} moves,"
               f" {run.redirects} redirects in {run.seconds:.1f}s, {fails} failed moves")
    print(summary)
    record_property("statements", len(script))
    record_property("moves", run.moves)
    record_property("failed_moves", fails)

    problems = []
    mismatches = [i for i, (a, b) in enumerate(zip(direct, run.results, strict=True)) if a != b]
    if mismatches:
        errors = sum(r.startswith("ERROR") for r in run.results)
        problems.append(
            f"{len(mismatches)} statements differ ({errors} of them errors through the proxy);"
            f" the first {min(len(mismatches), SHOWN_MISMATCHES)}:\n"
            + "\n".join(describe_mismatch(i, script, direct[i], run.results[i], run)
                        for i in mismatches[:SHOWN_MISMATCHES]))
    if run.redirect_errors:
        problems.append(f"redirect requests failed: {run.redirect_errors[:5]}")
    if fails:
        lines = [ln for ln in proxy.log().splitlines() if "move" in ln and "failed" in ln]
        problems.append(f"{fails} moves failed:\n" + "\n".join(lines[:10]))
    if run.moves < MIN_MOVES:
        seen = "\n".join(f"  {n} x {why}" for why, n in run.waits.most_common(8))
        problems.append(f"only {run.moves} moves (at least {MIN_MOVES} expected); the session"
                        f" waited because:\n{seen}")
    assert not problems, summary + "\n" + "\n\n".join(problems)
