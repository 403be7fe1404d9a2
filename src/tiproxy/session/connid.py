"""The connection ids SQL shows, made the proxy's: stable across moves, and what KILL takes.

A client learns its connection id from the greeting (the proxy's id) and from SQL, where the
backend would answer with its own thread id, which differs and changes when the session moves.
So the proxy makes SQL agree with the greeting:
- `CONNECTION_ID()` in a statement's text (COM_QUERY, COM_STMT_PREPARE) becomes the session's
  proxy id as a literal, zero-padded to ten digits (the width of CONNECTION_ID()'s column), and
  the result's column names are given their original text back.
- `IS_USED_LOCK(x)` answers with the proxy id of a proxy session that holds the lock, so that it
  compares with CONNECTION_ID() as it does directly: the call becomes a CASE over the backend
  ids of the session itself and of the proxy's sessions on that backend known to hold named
  locks (those are pinned there, so their backend ids stay valid). The call is evaluated a
  second time when its answer is no such session's (the ELSE), so a lock taken in between
  shows its new holder.
- The processlist (`SHOW [FULL] PROCESSLIST`, `information_schema.PROCESSLIST`) shows each
  proxy session on that backend with its proxy id in the `Id` column; other connections keep
  their backend ids. In such a statement CONNECTION_ID() is left as it is, so that
  `WHERE ID = CONNECTION_ID()` still finds the session's own row, and a column that is just
  CONNECTION_ID() is mapped in the rows as the Id column is.

Only statement text is read: `CONNECTION_ID()` inside a string (`PREPARE s FROM '...'`), a
stored program or a view is the backend's. Strings, quoted names and comments are skipped; the
text of `/*! ... */` executable comments is read as code, as the server does.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from tiproxy.protocol.codec import U16, lenenc_bytes, lenenc_int, read_lenenc_int
from tiproxy.protocol.constants import MAX_PAYLOAD
from tiproxy.protocol.errors import ProtocolError
from tiproxy.protocol.responses import terminator_status
from tiproxy.session.statements import first_keyword

# A cheap first look, on the lower-cased statement: only these statements are scanned.
MARKERS = (b"ection_id", b"ocesslist", b"used_lock")

# Strings, quoted identifiers and comments: what the scan must not read as code.
_OPAQUE = re.compile(
    rb"'(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.|\"\")*\"|`(?:[^`]|``)*`"
    rb"|/\*(?!M?!).*?\*/|#[^\n]*|--[ \t\r\n\f\v][^\n]*|--\Z",
    re.DOTALL,
)
_CONNECTION_ID = re.compile(rb"(?<![\w$.])connection_id\s*\(\s*\)", re.IGNORECASE)
_IS_USED_LOCK = re.compile(rb"(?<![\w$.])is_used_lock\s*\(", re.IGNORECASE)
_PROCESSLIST = re.compile(rb"(?<![\w$])processlist(?![\w$])", re.IGNORECASE)
# Statements that store their text (CREATE VIEW, routines, triggers, events, a column's DEFAULT;
# ALTER likewise): CONNECTION_ID() there must stay a call.
_DEFINITIONS = frozenset((b"CREATE", b"ALTER"))
_SHOW_PROCESSLIST = re.compile(rb"\s*SHOW\s+(?:FULL\s+)?PROCESSLIST\b", re.IGNORECASE)


def might_name_ids(lowered: bytes) -> bool:
    return any(marker in lowered for marker in MARKERS)


@dataclass(frozen=True)
class IdUses:
    """Where a statement names connection ids."""

    connection_ids: tuple[tuple[int, int], ...]  # spans of CONNECTION_ID() calls
    lock_calls: tuple[tuple[int, int], ...]  # spans of IS_USED_LOCK(...) calls
    processlist: bool  # SHOW PROCESSLIST or a read of information_schema.PROCESSLIST
    show_processlist: bool  # its Id column is the first one, without an original table

    @property
    def needs_holders(self) -> bool:
        """Whether the rewrite needs the backend ids of the other sessions on the backend."""
        return bool(self.lock_calls) or self.processlist


def _masked(sql: bytes) -> tuple[bytes, bytes]:
    """The statement with strings, quoted names and comments blanked (same length), and the
    same with the names of quoted identifiers kept (`information_schema`.`PROCESSLIST`)."""
    if not any(c in sql for c in (b"'", b'"', b"`", b"#", b"--", b"/*")):
        return sql, sql
    out = bytearray(sql)
    names = bytearray(sql)
    for m in _OPAQUE.finditer(sql):
        blank = b" " * (m.end() - m.start())
        out[m.start():m.end()] = blank
        if sql[m.start()] != 0x60:  # not a quoted identifier: blank in both
            names[m.start():m.end()] = blank
        else:
            names[m.start()] = names[m.end() - 1] = 0x20
    return bytes(out), bytes(names)


def _closing_paren(masked: bytes, open_at: int) -> int | None:
    depth = 0
    for i in range(open_at, len(masked)):
        c = masked[i]
        if c == 0x28:
            depth += 1
        elif c == 0x29:
            depth -= 1
            if depth == 0:
                return i
    return None


def find_id_uses(sql: bytes) -> IdUses | None:
    """None when the statement names no connection id (the usual case)."""
    masked, names = _masked(sql)
    if first_keyword(masked) in _DEFINITIONS:
        return None  # stored (a view, a routine, a default): ids there are the backend's
    # Every CONNECTION_ID(), inside an IS_USED_LOCK() argument too (as in GET_LOCK()'s).
    cids = [(m.start(), m.end()) for m in _CONNECTION_ID.finditer(masked)]
    locks: list[tuple[int, int]] = []
    pos = 0
    while (m := _IS_USED_LOCK.search(masked, pos)) is not None:
        close = _closing_paren(masked, m.end() - 1)
        if close is None:
            break  # unbalanced: the server's parser will say so
        locks.append((m.start(), close + 1))
        pos = close + 1  # a lock call inside the argument is not mapped twice
    plist = _PROCESSLIST.search(names) is not None
    if not cids and not locks and not plist:
        return None
    show = bool(_SHOW_PROCESSLIST.match(masked))
    return IdUses(tuple(cids), tuple(locks), plist, show)


def padded(proxy_id: int) -> bytes:
    return b"%010d" % proxy_id


@dataclass(frozen=True)
class Rewritten:
    sql: bytes
    renames: tuple[tuple[bytes, bytes], ...]  # (text put in, original text) for column names
    id_names: tuple[bytes, ...] = ()  # names of columns holding backend ids, to map in rows


def rewrite(sql: bytes, uses: IdUses, proxy_id: int,
            lock_holders: Mapping[int, int] | None = None) -> Rewritten:
    """The statement with the session's proxy id for CONNECTION_ID() (not in a processlist
    read) and IS_USED_LOCK() answering proxy ids of `lock_holders` (backend id -> proxy id)."""
    spans: list[tuple[int, int, bytes]] = []
    id_names = tuple(sql[start:end] for start, end in uses.connection_ids)
    literal = padded(proxy_id)
    mapped = [(s, e) for s, e in uses.lock_calls] if lock_holders else []

    def inside(start: int, end: int) -> bool:
        return any(s <= start and end <= e for s, e in mapped)

    def with_ids(start: int, end: int) -> bytes:
        """sql[start:end] with its CONNECTION_ID() calls replaced (not in a processlist read)."""
        if uses.processlist:
            return sql[start:end]
        parts: list[bytes] = []
        last = start
        for s, e in uses.connection_ids:
            if start <= s and e <= end:
                parts += (sql[last:s], literal)
                last = e
        parts.append(sql[last:end])
        return b"".join(parts)

    if not uses.processlist:
        spans += [(start, end, literal) for start, end in uses.connection_ids
                  if not inside(start, end)]
    if mapped:
        assert lock_holders is not None
        whens = b" ".join(b"WHEN %d THEN %d" % pair for pair in sorted(lock_holders.items()))
        for start, end in mapped:
            call = with_ids(start, end)
            spans.append((start, end, b"CASE " + call + b" " + whens + b" ELSE " + call
                          + b" END"))
    if not spans:
        return Rewritten(sql, (), id_names if uses.processlist else ())
    spans.sort()
    parts: list[bytes] = []
    renames: dict[bytes, bytes] = {}
    last = 0
    for start, end, text in spans:
        parts += (sql[last:start], text)
        renames[text] = sql[start:end]
        last = end
    parts.append(sql[last:])
    return Rewritten(b"".join(parts), tuple(renames.items()),
                     id_names if uses.processlist else ())


# -- the response ----------------------------------------------------------------------------

_FIRST, _PREPARE_PARAMS, _COLUMNS, _COLUMNS_EOF, _ROWS, _PASS = range(6)
_MORE_RESULTS = 0x0008
_NAME_CUT = 64  # MariaDB names an expression's column after at most this much of its text


class ResultRewriter:
    """Rewrites one command's response as it streams: the names of columns whose text the
    statement's rewrite changed, and, in text rows, processlist ids (backend id -> proxy id).
    Everything else passes as it came; the packets keep their number and sequence ids."""

    def __init__(self, renames: tuple[tuple[bytes, bytes], ...],
                 ids: Mapping[int, int] | None, *, show_processlist: bool, binary: bool,
                 prepare: bool, deprecate_eof: bool, cursor: bool = False,
                 id_names: tuple[bytes, ...] = ()) -> None:
        self._renames = renames
        self._id_names = id_names
        self._ids = ids or None
        self._show = show_processlist
        self._binary = binary
        self._eof = not deprecate_eof
        self._cursor = cursor  # an execute that opens a cursor: its rows come with fetches
        self._state = _FIRST
        self._left = 0  # definitions still to come in this phase
        self._prepare_columns = 0
        self._index = 0  # of the column definition being read
        self._id_columns: list[int] = []
        self._buf = bytearray()
        if prepare:
            self._state = _PREPARE_PARAMS
            self._left = -1  # the PREPARE_OK comes first

    @property
    def renames(self) -> tuple[tuple[bytes, bytes], ...]:
        return self._renames

    @property
    def done(self) -> bool:
        return self._state == _PASS and not self._buf

    def feed(self, data: bytes) -> bytes:
        if self._state == _PASS and not self._buf:
            return data
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        while pos + 4 <= len(buf):
            length = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16
            end = pos + 4 + length
            if end > len(buf):
                break
            if self._state == _PASS or length == MAX_PAYLOAD:
                self._state = _PASS  # a packet split in several: rows of 16 MiB pass as they are
                out.append(bytes(buf[pos:]))
                pos = len(buf)
                break
            payload = bytes(buf[pos + 4:end])
            try:
                new = self._packet(payload)
            except (IndexError, ValueError, struct.error, ProtocolError):
                new = None  # not what it should be: the tracker judges it; it passes
                self._state = _PASS
            if new is None or len(new) >= MAX_PAYLOAD:  # one packet still, or left as it was
                out.append(bytes(buf[pos:end]))
            else:
                out.append(len(new).to_bytes(3, "little") + buf[pos + 3:pos + 4] + new)
            pos = end
        del buf[:pos]
        return b"".join(out)

    def _packet(self, p: bytes) -> bytes | None:
        """One packet's payload; a new payload, or None to keep it."""
        state = self._state
        first = p[0] if p else 0
        if state == _FIRST:
            if first == 0x00 or (first == 0xFE and len(p) < 9):
                self._ended(p)
            elif first == 0xFF and len(p) >= 3 and p[1] == 0xFF and p[2] == 0xFF:
                pass  # MariaDB's progress report: the answer is still to come
            elif first in (0xFF, 0xFB):
                self._state = _PASS  # an error, or LOCAL INFILE (the rest follows the file)
            else:
                count, end = read_lenenc_int(p, 0)
                if end < len(p) and p[end] == 0:  # CACHE_METADATA: no definitions follow
                    self._state = _PASS
                    return None
                self._left, self._index, self._id_columns = count, 0, []
                self._state = _COLUMNS
            return None
        if state == _PREPARE_PARAMS:
            if self._left == -1:  # PREPARE_OK: its parameters' definitions (and EOF) first
                if first != 0x00 or len(p) < 9:
                    self._state = _PASS
                    return None
                self._prepare_columns = U16.unpack_from(p, 5)[0]
                params = U16.unpack_from(p, 7)[0]
                self._left = params + (1 if params and self._eof else 0)
            else:
                self._left -= 1
            if self._left == 0:
                columns, self._prepare_columns = self._prepare_columns, -1
                self._left, self._index, self._id_columns = columns, 0, []
                self._state = _COLUMNS if columns else _PASS
            return None
        if state == _COLUMNS:
            new = self._column(p)
            self._index += 1
            self._left -= 1
            if self._left == 0:
                if self._prepare_columns < 0:
                    self._state = _PASS  # a PREPARE_OK's columns: no rows follow
                elif self._eof:
                    self._state = _COLUMNS_EOF
                else:
                    self._state = _PASS if self._cursor else _ROWS
            return new
        if state == _COLUMNS_EOF:
            self._state = _PASS if self._cursor else _ROWS
            return None
        # _ROWS
        if first == 0xFE and len(p) < MAX_PAYLOAD:
            self._ended(p)
            return None
        if first == 0xFF:
            self._state = _PASS
            return None
        if self._id_columns and not self._binary:
            return self._text_row(p)
        return None

    def _ended(self, p: bytes) -> None:
        """A terminator (EOF or OK): another result follows only with MORE_RESULTS."""
        status = terminator_status(p, 0, len(p))
        self._state = _FIRST if status & _MORE_RESULTS else _PASS

    def _column(self, p: bytes) -> bytes | None:
        fields: list[tuple[int, int]] = []
        pos = 0
        for _ in range(6):  # catalog, schema, table, org_table, name, org_name
            size, start = read_lenenc_int(p, pos)
            fields.append((start, start + size))
            pos = start + size
        name = p[fields[4][0]:fields[4][1]]
        if self._ids is not None:
            schema = p[fields[1][0]:fields[1][1]].upper()
            org_table = p[fields[3][0]:fields[3][1]].upper()
            org_name = p[fields[5][0]:fields[5][1]].upper()
            if (schema == b"INFORMATION_SCHEMA" and org_table == b"PROCESSLIST"
                    and org_name == b"ID") \
                    or (self._show and self._index == 0 and name == b"Id") \
                    or name in self._id_names:
                self._id_columns.append(self._index)
        renamed = name
        for put, original in self._renames:
            if put in renamed:
                renamed = renamed.replace(put, original)
            elif len(name) >= _NAME_CUT and put.startswith(name):
                renamed = original  # the server cut a long name: the original, whole
        if renamed == name:
            return None
        return p[:fields[3][1]] + lenenc_bytes(renamed) + p[fields[4][1]:]

    def _text_row(self, p: bytes) -> bytes | None:
        assert self._ids is not None
        wanted = self._id_columns
        pos = 0
        column = 0
        parts: list[bytes] = []
        last = 0
        for target in wanted:
            while column < target:
                pos = _skip_value(p, pos)
                column += 1
            if p[pos] == 0xFB:
                continue
            size, start = read_lenenc_int(p, pos)
            value = p[start:start + size]
            proxy_id = self._ids.get(int(value)) if value.isdigit() else None
            if proxy_id is not None:
                text = b"%d" % proxy_id
                parts += (p[last:pos], lenenc_int(len(text)), text)
                last = start + size
        if not parts:
            return None
        parts.append(p[last:])
        return b"".join(parts)


def _skip_value(p: bytes, pos: int) -> int:
    if p[pos] == 0xFB:
        return pos + 1
    size, start = read_lenenc_int(p, pos)
    return start + size


__all__ = ["IdUses", "ResultRewriter", "Rewritten", "find_id_uses", "might_name_ids",
           "padded", "rewrite"]
