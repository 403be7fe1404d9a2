"""What a COM_QUERY statement does to the session beyond its result, read from its text.

The MySQL dialect has to know when a session holds something no other backend can be given:
temporary tables, named locks (GET_LOCK), table locks (LOCK TABLES), an open HANDLER; and which
SQL-level prepared statements exist (PREPARE name FROM ...), to prepare them again after a move.
None of these set a status flag, so the proxy reads them from the statements.

Cost matters: every COM_QUERY passes `may_change_state` on the hot path. It looks at the first
byte and does three substring searches; only statements that pass it are parsed with the regular
expressions below. Statements inside stored programs are not seen here: what they leave is found
at a move from the server's own counts and lists (net/migration.py).
References: https://mariadb.com/kb/en/create-table/#create-temporary-table ,
https://mariadb.com/kb/en/get_lock/ , https://mariadb.com/kb/en/lock-tables/ ,
https://mariadb.com/kb/en/prepare-statement/
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from tiproxy.protocol.codec import Buffer
from tiproxy.session.commands import MAYBE_KILL_FIRST_BYTES
from tiproxy.session.sqltext import memo_by_text

# First bytes of statements that may change what the proxy tracks (CREATE, DROP, LOCK, UNLOCK,
# PREPARE, DEALLOCATE, EXECUTE, KILL, HANDLER, XA, CALL, FLUSH, BACKUP) or that hide their first
# keyword behind whitespace or a comment. BEGIN and START matter only while a move is due, when
# every statement is looked at.
STATE_FIRST_BYTES = frozenset(b"CcDdLlUuPpHhXxEeSsFfBb") | MAYBE_KILL_FIRST_BYTES
LETTERS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# The first four letters, upper case, of the statements behind STATE_FIRST_BYTES that do change
# tracked state. COMMIT, UPDATE, DELETE, LOAD and the like start with the same letters and are
# common: a four-byte look lets them stay on the fast path.
# SET and USE are three letters: what may follow them is any whitespace or a comment's start
# (`SET\tROLE r`, `SET/**/TRANSACTION ...` are statements the server runs).
STATE_PREFIXES = frozenset((b"CREA", b"DROP", b"DEAL", b"LOCK", b"UNLO", b"PREP", b"HAND",
                            b"KILL", b"EXEC", b"FLUS", b"CALL", b"BACK",
                            *(word + bytes((after,)) for word in (b"SET", b"USE")
                              for after in b" \t\n\x0b\x0c\r/#-")))

# MariaDB's compound statements outside a stored program may set anything (a role among it):
# never relayed unread. First bytes, then the statement's start.
COMPOUND_FIRST_BYTES = frozenset(b"BbIiCcLlWwRrFf")
COMPOUND_START = re.compile(rb"(?:BEGIN\s+NOT\s+ATOMIC|IF|CASE|LOOP|WHILE|REPEAT|FOR)\b",
                            re.IGNORECASE)

_LEADING = re.compile(rb"(?:\s+|/\*.*?\*/|(?:#|--(?=\s))[^\n]*\n?)*", re.DOTALL)
_WORD = re.compile(rb"[A-Za-z_]+")
# What a `;` inside of ends no statement (strings, quoted names, comments; not `/*!...*/`,
# whose text the server reads as code), or a `;` outside all of them. A quote or comment left
# open runs to the end, as the server reads it (and the scan stays linear: a text of many open
# quotes is not read again from each one). The second form reads strings as the server does
# under NO_BACKSLASH_ESCAPES, where a backslash escapes nothing.
_OPEN_OR_END = (rb"|`(?:[^`]|``)*+(?:`|\Z)|/\*(?!M?!).*?(?:\*/|\Z)|#[^\n]*"
                rb"|--(?:[ \t\r\f\v][^\n]*|(?=\n)|\Z)|;")
_QUOTED_OR_END = re.compile(
    rb"'(?:[^'\\]|\\.?|'')*+(?:'|\Z)|\"(?:[^\"\\]|\\.?|\"\")*+(?:\"|\Z)" + _OPEN_OR_END,
    re.DOTALL)
_QUOTED_RAW_OR_END = re.compile(
    rb"'(?:[^']|'')*+(?:'|\Z)|\"(?:[^\"]|\"\")*+(?:\"|\Z)" + _OPEN_OR_END, re.DOTALL)
_IDENT = rb"(?:`(?:[^`]|``)+`|[A-Za-z0-9_$]+)"
_QUALIFIED = rb"(?:" + _IDENT + rb"\s*\.\s*)?(" + _IDENT + rb")"

_CREATE_TEMP = re.compile(
    rb"CREATE\s+(?:OR\s+REPLACE\s+)?TEMPORARY\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?" + _QUALIFIED,
    re.IGNORECASE,
)
_DROP_TABLE = re.compile(rb"DROP\s+(?:TEMPORARY\s+)?TABLES?\s+(?:IF\s+EXISTS\s+)?(.*)",
                         re.IGNORECASE | re.DOTALL)
_GET_LOCK = re.compile(rb"GET_LOCK\s*\(", re.IGNORECASE)
_RELEASE_LOCK = re.compile(rb"RELEASE_LOCK\s*\(\s*'((?:[^'\\]|\\.|'')*)'", re.IGNORECASE)
_RELEASE_ALL = re.compile(rb"RELEASE_ALL_LOCKS\s*\(", re.IGNORECASE)
_FROM = re.compile(rb"\bFROM\b", re.IGNORECASE)
_GET_LOCK_NAME = re.compile(rb"GET_LOCK\s*\(\s*'((?:[^'\\]|\\.|'')*)'", re.IGNORECASE)
_LOCK_TABLES = re.compile(rb"LOCK\s+TABLES?\b", re.IGNORECASE)
_UNLOCK_TABLES = re.compile(rb"UNLOCK\s+TABLES?\b", re.IGNORECASE)
_PREPARE = re.compile(rb"PREPARE\s+(" + _IDENT + rb")\s+FROM\s*", re.IGNORECASE)
_EXECUTE = re.compile(rb"EXECUTE\s+(" + _IDENT + rb")", re.IGNORECASE)
_USE = re.compile(rb"USE\s+(" + _IDENT + rb")\s*;?\s*\Z", re.IGNORECASE)
# SET STATEMENT var = value [, ...] FOR statement: the statement is what runs
# (https://mariadb.com/kb/en/set-statement/).
_SET_STATEMENT = re.compile(rb"SET\s+STATEMENT\s+.*?\bFOR\s+", re.IGNORECASE | re.DOTALL)
# SET TRANSACTION without SESSION or GLOBAL: characteristics (isolation level, READ ONLY) for the
# next transaction only, which no variable shows, so no capture reads them back. That
# transaction takes them, an autocommit statement on an InnoDB table too; SELECT 1 and reads of
# information_schema do not (checked on MariaDB 10.11).
_NEXT_TRANSACTION = re.compile(rb"SET\s++TRANSACTION\b", re.IGNORECASE)
_EXECUTE_IMMEDIATE = re.compile(rb"EXECUTE\s+IMMEDIATE\s*", re.IGNORECASE)
# A string literal, optionally with a character set introducer: '...' or "...", with backslash
# escapes and doubled quotes (https://mariadb.com/kb/en/string-literals/).
_LITERAL = re.compile(rb"(?:_[A-Za-z0-9]+\s*)?('(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.|\"\")*\")"
                      rb"(?P<using>\s+USING\b.*)?\Z", re.DOTALL | re.IGNORECASE)
# The session setting its own password in clear text, which a move's login then answers with:
# SET PASSWORD [FOR CURRENT_USER()] = PASSWORD('...') (https://mariadb.com/kb/en/set-password/).
# A hash, another account's name or ALTER USER: not read (MariaDB 10.11 answers OK to ALTER USER
# CURRENT_USER() IDENTIFIED BY and changes nothing); the move that fails then tells the
# session's password changed (net/server_views.py).
_OWN_PASSWORD = re.compile(
    rb"SET\s+PASSWORD\s*(?:FOR\s+CURRENT_USER\s*(?:\(\s*\))?\s*)?=\s*PASSWORD\s*\(\s*"
    rb"('(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.|\"\")*\")\s*\)\s*;?\s*\Z", re.IGNORECASE | re.DOTALL)
_ESCAPES = {b"0": b"\0", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"Z": b"\x1a"}
_DEALLOCATE = re.compile(rb"(?:DEALLOCATE|DROP)\s+PREPARE\s+(" + _IDENT + rb")", re.IGNORECASE)
# HANDLER tbl OPEN [[AS] alias]: later statements name the alias (https://mariadb.com/kb/en/handler-commands/)
_HANDLER = re.compile(rb"HANDLER\s+" + _QUALIFIED + rb"\s+(OPEN|CLOSE)\b(?:\s+(?:AS\s+)?("
                      + _IDENT + rb"))?", re.IGNORECASE)
# Session-only variables (no global value, so the capture's comparison cannot see them) that a
# client sets to pin time or the next AUTO_INCREMENT value; = DEFAULT or = 0 unsets them.
_SESSION_ONLY = re.compile(rb"(?<![@\w$])(?:@@(?:SESSION\.|LOCAL\.)?|(?:SESSION|LOCAL)\s+)?"
                           rb"(timestamp|insert_id)\s*:?=\s*(DEFAULT\b|0+(?![\d.]))?",
                           re.IGNORECASE)
SESSION_ONLY_TYPES = {"timestamp": "DOUBLE", "insert_id": "BIGINT UNSIGNED"}
# profiling = 1 (https://mariadb.com/kb/en/show-profiles/): the server keeps the statements'
# profiles with the connection, through COM_RESET_CONNECTION too (MariaDB 10.11), and SHOW
# PROFILES lists them; no other connection can show them. Any value but an off one.
_PROFILING = re.compile(rb"(?<![@\w$.])(?:@@(?:SESSION\.|LOCAL\.)?|(?:SESSION|LOCAL)\s+)?"
                        rb"profiling\s*:?=\s*+(?!(?:0+|OFF|FALSE|DEFAULT)\b)", re.IGNORECASE)
# CREATE PROCEDURE/FUNCTION/TRIGGER/EVENT/PACKAGE: the body's statements run later, elsewhere
# (inside CALL and the like), so nothing in it is read as this statement's effects.
_CREATE_ROUTINE = re.compile(
    rb"CREATE\s+(?:OR\s+REPLACE\s+)?(?:DEFINER\s*=\s*(?:CURRENT_USER(?:\s*\(\s*\))?|\S+)\s+)?"
    rb"(?:SQL\s+SECURITY\s+\w+\s+)?(?:AGGREGATE\s+)?(?:PROCEDURE|FUNCTION|TRIGGER|EVENT|PACKAGE)\b",
    re.IGNORECASE)
# FLUSH STATUS zeroes the connection's counters that SessionState.unseen compares.
_FLUSH_STATUS = re.compile(rb"FLUSH\b.*\bSTATUS\b", re.IGNORECASE | re.DOTALL)
# The connection's global read lock, or its tables' read locks for an export, until UNLOCK
# TABLES (https://mariadb.com/kb/en/flush/); and its backup stage or backup lock
# (https://mariadb.com/kb/en/backup-stage/, .../backup-lock/): held by the connection, so a
# session that holds one cannot move.
_READ_LOCK = re.compile(rb"FLUSH\s+(?:(?:NO_WRITE_TO_BINLOG|LOCAL)\s+)?TABLES?\b.*"
                        rb"\b(?:WITH\s+READ\s+LOCK|FOR\s+EXPORT)\b", re.IGNORECASE | re.DOTALL)
_BACKUP = re.compile(rb"BACKUP\s+(?:STAGE\s+(\w+)|(LOCK|UNLOCK)\b)", re.IGNORECASE)
_BEGIN = re.compile(rb"(?:BEGIN(?:\s+WORK)?|START\s+TRANSACTION\b[^;]*)\s*;?\s*\Z", re.IGNORECASE)


def may_change_state(payload: Buffer, multi_statements: bool) -> bool:
    """A cheap first look at a COM_QUERY packet payload (command byte included).

    False means the statement certainly changes nothing the proxy tracks.
    """
    if len(payload) < 2:
        return False
    first = payload[1]
    if first in STATE_FIRST_BYTES and (
        first not in LETTERS or bytes(payload[1:5]).upper() in STATE_PREFIXES
    ):
        return True
    if b"_lock" in payload or b"_LOCK" in payload or b"_Lock" in payload:
        return True  # GET_LOCK, RELEASE_LOCK, RELEASE_ALL_LOCKS (the relay inlines this test)
    return multi_statements and b";" in payload


def first_keyword(sql: bytes) -> bytes:
    """The statement's first word, upper case, after whitespace and comments."""
    m = _WORD.match(sql, skip_leading(sql))
    return m.group(0).upper() if m else b""


