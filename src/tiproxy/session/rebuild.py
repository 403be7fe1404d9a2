"""What it takes to rebuild a session on another backend when its own is gone (no I/O here).

Theory of operation
-------------------
A move reads a session's state from its old backend. A backend that died can be asked nothing,
so the proxy keeps, beside each session, what rebuilding needs without it (net/checkpoints.py):
- the parts it follows itself as statements pass: the current database, server-side and SQL
  prepared statements, the credential;
- a checkpoint: the variables as the server reported them at the last capture (a move's, or one
  taken for this purpose);
- since the checkpoint, the assignments of literals (`SET @a = 5, time_zone = '+01:00'`), kept
  as statements to run again: the last one of each variable is all that counts, so they are
  bounded by the variables a session uses. A literal means the same on any backend;
- and whether a statement since then may have changed variables in a way only the server can
  tell ("stale"): USER after one that assigns a user variable from an expression
  (`SELECT @n := @n + 1`, `... INTO @v`, `SET @t = NOW()`), SYSTEM after one that assigns a
  system variable from an expression (`SET sql_mode = CONCAT(@@sql_mode, ',STRICT_...')`,
  which Connector/J sends at every connect: the checkpoint reads those by name and keeps their
  values as assignments to run again), ALL after one that may set anything (`CALL`,
  `EXECUTE`, `SET CHARACTER SET`, an expression assigned to a character set variable). A
  change of the connection's character set (`SET NAMES utf8mb4`, what many drivers send
  first) is a replay too, but only while no replay before it holds a quoted literal, whose
  bytes were read under the old character set (`charset_change`). The degrees exist because
  reading variables by name costs a tenth of a millisecond and reading every system variable
  two.
A stale session takes a new checkpoint when its next command arrives (before the command runs,
unless the command reads the last statement's diagnostics, which the capture would clear); a
session whose backend dies while it is stale cannot be rebuilt faithfully, and is closed.

This module reads statements for that: `variable_changes` (what a statement adds to the replays
and how stale it leaves the checkpoint) and `retryable` (whether a command whose backend died
before answering may simply run again elsewhere: it reads and changes nothing).

Not seen (documented limits): variables set inside a stored function called by a statement that
names no variable; such a statement leaves the checkpoint as it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tiproxy.protocol.constants import Command
from tiproxy.session.dialects.mysql_restore import CapturedState
from tiproxy.session.sqltext import memo_by_text, user_variable_names
from tiproxy.session.statements import skip_leading, split_statements

# How stale: nothing; user variables; those and system variables assigned from expressions,
# read back by name (VariableChanges.system_names); anything.
VARS_NONE, VARS_USER, VARS_SYSTEM, VARS_ALL = 0, 1, 2, 3

_WORD = re.compile(rb"[A-Za-z_]+")
_SET_STATEMENT = re.compile(rb"SET\s+STATEMENT\s+.*?\bFOR\s+", re.IGNORECASE | re.DOTALL)
# SET TRANSACTION sets the next transaction's characteristics only: nothing that lasts.
_SET_TRANSACTION = re.compile(rb"SET\s+(?:SESSION\s+|LOCAL\s+)?TRANSACTION\b", re.IGNORECASE)
_EXECUTE_IMMEDIATE = re.compile(rb"EXECUTE\s+IMMEDIATE\s*('(?:[^'\\]|\\.|'')*')\s*;?\s*\Z",
                                re.IGNORECASE | re.DOTALL)
# A user variable named (`@a`, `@'a'`), not a system one (`@@a`); and what assigns one.
_USER_VAR = re.compile(rb"(?<![@\w$])@(?!@)")
_ASSIGNS = re.compile(rb":=|\bINTO\s*@", re.IGNORECASE)
# One item of a SET list: [scope] target = value, the target a user variable (@a, @`a`), a
# system variable (@@[session.|local.|global.]name) or a bare name.
_SET_ITEM = re.compile(
    rb"\s*(?P<scope>(?:SESSION|LOCAL|GLOBAL)\s+)?(?P<assign>(?:"
    rb"@(?P<user>`(?:[^`]|``)+`|'(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.|\"\")*\"|[A-Za-z0-9_$.]+)"
    rb"|@@(?P<sys>[A-Za-z0-9_$.]+)|(?P<bare>[A-Za-z_][A-Za-z0-9_$]*))"
    rb"\s*:?=(?P<value>.*))\Z", re.IGNORECASE | re.DOTALL)
# A value that evaluates to itself: a number, a string (with an introducer or a COLLATE), a
# hexadecimal or bit literal, NULL, TRUE, FALSE, DEFAULT.
_LITERAL = re.compile(
    rb"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
    rb"|(?:_[A-Za-z0-9]+\s*)?(?:'(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.|\"\")*\""
    rb"|0x[0-9A-Fa-f]+|[xX]'[0-9A-Fa-f]*'|0b[01]+|[bB]'[01]*')(?:\s*COLLATE\s+[A-Za-z0-9_]+)?"
    rb"|NULL|TRUE|FALSE|DEFAULT",
    re.IGNORECASE)
# A system variable's value may be a bare word (SET sql_mode = ANSI, autocommit = ON).
_WORD_VALUE = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")
# A system variable's name, as the proxy may write it into a statement of its own.
_NAME = re.compile(rb"[a-z_][a-z0-9_]*")
# What `SET name = ...` may name that is no session variable.
_NOT_VARIABLES = frozenset((b"password",))
# System variables whose value decides how the connection reads a literal's bytes.
_CHARSET_NAMES = (b"character_set", b"collation", b"names")
# SET NAMES charset [COLLATE collation]: the names quoted or not (DEFAULT included).
_NAMES = re.compile(
    rb"\s*NAMES\s+(?:'[^']*'|\"[^\"]*\"|[A-Za-z0-9_]+)"
    rb"(?:\s+COLLATE\s+(?:'[^']*'|\"[^\"]*\"|[A-Za-z0-9_]+))?\s*\Z", re.IGNORECASE)
# Statements that only read: run again on another backend they give the same answer (of the
# data as it is there) and change nothing.
_READ_WORDS = frozenset((b"SELECT", b"SHOW", b"DESCRIBE", b"DESC", b"EXPLAIN", b"HELP",
                         b"VALUES", b"WITH", b"TABLE"))
# BEGIN [WORK], START TRANSACTION [READ ONLY|READ WRITE|WITH CONSISTENT SNAPSHOT], ROLLBACK.
_TRANSACTION_WORDS = frozenset((b"BEGIN", b"START", b"ROLLBACK"))
_TRANSACTION_START = re.compile(
    rb"(?:BEGIN(?:\s+WORK)?|START\s+TRANSACTION(?:\s+(?:READ\s+ONLY|READ\s+WRITE|WITH\s+"
    rb"CONSISTENT\s+SNAPSHOT)\s*,?)*|ROLLBACK(?:\s+WORK)?)\s*\Z", re.IGNORECASE)
# What makes a reading statement do more: locking reads, writing a file or a variable, named
# locks, sequences, setting LAST_INSERT_ID, EXPLAIN ANALYZE (which runs the statement).
_NOT_READ_ONLY = re.compile(
    rb"\bFOR\s+UPDATE\b|\bLOCK\s+IN\s+SHARE\s+MODE\b|\bINTO\b|_LOCKS?\s*\(|\bNEXTVAL\s*\("
    rb"|\bNEXT\s+VALUE\b|\bSETVAL\s*\(|\bLASTVAL\s*\(|\bPREVIOUS\s+VALUE\b"
    rb"|\bLAST_INSERT_ID\s*\(\s*[^\s)]|\bANALYZE\b|:=",
    re.IGNORECASE)
# Statements that may assign user variables and change nothing else, and what makes them do
# more (locking reads, files, locks, sequences, LAST_INSERT_ID(expr), EXPLAIN ANALYZE).
_ASSIGNING_WORDS = frozenset((b"SELECT", b"SET", b"DO", b"VALUES", b"WITH"))
_NOT_ASSIGN_ONLY = re.compile(
    rb"\bFOR\s+UPDATE\b|\bLOCK\s+IN\s+SHARE\s+MODE\b|\bINTO\s+(?:OUT|DUMP)FILE\b|_LOCKS?\s*\("
    rb"|\bNEXTVAL\s*\(|\bNEXT\s+VALUE\b|\bSETVAL\s*\(|\bLASTVAL\s*\(|\bPREVIOUS\s+VALUE\b"
    rb"|\bLAST_INSERT_ID\s*\(\s*[^\s)]|\bANALYZE\b|\bGLOBAL\b",
    re.IGNORECASE)
MAX_RERUN_NAMES = 64  # a capture reads each by name: a statement naming more is left stale
# Commands that change nothing, or whose effect the proxy records only once they answer, and
# that may therefore be sent again to the new backend when the old one died before answering.
_RETRYABLE_COMMANDS = frozenset((Command.PING, Command.INIT_DB, Command.STMT_PREPARE,
                                 Command.FIELD_LIST, Command.STATISTICS))


def _first_word(sql: bytes) -> tuple[bytes, bytes]:
    """(the first keyword, upper case; the statement from it on)."""
    body = sql[skip_leading(sql):]
    word = _WORD.match(body)
    return (word.group(0).upper() if word else b""), body


@dataclass(frozen=True)
class Snapshot:
    """What a rebuild restores on a new backend: the checkpoint's state (the current database
    as the proxy follows it), then the assignments made since, in order."""

    state: CapturedState
    replays: tuple[bytes, ...]


@dataclass
class VariableChanges:
    """What one COM_QUERY may do to the session's variables."""

    # Assignments of literals, each one `SET` statement the proxy can run again word for word:
    # (key, statement). The key names what it sets ("@a", "time_zone"): a later assignment of
    # the same key makes an earlier one pointless.
    replays: list[tuple[bytes, bytes]] = field(default_factory=list)
    stale: int = VARS_NONE  # what it may have changed that only a capture can tell
    # USER staleness of a statement that reads and assigns user variables and changes nothing
    # else (`SELECT @n := @n + 1`, `SET @t = NOW()`): the variables it names, which a capture
    # right after its answer reads back, and it may run again if that capture cannot.
    rerun_names: frozenset[bytes] = frozenset()
    # Its replays change the connection's character set: they stand only if no replay kept
    # before them holds a quoted literal (charset_change).
    charset: bool = False
    # SYSTEM staleness: the system variables it assigned from expressions (lower case).
    system_names: frozenset[bytes] = frozenset()
    # It may have changed the current role (SET ROLE, a procedure, a prepared statement),
    # which COM_RESET_CONNECTION keeps: a kept backend connection would hand it on (pool.py).
    role: bool = False
    role_set: bool = False  # SET ROLE itself: the session's current role is its own now


