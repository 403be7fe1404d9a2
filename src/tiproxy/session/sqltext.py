"""Three small readings of statement texts that several parts of the session share.

`user_variable_names`: the user variables a statement names, where the server cannot list a
session's own (a move carries them, net/records.py and net/state_capture.py).
`reads_diagnostics`: whether a command reads what the statement before it left (warnings,
FOUND_ROWS(), the optimizer trace), which a move, a checkpoint or a capture must not come
between. `memo_by_text`: an analysis of a statement text, remembered for the texts an
application sends again and again (session/statements.py, session/rebuild.py).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import TypeVar

from tiproxy.protocol.codec import Buffer

# A user variable: @name, @`name`, @'name' or @"name" (not @@, a system variable).
_USER_VAR = re.compile(
    rb"(?<![@\w$])@(`(?:[^`]|``)+`|'(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.|\"\")*\""
    rb"|[A-Za-z0-9_$.]+)")


def user_variable_names(sql: bytes) -> set[bytes]:
    """Every user variable a statement names (set or read: reading one is harmless to carry).
    Used where the server cannot list a session's user variables."""
    names = set()
    for found in _USER_VAR.findall(sql):
        quote = found[:1]
        names.add(found[1:-1].replace(quote + quote, quote) if quote in (b"`", b"'", b'"')
                  else found)
    return names


# Statements that read what the previous statement left: its warnings and errors, FOUND_ROWS(),
# ROW_COUNT(), its optimizer trace (https://mariadb.com/kb/en/show-warnings/ ,
# .../get-diagnostics/ , .../information-schema-optimizer_trace-table/).
_DIAGNOSTICS = re.compile(
    rb"SHOW\s+(?:COUNT\s*\(\s*\*\s*\)\s+)?(?:WARNINGS|ERRORS)|GET\s+(?:CURRENT\s+)?DIAGNOSTICS"
    rb"|@@(?:SESSION\.|LOCAL\.)?(?:WARNING_COUNT|ERROR_COUNT)|FOUND_ROWS\s*\(|ROW_COUNT\s*\("
    rb"|OPTIMIZER_TRACE\b",
    re.IGNORECASE)


def reads_diagnostics(packet: Buffer, prepared_sql: bytes | None = None) -> bool:
    """Whether a command packet (with its 4-byte header) reads the last statement's
    diagnostics: a move waits until after it, so it reads them on the backend that has them.
    `prepared_sql`: the text of the statement a COM_STMT_EXECUTE runs."""
    if len(packet) <= 5:
        return False
    if packet[4] in (0x03, 0x16):  # COM_QUERY, or COM_STMT_PREPARE (SHOW WARNINGS, prepared)
        return _DIAGNOSTICS.search(packet, 5) is not None
    if packet[4] == 0x19:  # COM_STMT_CLOSE leaves them to the command after it, which may
        return True  # read them (mysqltest --ps-protocol: execute, close, SHOW WARNINGS)
    return prepared_sql is not None and _DIAGNOSTICS.search(prepared_sql) is not None


_T = TypeVar("_T")
MEMO_MAX_LEN = 512  # longer statements are read afresh: they are rarely sent twice word for word
MEMO_ENTRIES = 1024


def memo_by_text(analyse: Callable[[bytes], _T]) -> Callable[[bytes], _T]:
    """`analyse`, remembered for the last MEMO_ENTRIES short statement texts.

    Applications send the same statements again and again: a driver's `SET NAMES` and
    `SET autocommit` at every connect, an ORM's `BEGIN`. Reading one costs tens of regular
    expression matches; a repeat costs a hash lookup. The analysis must depend on the text alone,
    and its result is shared by every caller: nobody may change it. Only `bytes` are remembered
    (a bytearray cannot be a key, and could change after).
    """
    remembered = functools.lru_cache(maxsize=MEMO_ENTRIES)(analyse)

    @functools.wraps(analyse)
    def lookup(sql: bytes) -> _T:
        if sql.__class__ is bytes and len(sql) <= MEMO_MAX_LEN:
            return remembered(sql)
        return analyse(sql)

    return lookup