def skip_leading(sql: bytes) -> int:
    """Where the statement starts after whitespace and comments."""
    m = _LEADING.match(sql)
    return m.end() if m else 0


def _name(raw: bytes) -> str:
    if raw.startswith(b"`"):
        raw = raw[1:-1].replace(b"``", b"`")
    return raw.decode("utf-8", "replace").lower()


def _literal(raw: bytes) -> str:
    return raw.replace(b"''", b"'").decode("utf-8", "replace")


@dataclass
class StatementEffects:
    """What a statement does to tracked state, applied once it succeeded."""

    temp_created: tuple[str, ...] = ()  # CREATE TEMPORARY TABLE, each one in the text
    temp_dropped: tuple[str, ...] = ()
    table_locks: bool | None = None  # True: LOCK TABLES; False: UNLOCK TABLES
    named_lock: str | None = None  # GET_LOCK('name'); "" for a name that is not a literal
    lock_once: bool = False  # that GET_LOCK runs once (no table: not once per row)
    lock_released: str | None = None
    all_locks_released: bool = False
    prepared: tuple[str, bytes] | None = None  # (name, the whole PREPARE statement)
    deallocated: str | None = None
    handler_opened: str | None = None
    handler_closed: str | None = None
    begins_transaction: bool = False
    executed: str | None = None  # EXECUTE name: the effects of what `name` was prepared from
    # What a PREPARE prepares (None: nothing the proxy tracks), OPAQUE when its text is not a
    # literal (PREPARE s FROM @sql): then the proxy cannot know what EXECUTE s does.
    prepared_effects: StatementEffects | None = None
    opaque: str = ""  # why this statement's effects cannot be known (it is then a pin)
    session_only: tuple[tuple[str, bool], ...] = ()  # (timestamp|insert_id, set: True/unset)
    use_db: bytes | None = None  # USE db: the current database after it
    counts_reset: bool = False  # FLUSH STATUS: the server's counts start again from 0
    read_lock: bool | None = None  # True: FLUSH TABLES WITH READ LOCK / FOR EXPORT; False: UNLOCK
    own_password: bytes | None = field(default=None, repr=False)  # secret: never shown
    backup: bool | None = None  # True: BACKUP STAGE START, BACKUP LOCK; False: their ends
    profiling: bool = False  # SET profiling = 1 (SET STATEMENT profiling = 1 FOR ... too)
    next_transaction: bool = False  # SET TRANSACTION: for the next transaction only
    # CALL: a stored procedure ran, and may have set user variables the proxy cannot name
    # (it matters where the server cannot list them: net/migration.py)
    calls_procedure: bool = False
    # A multi-statement text's statements, each one's own effects in order, which is how
    # SessionState.apply records them (PREPARE a ...; PREPARE b ...: both); the fields above
    # merge them, for the readers that only ask whether the text does something.
    parts: tuple[StatementEffects, ...] = ()

    def __bool__(self) -> bool:
        return self != _NOTHING