@memo_by_text
def variable_changes(sql: bytes) -> VariableChanges:
    """How a COM_QUERY statement changes the session's variables. The result is shared
    (memo_by_text): read it, never change it."""
    changes = VariableChanges()
    parts = split_statements(sql)
    for i, part in enumerate(parts):
        _one(part, changes)
        if changes.stale == VARS_ALL:
            # The statements after it are not read: one of them may change the current role.
            rest = b";".join(parts[i + 1:])
            if _MAY_SET_ROLE.search(rest):
                changes.role = True
                changes.role_set = changes.role_set or bool(_SET_ROLE_ANYWHERE.search(rest))
            break
    if changes.stale == VARS_USER and _assigns_only(sql):
        names = user_variable_names(sql)
        if len(names) <= MAX_RERUN_NAMES:
            changes.rerun_names = frozenset(names)
    return changes


def _assigns_only(sql: bytes) -> bool:
    """Whether every statement only reads and assigns user variables (so that running it once
    more, in place of a first run whose answer the client never got, changes nothing else)."""
    for part in split_statements(sql):
        word, body = _first_word(part)
        if word not in _ASSIGNING_WORDS or _NOT_ASSIGN_ONLY.search(body):
            return False
    return True


def _one(sql: bytes, changes: VariableChanges) -> None:
    word, body = _first_word(sql)
    if word in _COMPOUND or (word == b"BEGIN" and _NOT_ATOMIC.match(body)):
        changes.stale = VARS_ALL  # MariaDB's compound statements may set anything, a role too
        changes.role = True
        changes.role_set = changes.role_set or bool(_SET_ROLE_ANYWHERE.search(body))
    elif word == b"SET":
        if m := _SET_STATEMENT.match(body):
            _one(body[m.end():], changes)  # its variables hold for that one statement only
        elif not _SET_TRANSACTION.match(body):
            _set(body[3:], changes)
    elif word in (b"CALL", b"EXECUTE"):
        m = _EXECUTE_IMMEDIATE.match(body)
        if m is not None:  # a literal: what it runs is readable (quotes unescaped loosely)
            _one(m.group(1)[1:-1].replace(b"''", b"'"), changes)
        else:  # a procedure or a prepared statement may set anything
            changes.stale = VARS_ALL
            changes.role = True
    elif _USER_VAR.search(body) and _ASSIGNS.search(body):
        changes.stale = max(changes.stale, VARS_USER)  # SELECT @n := ..., ... INTO @v


