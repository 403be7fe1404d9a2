"""Commands the proxy reads or rewrites before the backend sees them.

Most commands go through untouched. These do not:
- KILL [HARD|SOFT] [CONNECTION|QUERY] <id> and COM_PROCESS_KILL carry the connection id the
  client got from the proxy; the backend knows the session by its own id.
- COM_CHANGE_USER logs in again: like the first login, it is sent with a plugin no server knows so
  that the backend answers with an AuthSwitchRequest and a salt of its own.
References: https://mariadb.com/kb/en/kill/ , https://mariadb.com/kb/en/com_change_user/
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tiproxy.protocol.codec import (
    U32,
    read_bytes,
    read_eof_bytes,
    read_lenenc_bytes,
    read_nul_bytes,
    read_u8,
)
from tiproxy.protocol.constants import Capability, Command
from tiproxy.protocol.errors import ProtocolError

# KILL [HARD | SOFT] [CONNECTION | QUERY] <thread id>, once comments are gone. "KILL QUERY ID
# <query id>" and "KILL USER <name>" name no connection id and go through untouched. \s is the
# server's whitespace too: space and 0x09 to 0x0D.
_KILL = re.compile(
    rb"\A\s*KILL\s+(?P<mode>(?:HARD|SOFT)\s+)?(?P<what>(?:CONNECTION|QUERY)\s+)?"
    rb"(?P<id>\d{1,20})\Z",
    re.IGNORECASE,
)
_KILL_WORD = re.compile(rb"kill", re.IGNORECASE)
# What may start a comment or a quoted string; "/*!" and "/*M!" comments are run by the server.
_SPECIAL = re.compile(rb"['\"`#]|/\*|--")
_EXECUTABLE = re.compile(rb"M?!\d{0,6}")
# A COM_QUERY whose first byte is one of these may be a KILL: K, k, the server's whitespace, the
# start of a comment. The relay passes anything else to the backend without parsing it.
MAYBE_KILL_FIRST_BYTES = frozenset(b"Kk \t\n\x0b\x0c\r/#-(")


@dataclass(frozen=True)
class KillRequest:
    connection_id: int
    query_only: bool
    prefix: bytes  # "KILL HARD QUERY " etc, kept so the rewritten statement keeps its options

    def for_backend(self, backend_connection_id: int) -> bytes:
        return self.prefix + str(backend_connection_id).encode()


def parse_kill_query(sql: bytes) -> KillRequest | None:
    if _KILL_WORD.search(sql) is None:
        return None
    text = _without_comments(sql)
    if text is None:
        return None
    m = _KILL.match(_statement_end(text))
    if m is None:
        return None
    what = (m.group("what") or b"").strip().upper()
    mode = (m.group("mode") or b"").strip().upper()
    prefix = b"KILL " + (mode + b" " if mode else b"") + (what + b" " if what else b"")
    return KillRequest(int(m.group("id")), what == b"QUERY", prefix)


# KILL forms that name no connection id: KILL USER <name>, KILL [..] QUERY ID <query id>.
_KILL_NO_ID = re.compile(rb"\A\s*KILL\s+(?:(?:HARD|SOFT)\s+)?(?:USER|QUERY\s+ID)\b", re.IGNORECASE)


def is_unmapped_kill(sql: bytes) -> bool:
    """A KILL whose target the proxy cannot map: an expression, a quoted or hex id. Such a
    statement must not reach a backend, which would read the id as one of its own."""
    if _KILL_WORD.search(sql) is None:
        return False
    text = _without_comments(sql)
    if text is None:
        text = sql
    if not re.match(rb"\A\s*KILL\b", text, re.IGNORECASE):
        return False
    return _KILL_NO_ID.match(text) is None and _KILL.match(_statement_end(text)) is None


_KILL_PARTS = re.compile(
    rb"\A\s*KILL\s+(?P<mode>(?:HARD|SOFT)\s+)?(?P<what>(?:CONNECTION|QUERY)\s+)?"
    rb"(?P<expr>.*)\Z", re.IGNORECASE | re.DOTALL)
_SPACE = b" \t\n\x0b\x0c\r"


def _statement_end(text: bytes) -> bytes:
    """The statement without trailing whitespace and one trailing ';' (done here, not in the
    regular expressions: a run of spaces would make them backtrack without end)."""
    text = text.rstrip(_SPACE)
    return text[:-1].rstrip(_SPACE) if text.endswith(b";") else text


@dataclass(frozen=True)
class KillExpression:
    """KILL [HARD|SOFT] [CONNECTION|QUERY] <expression>, split for the proxy to evaluate."""

    statement: bytes  # the whole KILL, as the server will parse it
    expression: bytes
    query_only: bool
    prefix: bytes  # "KILL [HARD] [QUERY] " for the rewritten statement


def split_kill_expression(sql: bytes) -> KillExpression | None:
    """The parts of a KILL whose id is an expression; None if the proxy cannot take it apart
    safely (a backslash: its meaning depends on the session's sql_mode)."""
    if b"\\" in sql:
        return None
    text = _without_comments(sql)
    m = _KILL_PARTS.match(_statement_end(text if text is not None else sql))
    if m is None:
        return None
    what = (m.group("what") or b"").strip().upper()
    mode = (m.group("mode") or b"").strip().upper()
    prefix = b"KILL " + (mode + b" " if mode else b"") + (what + b" " if what else b"")
    statement = _statement_end(text if text is not None else sql).lstrip(_SPACE)
    return KillExpression(statement, m.group("expr"), what == b"QUERY", prefix)


def prepared_kill(sql: bytes) -> KillRequest | KillExpression | None:
    """What each execute of a prepared statement is, if it is a KILL the proxy carries out: a
    KILL of an id, or of an expression it evaluates at each execute as it does for a query
    (net/kill.py). None for any other statement, and for a KILL it cannot take (a parameter
    marker: its value would need the execute's binding; a backslash), which is refused."""
    kill = parse_kill_query(sql)
    if kill is not None or b"?" in sql or not is_unmapped_kill(sql):
        return kill
    return split_kill_expression(sql)


def _without_comments(sql: bytes) -> bytes | None:
    """The statement with its comments turned into spaces and its executable comments into their
    text, as the server reads it; None if it holds a quoted string, which no KILL <id> does.

    A comment must not hide a KILL from the proxy: the backend would run it on its own ids.
    """
    out: list[bytes] = []
    pos = 0
    n = len(sql)
    while (m := _SPECIAL.search(sql, pos)) is not None:
        out.append(sql[pos : m.start()])
        token = m.group()
        pos = m.end()
        if token == b"/*":
            end = sql.find(b"*/", pos)
            if end < 0:
                return None  # unterminated: the server refuses the statement
            body = sql[pos:end]
            executable = _EXECUTABLE.match(body)
            out.append(b" " + body[executable.end() :] + b" " if executable else b" ")
            pos = end + 2
        elif token == b"#" or (token == b"--" and (pos == n or sql[pos] <= 0x20)):
            end = sql.find(b"\n", pos)  # "--" opens a comment only before a space or control
            out.append(b" ")
            pos = n if end < 0 else end
        elif token == b"--":
            out.append(token)
        else:
            return None  # a quote
    out.append(sql[pos:])
    return b"".join(out)


def parse_process_kill(payload: bytes) -> int:
    if len(payload) < 5:
        raise ProtocolError("COM_PROCESS_KILL without a connection id")
    return int(U32.unpack_from(payload, 1)[0])


@dataclass(frozen=True)
class ChangeUser:
    user: bytes
    database: bytes
    rewritten: bytes  # the payload to send to the backend


def rewrite_change_user(payload: bytes, capabilities: int, plugin: str) -> ChangeUser:
    """COM_CHANGE_USER with its auth data dropped and its plugin replaced by `plugin`."""
    _, pos = read_u8(payload, 0)
    user, pos = read_nul_bytes(payload, pos)
    if capabilities & Capability.SECURE_CONNECTION:
        size, pos = read_u8(payload, pos)
        _, pos = read_bytes(payload, pos, size)
    else:
        _, pos = read_nul_bytes(payload, pos)
    database, pos = read_nul_bytes(payload, pos)
    charset = b""
    if pos < len(payload):
        charset, pos = read_bytes(payload, pos, 2)
    if pos < len(payload) and capabilities & Capability.PLUGIN_AUTH:
        _, pos = read_nul_bytes(payload, pos)
    attrs = b""
    if pos < len(payload) and capabilities & Capability.CONNECT_ATTRS:
        start = pos
        _, pos = read_lenenc_bytes(payload, pos)
        attrs = payload[start:pos]
    rest, _ = read_eof_bytes(payload, pos)
    # (A client without CLIENT_PLUGIN_AUTH names no plugin; the backend leg has it, and the
    # switch to mysql_native_password that follows is one such a client answers too.)
    # No auth data: a zero length byte (SECURE_CONNECTION) or an empty NUL-ended string.
    auth = b"\0"
    rewritten = b"".join(
        (
            bytes((Command.CHANGE_USER,)),
            user + b"\0",
            auth,
            database + b"\0",
            charset or b"\x21\x00",
            plugin.encode() + b"\0",
            attrs,
            rest,
        )
    )
    return ChangeUser(user, database, rewritten)