_NOTHING = StatementEffects()
OPAQUE = StatementEffects(opaque="EXECUTE of a statement prepared from a text the proxy cannot "
                                 "read")


def literal_text(sql: bytes, using: bool = False) -> bytes | None:
    """The text of a statement that is one string literal (what PREPARE ... FROM and EXECUTE
    IMMEDIATE take; `using`: EXECUTE IMMEDIATE's USING list may follow); None when it is
    anything else (a variable, an expression)."""
    sql = sql.rstrip(b" \t\n\x0b\x0c\r")
    sql = sql[:-1].rstrip(b" \t\n\x0b\x0c\r") if sql.endswith(b";") else sql
    m = _LITERAL.match(sql)
    if m is None or (m.group("using") and not using):
        return None
    raw = m.group(1)
    quote = raw[:1]
    return _unescaped(raw[1:-1].replace(quote + quote, quote))


def _unescaped(body: bytes) -> bytes:
    """A literal's bytes with its backslash escapes read."""
    return re.sub(rb"\\(.)", lambda e: _ESCAPES.get(e.group(1), e.group(1)), body, flags=re.DOTALL)


def _effects_or_none(sql: bytes) -> StatementEffects | None:
    fx = statement_effects(sql) if may_change_state(b"\x03" + sql, True) else None
    return fx if fx else None