_ROLE = re.compile(rb"\s*(DEFAULT\s+)?ROLE\b", re.IGNORECASE)
_SET_ROLE_ANYWHERE = re.compile(rb"\bSET\s+ROLE\b", re.IGNORECASE)
_MAY_SET_ROLE = re.compile(rb"\bROLE\b|\bCALL\b|\bEXECUTE\b|\bNOT\s+ATOMIC\b|"
                           rb"(?:^|;)\s*(?:IF|CASE|LOOP|WHILE|REPEAT|FOR)\b", re.IGNORECASE)
# Statements that are MariaDB compound statements outside a stored program
# (https://mariadb.com/kb/en/using-compound-statements-outside-of-stored-programs/).
_COMPOUND = frozenset((b"IF", b"CASE", b"LOOP", b"WHILE", b"REPEAT", b"FOR"))
_NOT_ATOMIC = re.compile(rb"BEGIN\s+NOT\s+ATOMIC\b", re.IGNORECASE)
_HEX_LITERAL = re.compile(rb"[xX]'[0-9A-Fa-f]*'")


def quotes(statement: bytes) -> bool:
    """Whether a kept assignment holds a quoted literal, whose bytes the connection's character
    set decided (a hexadecimal one, as the proxy's own read-back assignments write, did not)."""
    text = _HEX_LITERAL.sub(b"", statement)
    return b"'" in text or b'"' in text