def prepared_effects(sql: bytes) -> StatementEffects | None:
    """What executing a COM_STMT_PREPARE'd statement does to tracked state, if anything."""
    return _effects_or_none(sql)


def _merge(into: StatementEffects, other: StatementEffects) -> None:
    for f in dataclasses.fields(other):
        value = getattr(other, f.name)
        if value != f.default:
            setattr(into, f.name, value)


@memo_by_text
def statement_effects(sql: bytes) -> StatementEffects:
    """Parse a statement that passed may_change_state. Statements in a multi-statement query
    are each looked at. The result is shared (memo_by_text): read it, never change it."""
    effects = StatementEffects()
    if _CREATE_ROUTINE.match(sql, skip_leading(sql)):
        return effects  # one statement, whatever semicolons its body holds
    statements = split_statements(sql)
    parts = []
    for part in statements:
        _one_statement(part, effects)
        if len(statements) > 1:
            one = StatementEffects()
            _one_statement(part, one)
            if one:
                parts.append(one)
    if len(parts) > 1:
        effects.parts = tuple(parts)
    return effects


def split_statements(sql: bytes) -> list[bytes]:
    """The statements of a multi-statement text: split at each `;` that is not inside a
    string, a quoted name or a comment (`PREPARE s FROM 'SELECT 1; SELECT 2'` is one
    statement, and its text is what a move prepares again). With a backslash in the text it
    splits where either reading of strings would (with NO_BACKSLASH_ESCAPES or without, which
    the text alone does not say): more, shorter parts, each judged on its own, can only make a
    text look like more than it is; a missed split could hide a statement."""
    if b";" not in sql:
        return [sql]
    ends = _ends(sql, _QUOTED_OR_END)
    if b"\\" in sql:
        ends = sorted(set(ends) | set(_ends(sql, _QUOTED_RAW_OR_END)))
    parts, start = [], 0
    for end in ends:
        parts.append(sql[start:end])
        start = end + 1
    parts.append(sql[start:])
    return [p for p in parts if p.strip()]


def _ends(sql: bytes, pattern: re.Pattern[bytes]) -> list[int]:
    """Where the `;`s outside every quote and comment are, by `pattern`."""
    return [m.start() for m in pattern.finditer(sql)
            if m.end() - m.start() == 1 and sql[m.start()] == 0x3B]


def _one_statement(sql: bytes, fx: StatementEffects) -> None:
    body = sql[skip_leading(sql) :]
    word = first_keyword(body)
    if word == b"SET" and _set(body, fx):
        return
    if word == b"CREATE" and (m := _CREATE_TEMP.match(body)):
        fx.temp_created += (_name(m.group(1)),)
    elif word == b"DROP":
        if m := _DEALLOCATE.match(body):
            fx.deallocated = _name(m.group(1))
        elif m := _DROP_TABLE.match(body):
            names = re.findall(_QUALIFIED, m.group(1))
            fx.temp_dropped = tuple(_name(n) for n in names)
    elif word == b"LOCK" and _LOCK_TABLES.match(body):
        fx.table_locks = True
    elif word == b"UNLOCK" and _UNLOCK_TABLES.match(body):
        fx.table_locks = False
        fx.read_lock = False
    elif word == b"PREPARE" and (m := _PREPARE.match(body)):
        fx.prepared = (_name(m.group(1)), body.strip())
        inner = literal_text(body[m.end():])
        fx.prepared_effects = OPAQUE if inner is None else _effects_or_none(inner)
    elif word == b"EXECUTE" and (m := _EXECUTE_IMMEDIATE.match(body)):
        inner = literal_text(body[m.end():], using=True)
        if inner is None:
            fx.opaque = "EXECUTE IMMEDIATE of a text the proxy cannot read"
        else:
            _merge(fx, statement_effects(inner))
    elif word == b"EXECUTE" and (m := _EXECUTE.match(body)):
        fx.executed = _name(m.group(1))
    elif word == b"USE" and (m := _USE.match(body)):
        raw = m.group(1)
        fx.use_db = raw[1:-1].replace(b"``", b"`") if raw.startswith(b"`") else raw
    if word in (b"PREPARE", b"EXECUTE"):
        return  # the text inside is looked at above (and for PREPARE only when it runs)
    if word == b"DEALLOCATE" and (m := _DEALLOCATE.match(body)):
        fx.deallocated = _name(m.group(1))
    elif word == b"HANDLER" and (m := _HANDLER.match(body)):
        if m.group(2).upper() == b"OPEN":
            fx.handler_opened = _name(m.group(3) or m.group(1))
        else:
            fx.handler_closed = _name(m.group(1))
    elif word in (b"BEGIN", b"START") and _BEGIN.match(body):
        fx.begins_transaction = True
    elif word in (b"FLUSH", b"BACKUP"):
        _server_locks(word, body, fx)
    elif word == b"CALL":
        fx.calls_procedure = True
    _lock_functions(body, fx)