def charset_change(changes: VariableChanges, kept: list[bytes]) -> bool:
    """Whether `changes` changes the character set after an assignment `kept` holds a quoted
    literal: replayed in that order, the literal would be read under the new one."""
    return changes.charset and any(quotes(statement) for statement in kept)


def _set(assignments: bytes, changes: VariableChanges) -> None:
    """The items of a SET list: literals to replay, the rest stale."""
    scope = b""
    for item in _top_level_items(assignments):
        if _NAMES.match(item):
            if any(quotes(statement) for _, statement in changes.replays):
                changes.stale = VARS_ALL  # a literal before it in this statement: see above
                return
            changes.replays.append((b"names", b"SET " + item.strip()))
            changes.charset = True
            continue
        m = _SET_ITEM.match(item)
        if m is None:  # SET CHARACTER SET, ROLE, PASSWORD, an expression...
            changes.stale = VARS_ALL
            role = _ROLE.match(item)
            changes.role = changes.role or role is not None
            changes.role_set = changes.role_set or (role is not None and not role.group(1))
            return
        if m.group("scope"):
            scope = m.group("scope").strip().upper()
        if not m.group("user") and (
                scope == b"GLOBAL" or (m.group("sys") or b"").lower().startswith(b"global.")):
            continue  # the server's, not the session's
        if m.group("user"):
            key = b"@" + m.group("user")
            literal = _LITERAL.fullmatch(m.group("value").strip()) is not None
            if not literal:
                changes.stale = max(changes.stale, VARS_USER)
                continue
        else:
            name = (m.group("sys") or m.group("bare") or b"").lower()
            key = name.rpartition(b".")[2]
            if key in _NOT_VARIABLES:
                continue  # SET PASSWORD = ...: an account's, never the session's (nor kept)
            value = m.group("value").strip()
            fixed = bool(_LITERAL.fullmatch(value) or _WORD_VALUE.fullmatch(value))
            if not fixed and (key.startswith(_CHARSET_NAMES) or not _NAME.fullmatch(key)):
                changes.stale = VARS_ALL  # how later literals are read: only a capture knows
                return
            if not fixed:  # an expression: its value is read back by name
                changes.system_names |= {key}
                changes.stale = max(changes.stale, VARS_SYSTEM)
                continue
            if key.startswith(_CHARSET_NAMES):
                if any(quotes(statement) for _, statement in changes.replays):
                    changes.stale = VARS_ALL  # a literal before it in this statement
                    return
                changes.charset = True
        statement = b"SET " + (b"SESSION " if scope in (b"SESSION", b"LOCAL") else b"") + \
            m.group("assign").strip()
        changes.replays.append((key, statement))


def _top_level_items(text: bytes) -> list[bytes]:
    """Split at commas outside quotes and parentheses."""
    items, depth, quote, start, i = [], 0, 0, 0, 0
    n = len(text)
    while i < n:
        c = text[i]
        if quote:
            if c == 0x5C:  # backslash: skip what it escapes
                i += 1
            elif c == quote:
                quote = 0
        elif c in b"'\"`":
            quote = c
        elif c == 0x28:
            depth += 1
        elif c == 0x29:
            depth -= 1
        elif c == 0x2C and depth == 0:
            items.append(text[start:i])
            start = i + 1
        i += 1
    items.append(text[start:])
    return items


def read_only(sql: bytes) -> bool:
    """Whether a statement only reads (and may run again elsewhere with nothing changed).
    Outside a transaction (the caller's condition), starting one or rolling back is as
    harmless: nothing happened yet.

    A stored function with side effects called from a SELECT looks read-only here: the
    documented limit of retrying a read whose backend died before answering."""
    for part in split_statements(sql):
        word, body = _first_word(part)
        if word in _TRANSACTION_WORDS and _TRANSACTION_START.match(body):
            continue
        if word not in _READ_WORDS or _NOT_READ_ONLY.search(body):
            return False
    return True


def retryable(packet: bytes, prepared_sql: bytes | None) -> bool:
    """Whether a command (a whole packet, header included) may be sent again to another
    backend when its own died before the first byte of the answer: a read-only statement
    (COM_QUERY, or COM_STMT_EXECUTE of one, `prepared_sql` being its text), or a command
    whose effect the proxy records only from the answer."""
    if len(packet) < 5:
        return False
    cmd = packet[4]
    if cmd == Command.QUERY:
        return read_only(packet[5:])
    if cmd == Command.STMT_EXECUTE:
        cursor = len(packet) > 9 and packet[9] & 0x07
        return prepared_sql is not None and not cursor and read_only(prepared_sql)
    return cmd in _RETRYABLE_COMMANDS