def _set(body: bytes, fx: StatementEffects) -> bool:
    """A SET statement's effects; True for SET STATEMENT ... FOR, whose statement was read."""
    if m := _SET_STATEMENT.match(body):
        fx.profiling = fx.profiling or bool(_PROFILING.search(body, 0, m.end()))
        _one_statement(body[m.end():], fx)
        return True
    fx.profiling = fx.profiling or bool(_PROFILING.search(body))
    fx.next_transaction = fx.next_transaction or bool(_NEXT_TRANSACTION.match(body))
    fx.session_only += tuple((m.group(1).decode().lower(), m.group(2) is None)
                             for m in _SESSION_ONLY.finditer(body))
    _own_password(body, fx)
    return False


def _own_password(body: bytes, fx: StatementEffects) -> None:
    if m := _OWN_PASSWORD.match(body):
        raw = m.group(1)
        quote = raw[:1]
        fx.own_password = _unescaped(raw[1:-1].replace(quote + quote, quote))


def _server_locks(word: bytes, body: bytes, fx: StatementEffects) -> None:
    """FLUSH STATUS, the global read lock, backup stages and backup locks."""
    if word == b"FLUSH":
        if _FLUSH_STATUS.match(body):
            fx.counts_reset = True
        elif _READ_LOCK.match(body):
            fx.read_lock = True
    elif (m := _BACKUP.match(body)) is not None:
        stage, lock = (g.upper() if g else None for g in m.groups())
        if stage in (b"START", b"END") or lock is not None:
            fx.backup = stage == b"START" or lock == b"LOCK"


def _lock_functions(body: bytes, fx: StatementEffects) -> None:
    """GET_LOCK, RELEASE_LOCK and RELEASE_ALL_LOCKS anywhere in the statement."""
    if _GET_LOCK.search(body):
        m = _GET_LOCK_NAME.search(body)
        fx.named_lock = _literal(m.group(1)) if m else ""
        # A lock is taken as often as GET_LOCK runs (MariaDB counts them; RELEASE_LOCK gives
        # back one): once, unless the statement reads a table or names it twice.
        fx.lock_once = len(_GET_LOCK.findall(body)) == 1 and not _FROM.search(body)
    if m := _RELEASE_LOCK.search(body):
        fx.lock_released = _literal(m.group(1))
    if _RELEASE_ALL.search(body):
        fx.all_locks_released = True
