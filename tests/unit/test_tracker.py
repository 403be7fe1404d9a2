"""ResponseTracker transcripts: where every command's response ends, and the status after it.

Each transcript is a list of commands the relay sent (`expect`) and the bytes the backend answered,
built packet by packet from the protocol documentation:
https://dev.mysql.com/doc/dev/mysql-server/latest/page_protocol_command_phase.html
https://mariadb.com/kb/en/result-set-packets/ and https://mariadb.com/kb/en/com_stmt_execute/

Every transcript is fed three ways: whole, byte at a time (around every packet boundary for the
transcripts with 16 MiB packets) and cut at random points. Each way must give the same `on_done`
calls, each made while the chunk holding the response's last byte is fed (never earlier, never
later), and the same final status.
"""

from __future__ import annotations

import functools
import itertools
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiproxy.protocol.codec import U16, U32, U64, lenenc_bytes, lenenc_int
from tiproxy.protocol.constants import MAX_PAYLOAD, Command, ServerStatus
from tiproxy.protocol.errors import Origin, ProtocolError
from tiproxy.protocol.packets import build_auth_switch, build_eof, build_err, build_ok, frame
from tiproxy.protocol.responses import EXPECT_BY_COMMAND, Expect
from tiproxy.protocol.tracker import ResponseTracker

AUTOCOMMIT = int(ServerStatus.AUTOCOMMIT)
IN_TRANS = int(ServerStatus.IN_TRANS)
MORE = int(ServerStatus.MORE_RESULTS_EXISTS)
CURSOR = int(ServerStatus.CURSOR_EXISTS)
LAST_ROW = int(ServerStatus.LAST_ROW_SENT)
OUT_PARAMS = int(ServerStatus.PS_OUT_PARAMS)
STATE_CHANGED = int(ServerStatus.SESSION_STATE_CHANGED)

# -- packets, as the server builds them ----------------------------------------------------------


def ok(
    status: int,
    *,
    affected: int = 0,
    insert_id: int = 0,
    warnings: int = 0,
    info: bytes = b"",
    header: int = 0x00,
) -> bytes:
    """An OK packet; `info` is whatever follows the warnings (message, session state)."""
    return build_ok(status, affected, insert_id, warnings, header) + info


def ok_with_session_state(status: int) -> bytes:
    """An OK after USE db with CLIENT_SESSION_TRACK: info, then the session state changes."""
    schema = lenenc_bytes(b"shop")
    change = b"\x01" + lenenc_bytes(schema)  # SESSION_TRACK_SCHEMA
    return ok(status | STATE_CHANGED, info=lenenc_bytes(b"") + lenenc_bytes(change))


def eof(status: int, warnings: int = 0) -> bytes:
    return build_eof(status, warnings)


def err(code: int = 1064, state: str = "42000", message: str = "You have an error") -> bytes:
    return build_err(code, state, message)


def column_def(name: bytes, type_code: int = 0xFD) -> bytes:
    """Protocol::ColumnDefinition41."""
    return b"".join(
        (
            lenenc_bytes(b"def"),
            lenenc_bytes(b"shop"),
            lenenc_bytes(b"t"),
            lenenc_bytes(b"t"),
            lenenc_bytes(name),
            lenenc_bytes(name),
            b"\x0c",
            U16.pack(45),  # utf8mb4_general_ci
            U32.pack(1024),
            bytes((type_code,)),
            U16.pack(0),
            b"\x00",
            b"\x00\x00",
        )
    )


def text_row(*values: bytes | None) -> bytes:
    return b"".join(b"\xfb" if v is None else lenenc_bytes(v) for v in values)


def binary_row(*values: bytes | None) -> bytes:
    """A binary protocol row of string columns: 0x00, the NULL bitmap (offset 2), the values."""
    bitmap = bytearray((len(values) + 7 + 2) // 8)
    for i, v in enumerate(values):
        if v is None:
            bitmap[(i + 2) // 8] |= 1 << ((i + 2) % 8)
    return b"\x00" + bytes(bitmap) + b"".join(lenenc_bytes(v) for v in values if v is not None)


def prepare_ok(stmt_id: int, columns: int, params: int, warnings: int = 0) -> bytes:
    """COM_STMT_PREPARE_OK."""
    return (
        b"\x00"
        + U32.pack(stmt_id)
        + U16.pack(columns)
        + U16.pack(params)
        + b"\x00"
        + U16.pack(warnings)
    )


# -- transcripts ---------------------------------------------------------------------------------

Done = tuple[Any, int, bool, int]  # token, status, failed, stream offset of the response's end


@dataclass
class Script:
    """Commands and the backend's bytes, with the on_done calls they must give."""

    deprecate_eof: bool
    status: int = AUTOCOMMIT  # the status the session had when the transcript starts
    steps: list[tuple[str, Any]] = field(default_factory=list)
    stream: bytearray = field(default_factory=bytearray)
    packet_starts: list[int] = field(default_factory=list)
    want: list[Done] = field(default_factory=list)
    final_status: int = AUTOCOMMIT
    _seq: int = 0

    def command(self, cmd: int, token: Any) -> None:
        """The relay sent `cmd`: the tracker expects its response."""
        self.expect(EXPECT_BY_COMMAND[cmd], token)

    def expect(self, kind: Expect, token: Any) -> None:
        self.steps.append(("expect", (kind, token)))
        self._seq = 1

    def client_sends(self) -> None:
        """A packet went the other way (auth data, a file): the sequence id moves on."""
        self._seq += 1

    def send(self, *payloads: bytes) -> None:
        """The backend sends these packets (split at 16 MiB as the server does)."""
        start = len(self.stream)
        for payload in payloads:
            parts = len(payload) // MAX_PAYLOAD + 1
            here = len(self.stream)
            self.packet_starts.extend(here + k * (MAX_PAYLOAD + 4) for k in range(parts))
            self.stream += frame(payload, self._seq)
            self._seq += parts
        end = len(self.stream)
        if self.steps and self.steps[-1][0] == "data" and self.steps[-1][1][1] == start:
            self.steps[-1] = ("data", (self.steps[-1][1][0], end))
        else:
            self.steps.append(("data", (start, end)))

    def done(self, token: Any, status: int, failed: bool = False) -> None:
        """The response of `token` ends here (after the bytes sent so far)."""
        self.want.append((token, status, failed, len(self.stream)))
        self.final_status = status
        self._seq = 1  # the next response starts its own sequence

    def check(self, probe: Callable[[ResponseTracker], None]) -> None:
        self.steps.append(("check", probe))

    # Shapes that depend on CLIENT_DEPRECATE_EOF.

    def terminator(self, status: int, warnings: int = 0) -> bytes:
        if self.deprecate_eof:
            return ok(status, warnings=warnings, header=0xFE)
        return eof(status, warnings)

    def columns(self, names: list[bytes], status: int) -> None:
        self.send(lenenc_int(len(names)), *(column_def(n) for n in names))
        if not self.deprecate_eof:
            self.send(eof(status))

    def result_set(self, names: list[bytes], rows: list[bytes], status: int) -> None:
        self.columns(names, status)
        self.send(*rows)
        self.send(self.terminator(status))


SCRIPTS: dict[str, Callable[[], Script]] = {}
LARGE: set[str] = set()  # transcripts with 16 MiB packets: fewer random examples


def transcript(large: bool = False) -> Callable[[Callable[[Script], None]], None]:
    """Register a transcript once with and once without CLIENT_DEPRECATE_EOF."""

    def register(build: Callable[[Script], None]) -> None:
        for deprecate_eof in (False, True):
            name = f"{build.__name__}[{'deprecate_eof' if deprecate_eof else 'eof'}]"

            def make(build: Callable[[Script], None] = build, d: bool = deprecate_eof) -> Script:
                script = Script(d)
                build(script)
                return script

            SCRIPTS[name] = functools.cache(make)
            if large:
                LARGE.add(name)

    return register


@transcript()
def query_ok(s: Script) -> None:
    s.command(Command.QUERY, "begin")
    s.send(ok(IN_TRANS | AUTOCOMMIT))
    s.done("begin", IN_TRANS | AUTOCOMMIT)
    s.command(Command.QUERY, "insert")
    s.send(
        ok(
            IN_TRANS | AUTOCOMMIT,
            affected=70000,
            insert_id=1 << 40,
            warnings=2,
            info=b"Records: 70000  Duplicates: 0  Warnings: 2",
        )
    )
    s.done("insert", IN_TRANS | AUTOCOMMIT)
    s.command(Command.QUERY, "commit")
    s.send(ok(AUTOCOMMIT))
    s.done("commit", AUTOCOMMIT)
    s.command(Command.QUERY, "set autocommit=0")
    s.send(ok(0))
    s.done("set autocommit=0", 0)
    s.command(Command.QUERY, "update")  # starts a transaction implicitly
    s.send(ok(IN_TRANS, affected=3))
    s.done("update", IN_TRANS)


@transcript()
def query_err(s: Script) -> None:
    s.status = IN_TRANS | AUTOCOMMIT
    s.command(Command.QUERY, "bad sql")
    s.send(err())
    s.done("bad sql", IN_TRANS | AUTOCOMMIT, failed=True)
    s.command(Command.QUERY, "old-style err")
    s.send(b"\xff" + U16.pack(1105) + b"no sqlstate marker")
    s.done("old-style err", IN_TRANS | AUTOCOMMIT, failed=True)


@transcript()
def text_result(s: Script) -> None:
    s.command(Command.QUERY, "select")
    rows = [
        text_row(b"1", b"apple", None),
        text_row(None, b"", b"z"),  # first byte 0xFB (NULL)
        text_row(b"", b"x", b"y"),  # first byte 0x00 (empty string)
        text_row(b"a" * 300, b"b", b"c"),  # first byte 0xFC
        text_row(b"d" * 70000, None, None),  # first byte 0xFD
        text_row(b"\xfe\xff", b"\xff", b"\xfe"),  # row values that look like terminators
    ]
    s.result_set([b"id", b"name", b"note"], rows, IN_TRANS | AUTOCOMMIT)
    s.done("select", IN_TRANS | AUTOCOMMIT)


@transcript()
def empty_result(s: Script) -> None:
    s.command(Command.QUERY, "select nothing")
    s.result_set([b"id"], [], AUTOCOMMIT)
    s.done("select nothing", AUTOCOMMIT)


@transcript()
def terminator_with_session_state(s: Script) -> None:
    s.command(Command.QUERY, "use shop")
    s.send(ok_with_session_state(AUTOCOMMIT))
    s.done("use shop", AUTOCOMMIT | STATE_CHANGED)
    s.command(Command.QUERY, "select")
    s.columns([b"a"], AUTOCOMMIT)
    s.send(text_row(b"1"))
    final = AUTOCOMMIT | IN_TRANS
    if s.deprecate_eof:  # the OK that ends the rows may carry a message and session state
        s.send(ok(final, warnings=1, info=lenenc_bytes(b"a message"), header=0xFE))
    else:
        s.send(eof(final, warnings=1))
    s.done("select", final)


@transcript()
def multi_statements(s: Script) -> None:
    """SELECT 1; INSERT ...; SELECT 2: three results, one response."""
    s.command(Command.QUERY, "multi")
    s.result_set([b"1"], [text_row(b"1")], AUTOCOMMIT | MORE)
    s.send(ok(AUTOCOMMIT | IN_TRANS | MORE, affected=1))
    s.result_set([b"2"], [text_row(b"2")], AUTOCOMMIT | IN_TRANS)
    s.done("multi", AUTOCOMMIT | IN_TRANS)
    s.command(Command.QUERY, "next")
    s.send(ok(AUTOCOMMIT | IN_TRANS))
    s.done("next", AUTOCOMMIT | IN_TRANS)


@transcript()
def call_procedure(s: Script) -> None:
    """CALL p() returning two result sets, then the OK of the CALL itself."""
    s.command(Command.QUERY, "call")
    s.result_set([b"a", b"b"], [text_row(b"1", b"2"), text_row(b"3", None)], AUTOCOMMIT | MORE)
    s.result_set([b"c"], [text_row(b"x")], AUTOCOMMIT | MORE)
    s.send(ok(AUTOCOMMIT))
    s.done("call", AUTOCOMMIT)


@transcript()
def multi_statements_error(s: Script) -> None:
    """SELECT 1; SELECT nonsense: the ERR of the second statement ends the response."""
    s.command(Command.QUERY, "multi")
    s.result_set([b"1"], [text_row(b"1")], AUTOCOMMIT | IN_TRANS | MORE)
    s.send(err(1054, "42S22", "Unknown column"))
    s.done("multi", AUTOCOMMIT | IN_TRANS, failed=True)  # no more results after an ERR
    s.command(Command.QUERY, "rows then err")  # e.g. a query killed while sending rows
    s.columns([b"a"], AUTOCOMMIT | IN_TRANS)
    s.send(text_row(b"1"), text_row(b"2"), err(1317, "70100", "Query execution was interrupted"))
    s.done("rows then err", AUTOCOMMIT | IN_TRANS, failed=True)


def _expect_infile(active: bool) -> Callable[[ResponseTracker], None]:
    def probe(tracker: ResponseTracker) -> None:
        assert tracker.local_infile is active
        assert not tracker.idle or not active

    return probe


@transcript()
def local_infile(s: Script) -> None:
    s.command(Command.QUERY, "load data")
    s.send(b"\xfb/tmp/rows.csv")
    s.check(_expect_infile(True))
    s.client_sends()  # the file, then an empty packet
    s.client_sends()
    s.send(ok(AUTOCOMMIT, affected=3, info=b"Records: 3  Deleted: 0  Skipped: 0  Warnings: 0"))
    s.done("load data", AUTOCOMMIT)
    s.check(_expect_infile(False))
    s.command(Command.QUERY, "load data refused")
    s.send(b"\xfb/etc/shadow")
    s.check(_expect_infile(True))
    s.client_sends()  # the client refuses: an empty packet
    s.send(err(2068, "HY000", "LOAD DATA LOCAL INFILE file request rejected"))
    s.done("load data refused", AUTOCOMMIT, failed=True)
    s.check(_expect_infile(False))
    s.command(Command.QUERY, "load data; select")
    s.send(b"\xfbrows.csv")
    s.check(_expect_infile(True))
    s.client_sends()
    s.send(ok(AUTOCOMMIT | MORE, affected=1))
    s.result_set([b"n"], [text_row(b"1")], AUTOCOMMIT)
    s.done("load data; select", AUTOCOMMIT)


@transcript()
def many_columns(s: Script) -> None:
    """251 and more columns: the column count is a 3-byte length-encoded integer (0xFC)."""
    for count in (250, 251, 1000):
        names = [b"c%d" % i for i in range(count)]
        s.command(Command.QUERY, count)
        s.result_set(
            names, [text_row(*(b"v" for _ in names)), text_row(*(None for _ in names))], AUTOCOMMIT
        )
        s.done(count, AUTOCOMMIT)


def _expect_prepared(stmt_id: int, columns: int, params: int) -> Callable[[ResponseTracker], None]:
    def probe(tracker: ResponseTracker) -> None:
        assert tracker.prepared == (stmt_id, columns, params)
        assert tracker.idle

    return probe


@transcript()
def prepare(s: Script) -> None:
    """COM_STMT_PREPARE: parameter definitions, then column definitions, each block ended by an EOF
    unless CLIENT_DEPRECATE_EOF."""
    for stmt_id, columns, params in ((1, 3, 2), (2, 2, 0), (3, 0, 3), (4, 0, 0), (5, 300, 300)):
        s.command(Command.STMT_PREPARE, stmt_id)
        s.send(prepare_ok(stmt_id, columns, params))
        if params:
            s.send(*(column_def(b"?") for _ in range(params)))
            if not s.deprecate_eof:
                s.send(eof(AUTOCOMMIT))
        if columns:
            s.send(*(column_def(b"c%d" % i) for i in range(columns)))
            if not s.deprecate_eof:
                s.send(eof(AUTOCOMMIT))
        s.done(stmt_id, AUTOCOMMIT)
        s.check(_expect_prepared(stmt_id, columns, params))
    s.command(Command.STMT_PREPARE, "bad")
    s.send(err(1146, "42S02", "Table 'shop.nope' doesn't exist"))
    s.done("bad", AUTOCOMMIT, failed=True)


@transcript()
def execute(s: Script) -> None:
    s.command(Command.STMT_EXECUTE, "select")
    rows = [binary_row(b"1", None), binary_row(None, None), binary_row(b"\xfe" * 5, b"\xff")]
    s.result_set([b"a", b"b"], rows, AUTOCOMMIT)
    s.done("select", AUTOCOMMIT)
    s.command(Command.STMT_EXECUTE, "insert")
    s.send(ok(AUTOCOMMIT | IN_TRANS, affected=1, insert_id=7))
    s.done("insert", AUTOCOMMIT | IN_TRANS)
    s.command(Command.STMT_EXECUTE, "dup")
    s.send(err(1062, "23000", "Duplicate entry"))
    s.done("dup", AUTOCOMMIT | IN_TRANS, failed=True)
    s.command(Command.STMT_EXECUTE, "call")  # a result set, the OUT parameters, the CALL's OK
    s.result_set([b"x"], [binary_row(b"1")], AUTOCOMMIT | IN_TRANS | MORE)
    s.result_set([b"out"], [binary_row(b"42")], AUTOCOMMIT | IN_TRANS | MORE | OUT_PARAMS)
    s.send(ok(AUTOCOMMIT | IN_TRANS))
    s.done("call", AUTOCOMMIT | IN_TRANS)


@transcript()
def cached_metadata(s: Script) -> None:
    """MARIADB_CLIENT_CACHE_METADATA: each column count carries a "metadata follows" byte; an
    execute whose client has the definitions already gets none (the EOF that would end them
    stays). A cursor opened without them ends the response at that EOF all the same."""
    s.command(Command.STMT_EXECUTE, "first")
    s.send(lenenc_int(2) + b"\x01", column_def(b"a"), column_def(b"b"))
    if not s.deprecate_eof:
        s.send(eof(AUTOCOMMIT))
    s.send(binary_row(b"1", b"2"), s.terminator(AUTOCOMMIT))
    s.done("first", AUTOCOMMIT)
    s.command(Command.STMT_EXECUTE, "again")
    s.send(lenenc_int(2) + b"\x00")
    if not s.deprecate_eof:
        s.send(eof(AUTOCOMMIT))
    s.send(binary_row(b"3", b"4"), binary_row(None, None), s.terminator(AUTOCOMMIT))
    s.done("again", AUTOCOMMIT)
    s.command(Command.QUERY, "text")  # text results always carry their definitions
    s.send(lenenc_int(1) + b"\x01", column_def(b"c"))
    if not s.deprecate_eof:
        s.send(eof(AUTOCOMMIT))
    s.send(text_row(b"\x00"), s.terminator(AUTOCOMMIT))
    s.done("text", AUTOCOMMIT)
    if not s.deprecate_eof:
        s.expect(Expect.CURSOR, "cursor")
        s.send(lenenc_int(2) + b"\x00", eof(AUTOCOMMIT | CURSOR))
        s.done("cursor", AUTOCOMMIT | CURSOR)


def progress(stage: int, max_stage: int, permille: int, info: bytes) -> bytes:
    """A MariaDB progress report: an ERR packet with code 0xFFFF."""
    return (b"\xff\xff\xff\x01" + bytes((stage, max_stage)) + permille.to_bytes(3, "little")
            + lenenc_bytes(info))


@transcript()
def progress_reports(s: Script) -> None:
    """MARIADB_CLIENT_PROGRESS: ALTER TABLE reports as it goes, then answers; so may a statement
    that fails in the end, or one that returns rows (CHECK TABLE on Aria)."""
    s.command(Command.QUERY, "alter")
    s.send(progress(1, 2, 12345, b"copy to tmp table"), progress(2, 2, 50000, b"enable keys"))
    s.send(ok(AUTOCOMMIT, affected=400000, info=lenenc_bytes(b"Records: 400000")))
    s.done("alter", AUTOCOMMIT)
    s.command(Command.QUERY, "alter that fails")
    s.send(progress(1, 1, 99000, b"copy to tmp table"))
    s.send(err(1062, "23000", "Duplicate entry '1' for key 'PRIMARY'"))
    s.done("alter that fails", AUTOCOMMIT, failed=True)
    s.command(Command.QUERY, "check")
    s.send(progress(1, 1, 1000, b"checking"))
    s.result_set([b"Table", b"Msg_text"], [text_row(b"t", b"OK")], AUTOCOMMIT)
    s.done("check", AUTOCOMMIT)


@transcript()
def protocol_corners(s: Script) -> None:
    """Found running MariaDB's own test suite through the proxy:
    - REPAIR TABLE reports progress between its result's rows;
    - a plain execute of a CALL whose procedure holds a cursor open: CURSOR_EXISTS in the EOF
      after the columns, and the rows follow (only an execute that asked for a cursor ends
      there);
    - a prepared LOAD DATA LOCAL INFILE asks for the file like a text one;
    - a cursor that fails to open: ERR where the EOF after the columns was due."""
    s.command(Command.QUERY, "repair")
    s.columns([b"Table", b"Op", b"Msg_type", b"Msg_text"], AUTOCOMMIT)
    s.send(progress(1, 2, 0, b"Enabling keys"))
    s.send(text_row(b"test.t1", b"repair", b"status", b"OK"), s.terminator(AUTOCOMMIT))
    s.done("repair", AUTOCOMMIT)
    s.command(Command.STMT_EXECUTE, "call with a cursor open")
    s.columns([b"a"], AUTOCOMMIT | CURSOR | MORE)
    s.send(binary_row(b"1"), binary_row(b"2"), s.terminator(AUTOCOMMIT | MORE))
    s.send(ok(AUTOCOMMIT))
    s.done("call with a cursor open", AUTOCOMMIT)
    s.command(Command.STMT_EXECUTE, "load data local")
    s.check(_expect_infile(False))
    s.send(b"\xfb/tmp/ld.txt")
    s.check(_expect_infile(True))
    s.client_sends()
    s.client_sends()
    s.send(ok(AUTOCOMMIT, affected=2, info=lenenc_bytes(b"Records: 2")))
    s.done("load data local", AUTOCOMMIT)
    s.expect(Expect.CURSOR, "cursor that fails")
    s.send(lenenc_int(1) + b"\x00")  # cached metadata: no definitions
    s.send(err(1264, "22003", "Out of range value"))
    s.done("cursor that fails", AUTOCOMMIT, failed=True)
    if not s.deprecate_eof:
        s.expect(Expect.CURSOR, "cursor that fails late")
        s.send(lenenc_int(1), column_def(b"f"))
        s.send(err(1264, "22003", "Out of range value"))
        s.done("cursor that fails late", AUTOCOMMIT, failed=True)


@transcript()
def cursor(s: Script) -> None:
    """COM_STMT_EXECUTE with a read-only cursor: the response ends after the column definitions
    (their EOF, or with CLIENT_DEPRECATE_EOF an OK, says CURSOR_EXISTS); rows come with FETCH."""
    s.expect(Expect.CURSOR, "open")
    s.send(lenenc_int(2), column_def(b"a"), column_def(b"b"))
    s.send(s.terminator(AUTOCOMMIT | CURSOR))
    s.done("open", AUTOCOMMIT | CURSOR)
    s.command(Command.STMT_FETCH, "fetch 2")
    s.send(binary_row(b"1", b"2"), binary_row(None, b"\xfe"))
    s.send(s.terminator(AUTOCOMMIT | CURSOR))
    s.done("fetch 2", AUTOCOMMIT | CURSOR)
    s.command(Command.STMT_FETCH, "fetch last")
    s.send(binary_row(b"3", b"4"))
    s.send(s.terminator(AUTOCOMMIT | CURSOR | LAST_ROW))
    s.done("fetch last", AUTOCOMMIT | CURSOR | LAST_ROW)
    s.command(Command.STMT_FETCH, "fetch none")
    s.send(s.terminator(AUTOCOMMIT | CURSOR | LAST_ROW))
    s.done("fetch none", AUTOCOMMIT | CURSOR | LAST_ROW)
    s.command(Command.STMT_FETCH, "fetch closed")
    s.send(err(1243, "HY000", "Unknown prepared statement handler"))
    s.done("fetch closed", AUTOCOMMIT | CURSOR | LAST_ROW, failed=True)
    s.command(Command.STMT_EXECUTE, "no cursor")  # the same statement, without a cursor
    s.result_set([b"a"], [binary_row(b"1")], AUTOCOMMIT)
    s.done("no cursor", AUTOCOMMIT)


@transcript()
def field_list(s: Script) -> None:
    s.command(Command.FIELD_LIST, "t")
    s.send(column_def(b"id", 3), column_def(b"name"), column_def(b"\xfe"))
    s.send(s.terminator(AUTOCOMMIT))
    s.done("t", AUTOCOMMIT)
    s.command(Command.FIELD_LIST, "empty")
    s.send(s.terminator(AUTOCOMMIT))
    s.done("empty", AUTOCOMMIT)
    s.command(Command.FIELD_LIST, "missing")
    s.send(err(1146, "42S02", "Table 'shop.missing' doesn't exist"))
    s.done("missing", AUTOCOMMIT, failed=True)


@transcript()
def statistics(s: Script) -> None:
    """COM_STATISTICS answers one string packet, whatever its first byte; nothing else follows."""
    s.status = AUTOCOMMIT | IN_TRANS
    texts = [
        b"Uptime: 1234  Threads: 1  Questions: 5  Slow queries: 0  Opens: 17  "
        b"Open tables: 10  Queries per second avg: 0.004",
        b"\x00\xff not an OK packet",
        b"\xfe looks like a terminator but is text",
        b"\xfb looks like a LOCAL INFILE request",
        b"\x01\x03 looks like auth more data",
        b"\x03",
    ]
    for i in range(len(texts)):
        s.command(Command.STATISTICS, i)
    s.command(Command.QUERY, "after")
    for i, text in enumerate(texts):
        s.send(text)
        s.done(i, AUTOCOMMIT | IN_TRANS)
    s.send(ok(AUTOCOMMIT, affected=1))
    s.done("after", AUTOCOMMIT)


@transcript()
def simple_commands(s: Script) -> None:
    s.command(Command.PING, "ping")
    s.send(ok(AUTOCOMMIT))
    s.done("ping", AUTOCOMMIT)
    s.command(Command.INIT_DB, "use")
    s.send(ok_with_session_state(AUTOCOMMIT))
    s.done("use", AUTOCOMMIT | STATE_CHANGED)
    s.command(Command.QUERY, "begin")
    s.send(ok(AUTOCOMMIT | IN_TRANS))
    s.done("begin", AUTOCOMMIT | IN_TRANS)
    s.command(Command.STMT_RESET, "reset stmt")
    s.send(ok(AUTOCOMMIT | IN_TRANS))
    s.done("reset stmt", AUTOCOMMIT | IN_TRANS)
    s.command(Command.SET_OPTION, "multi on")  # answers an EOF packet
    s.send(eof(AUTOCOMMIT | IN_TRANS))
    s.done("multi on", AUTOCOMMIT | IN_TRANS)
    s.command(Command.RESET_CONNECTION, "reset")  # ends the transaction
    s.send(ok(AUTOCOMMIT))
    s.done("reset", AUTOCOMMIT)
    s.command(Command.INIT_DB, "use nope")
    s.send(err(1049, "42000", "Unknown database 'nope'"))
    s.done("use nope", AUTOCOMMIT, failed=True)


def _expect_busy(tracker: ResponseTracker) -> None:
    assert not tracker.idle


@transcript()
def change_user(s: Script) -> None:
    """COM_CHANGE_USER: an auth switch, more-data rounds (caching_sha2_password full auth), then
    OK, which also ends the transaction; a second one is refused."""
    s.status = AUTOCOMMIT | IN_TRANS
    s.command(Command.CHANGE_USER, "sha2")
    s.send(build_auth_switch("caching_sha2_password", b"0123456789abcdefghij\0"))
    s.check(_expect_busy)
    s.client_sends()
    s.send(b"\x01\x04")  # perform full authentication
    s.client_sends()  # asks for the public key
    s.send(b"\x01-----BEGIN PUBLIC KEY-----\n" + b"K" * 400 + b"\n-----END PUBLIC KEY-----\n")
    s.client_sends()
    s.send(ok(AUTOCOMMIT))
    s.done("sha2", AUTOCOMMIT)
    s.command(Command.CHANGE_USER, "ed25519")
    s.send(build_auth_switch("client_ed25519", bytes(range(32))))
    s.client_sends()
    s.send(ok(AUTOCOMMIT))
    s.done("ed25519", AUTOCOMMIT)
    s.command(Command.CHANGE_USER, "denied")
    s.send(build_auth_switch("mysql_native_password", b"abcdefghij0123456789\0"))
    s.client_sends()
    s.send(err(1045, "28000", "Access denied for user 'bob'@'localhost' (using password: YES)"))
    s.done("denied", AUTOCOMMIT, failed=True)
    s.command(Command.CHANGE_USER, "fast")
    s.send(build_auth_switch("caching_sha2_password", b"abcdefghij0123456789\0"))
    s.client_sends()
    s.send(b"\x01\x03")  # fast auth success, then OK
    s.send(ok(AUTOCOMMIT))
    s.done("fast", AUTOCOMMIT)


@transcript()
def pipelined(s: Script) -> None:
    """Five commands sent before any answer; COM_STMT_CLOSE expects none and is done, in order,
    with the status of the response before it."""
    s.command(Command.QUERY, "begin")
    s.command(Command.QUERY, "select")
    s.command(Command.STMT_PREPARE, "prepare")
    s.command(Command.STMT_CLOSE, "close")
    s.command(Command.STMT_SEND_LONG_DATA, "long data")
    s.command(Command.PING, "ping")
    s.command(Command.STMT_EXECUTE, "execute")
    s.send(ok(AUTOCOMMIT | IN_TRANS))
    s.done("begin", AUTOCOMMIT | IN_TRANS)
    s.result_set([b"a"], [text_row(b"1"), text_row(b"2")], AUTOCOMMIT | IN_TRANS)
    s.done("select", AUTOCOMMIT | IN_TRANS)
    s.send(prepare_ok(9, 1, 1), column_def(b"?"))
    if not s.deprecate_eof:
        s.send(eof(AUTOCOMMIT | IN_TRANS))
    s.send(column_def(b"a"))
    if not s.deprecate_eof:
        s.send(eof(AUTOCOMMIT | IN_TRANS))
    s.done("prepare", AUTOCOMMIT | IN_TRANS)
    s.done("close", AUTOCOMMIT | IN_TRANS)
    s.done("long data", AUTOCOMMIT | IN_TRANS)
    s.send(ok(AUTOCOMMIT | IN_TRANS))
    s.done("ping", AUTOCOMMIT | IN_TRANS)
    s.result_set([b"a"], [binary_row(b"1")], AUTOCOMMIT | IN_TRANS)
    s.done("execute", AUTOCOMMIT | IN_TRANS)


@transcript()
def nothing_expected(s: Script) -> None:
    """A command without a response is done at once when nothing else is pending."""
    s.command(Command.STMT_CLOSE, "close")
    s.done("close", AUTOCOMMIT)
    s.command(Command.QUERY, "begin")
    s.command(Command.STMT_CLOSE, "close after begin")
    s.send(ok(AUTOCOMMIT | IN_TRANS))
    s.done("begin", AUTOCOMMIT | IN_TRANS)
    s.done("close after begin", AUTOCOMMIT | IN_TRANS)
    s.command(Command.STMT_SEND_LONG_DATA, "long data")
    s.done("long data", AUTOCOMMIT | IN_TRANS)


@transcript()
def transaction_status(s: Script) -> None:
    """The status after each response, as the session must know it to decide it may move."""
    s.command(Command.QUERY, "begin")
    s.send(ok(AUTOCOMMIT | IN_TRANS))
    s.done("begin", AUTOCOMMIT | IN_TRANS)
    s.command(Command.QUERY, "select")
    s.result_set([b"a"], [text_row(b"1")], AUTOCOMMIT | IN_TRANS)
    s.done("select", AUTOCOMMIT | IN_TRANS)
    s.command(Command.QUERY, "fails")
    s.send(err())
    s.done("fails", AUTOCOMMIT | IN_TRANS, failed=True)
    s.command(Command.QUERY, "commit")
    s.send(ok(AUTOCOMMIT))
    s.done("commit", AUTOCOMMIT)
    s.command(Command.QUERY, "start transaction read only")
    s.send(ok(AUTOCOMMIT | IN_TRANS | ServerStatus.IN_TRANS_READONLY))
    s.done("start transaction read only", AUTOCOMMIT | IN_TRANS | ServerStatus.IN_TRANS_READONLY)
    s.command(Command.QUERY, "rollback")
    s.send(ok(AUTOCOMMIT))
    s.done("rollback", AUTOCOMMIT)


# -- the 16 MiB transcripts --------------------------------------------------------------------


@transcript(large=True)
def text_row_starting_fe(s: Script) -> None:
    """A text row whose first value is 16 MiB or longer starts with 0xFE (an 8-byte length): its
    first packet is 0xFFFFFF bytes starting with 0xFE, and the next one, only 10 bytes long here,
    looks like an OK-with-0xFE terminator. Neither ends the result."""
    s.command(Command.QUERY, "select blob")
    s.columns([b"blob"], AUTOCOMMIT)
    size = 1 << 24
    tail = ok(AUTOCOMMIT, header=0xFE) + b"end"  # the last 10 bytes of the value
    big = b"\xfe" + U64.pack(size) + b"\xfe" * (size - len(tail)) + tail
    assert len(big) == MAX_PAYLOAD + 10
    s.send(text_row(b"small"), big, text_row(b"after"))
    s.send(s.terminator(AUTOCOMMIT | IN_TRANS))
    s.done("select blob", AUTOCOMMIT | IN_TRANS)


@transcript(large=True)
def rows_over_16mib(s: Script) -> None:
    """Rows of exactly 16 MiB - 1 (followed by an empty packet), of 16 MiB + 4 whose second packet
    is an EOF lookalike, and of more than 32 MiB (three packets, the third an ERR lookalike)."""
    s.command(Command.QUERY, "select big rows")
    s.columns([b"a", b"b"], AUTOCOMMIT)
    exact = b"\xfd" + U32.pack(MAX_PAYLOAD - 5)[:3] + b"x" * (MAX_PAYLOAD - 5) + b"\xfb"
    assert len(exact) == MAX_PAYLOAD
    tail = b"q" * 95 + eof(AUTOCOMMIT)
    eof_like = (
        b"\xfd" + U32.pack(MAX_PAYLOAD - 100)[:3] + b"y" * (MAX_PAYLOAD - 100) + b"\x64" + tail
    )
    assert len(eof_like) == MAX_PAYLOAD + 5
    size = 2 * MAX_PAYLOAD + 41
    err_tail = err(1317, "70100", "interrupted").ljust(50, b"!")
    three = b"\xfe" + U64.pack(size) + b"\xff" * (size - len(err_tail)) + err_tail + b"\xfb"
    assert len(three) == 2 * MAX_PAYLOAD + 51
    s.send(exact, text_row(b"1", b"2"), eof_like, three, text_row(b"3", b"4"))
    s.send(s.terminator(AUTOCOMMIT))
    s.done("select big rows", AUTOCOMMIT)


@transcript(large=True)
def binary_row_over_16mib(s: Script) -> None:
    """A binary row (COM_STMT_FETCH) of 0xFFFFFF + 5 bytes whose second packet is an EOF lookalike."""
    s.command(Command.STMT_FETCH, "fetch big")
    size = MAX_PAYLOAD - 1
    head = b"\x00\x00" + b"\xfd" + U32.pack(size)[:3]  # 0x00, NULL bitmap, a 3-byte length
    row = head + b"z" * (size - 5) + eof(AUTOCOMMIT | CURSOR | LAST_ROW)
    assert len(row) == MAX_PAYLOAD + 5
    s.send(binary_row(b"1"), row, binary_row(b"2"))
    s.send(s.terminator(AUTOCOMMIT | CURSOR))
    s.done("fetch big", AUTOCOMMIT | CURSOR)


# -- running transcripts ------------------------------------------------------------------------


@dataclass
class Run:
    events: list[Done]
    chunk_ends: list[int]
    tracker: ResponseTracker


def run(script: Script, cuts: Iterable[int]) -> Run:
    """Feed the transcript, cutting the backend's bytes at `cuts` (offsets in the stream)."""
    points = sorted(set(cuts))
    stream = bytes(script.stream)
    events: list[Done] = []
    fed = 0
    chunk_ends = [0]

    def on_done(token: Any, status: int, failed: bool) -> None:
        events.append((token, status, failed, fed))

    tracker = ResponseTracker(script.deprecate_eof, on_done, script.status)
    for kind, arg in script.steps:
        if kind == "expect":
            tracker.expect(*arg)
        elif kind == "data":
            a, b = arg
            inner = points[bisect_right(points, a) : bisect_left(points, b)]
            for x, y in itertools.pairwise([a, *inner, b]):
                fed = y
                tracker.feed(stream[x:y])
                chunk_ends.append(y)
        else:
            arg(tracker)
    return Run(events, chunk_ends, tracker)


def check(script: Script, cuts: Iterable[int]) -> None:
    result = run(script, cuts)
    ends = sorted(set(result.chunk_ends))
    # A response is done while the chunk holding its last byte is fed.
    want = [(t, s, f, ends[bisect_left(ends, end)]) for t, s, f, end in script.want]
    assert result.events == want
    tracker = result.tracker
    assert tracker.idle
    assert tracker.status == script.final_status
    assert not tracker.local_infile
    assert tracker.packets == len(script.packet_starts)  # each packet counted once


def byte_cuts(script: Script) -> Iterable[int]:
    """Every offset; for 16 MiB transcripts every offset except inside long packets, which are
    cut at their first and last bytes and in their middle."""
    n = len(script.stream)
    if n <= 1 << 20:
        return range(1, n)
    cuts: set[int] = set()
    for a, b in itertools.pairwise([*script.packet_starts, n]):
        if b - a <= 256:
            cuts.update(range(a, b))
        else:
            cuts.update(range(a, a + 16))
            cuts.update(range(b - 16, b))
            cuts.update(((a + b) // 2, (a + b) // 2 + 1))
    cuts.discard(0)
    return cuts


def cut_points(script: Script) -> st.SearchStrategy[list[int]]:
    n = len(script.stream)
    if n < 2:
        return st.just([])
    near_header = st.builds(
        lambda start, delta: min(max(start + delta, 1), n - 1),
        st.sampled_from(script.packet_starts),
        st.integers(-6, 12),
    )
    return st.lists(st.one_of(near_header, st.integers(1, n - 1)), max_size=80)


SMALL = sorted(set(SCRIPTS) - LARGE)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_whole(name: str) -> None:
    check(SCRIPTS[name](), ())


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_byte_at_a_time(name: str) -> None:
    script = SCRIPTS[name]()
    check(script, byte_cuts(script))


@pytest.mark.parametrize("name", SMALL)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_random_splits(name: str, data: st.DataObject) -> None:
    script = SCRIPTS[name]()
    check(script, data.draw(cut_points(script), label="cuts"))


@pytest.mark.parametrize("name", sorted(LARGE))
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_random_splits_16mib(name: str, data: st.DataObject) -> None:
    script = SCRIPTS[name]()
    check(script, data.draw(cut_points(script), label="cuts"))


def test_memoryview_chunks_frame_like_bytes() -> None:
    """The relay may hand over memoryviews; the framing is the same."""
    script = SCRIPTS["pipelined[eof]"]()
    plain = run(script, range(0, len(script.stream), 7))
    events: list[Any] = []
    tracker = ResponseTracker(False, lambda t, s, f: events.append((t, s, f)), script.status)
    view = memoryview(bytes(script.stream))
    for kind, arg in script.steps:
        if kind == "expect":
            tracker.expect(*arg)
        elif kind == "data":
            for x in range(arg[0], arg[1], 7):
                tracker.feed(view[x : min(x + 7, arg[1])])
    assert events == [e[:3] for e in plain.events]


# -- what the mapping from commands says --------------------------------------------------------


def test_every_command_the_relay_forwards_has_a_response_shape() -> None:
    assert EXPECT_BY_COMMAND[Command.QUERY] is Expect.RESULT
    assert EXPECT_BY_COMMAND[Command.STMT_EXECUTE] is Expect.BINARY
    assert EXPECT_BY_COMMAND[Command.STMT_FETCH] is Expect.FETCH
    assert EXPECT_BY_COMMAND[Command.STMT_PREPARE] is Expect.PREPARE
    assert EXPECT_BY_COMMAND[Command.FIELD_LIST] is Expect.FIELD_LIST
    assert EXPECT_BY_COMMAND[Command.CHANGE_USER] is Expect.AUTH
    for cmd in (Command.STMT_CLOSE, Command.STMT_SEND_LONG_DATA, Command.QUIT):
        assert EXPECT_BY_COMMAND[cmd] is Expect.NOTHING
    for cmd in (
        Command.PING,
        Command.STATISTICS,
        Command.INIT_DB,
        Command.RESET_CONNECTION,
        Command.STMT_RESET,
        Command.SET_OPTION,
        Command.PROCESS_KILL,
    ):
        assert EXPECT_BY_COMMAND[cmd] is Expect.SINGLE
    # Replication streams never end: the tracker cannot frame them, so they have no entry.
    for cmd in (Command.BINLOG_DUMP, Command.BINLOG_DUMP_GTID, Command.REGISTER_SLAVE):
        assert cmd not in EXPECT_BY_COMMAND


# -- bytes no response can hold -----------------------------------------------------------------


def _result_set_head() -> bytes:
    return frame(lenenc_int(1), 1) + frame(column_def(b"a"), 2) + frame(eof(AUTOCOMMIT), 3)


GARBAGE: dict[str, tuple[Expect, bool, bytes]] = {
    "a response nobody asked for": (
        Expect.RESULT,
        False,
        frame(ok(AUTOCOMMIT), 1) + frame(ok(AUTOCOMMIT), 1),
    ),
    "an empty packet": (Expect.RESULT, False, frame(b"", 1)),
    "column definitions without their EOF": (
        Expect.RESULT,
        False,
        frame(lenenc_int(1), 1) + frame(column_def(b"a"), 2) + frame(text_row(b"1"), 3),
    ),
    "a PREPARE_OK too short": (Expect.PREPARE, False, frame(b"\x00\x01\x00\x00\x00", 1)),
    "PREPARE answered by a row": (Expect.PREPARE, False, frame(b"\x05hello", 1)),
    "parameter definitions without their EOF": (
        Expect.PREPARE,
        False,
        frame(prepare_ok(1, 0, 1), 1) + frame(column_def(b"?"), 2) + frame(b"\x01", 3),
    ),
    "an OK without status flags": (Expect.RESULT, True, frame(b"\x00\x00\x00", 1)),
    "an OK with a bad length-encoded integer": (
        Expect.RESULT,
        True,
        frame(b"\x00\xff\x00\x00\x00\x00", 1),
    ),
    "a column count cut short": (Expect.BINARY, True, frame(b"\xfc\x05", 1)),
    "a terminator too short": (
        Expect.RESULT,
        False,
        _result_set_head() + frame(text_row(b"1"), 4) + frame(b"\xfe\x00", 5),
    ),
    "an OK after change user without status": (Expect.AUTH, False, frame(b"\x00\x00", 1)),
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
@pytest.mark.parametrize("bytewise", [False, True])
def test_backend_garbage_raises_protocol_error_from_the_backend(case: str, bytewise: bool) -> None:
    kind, deprecate_eof, data = GARBAGE[case]
    tracker = ResponseTracker(deprecate_eof, lambda *_: None)
    tracker.expect(kind, case)
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    with pytest.raises(ProtocolError) as info:
        for chunk in chunks:
            tracker.feed(chunk)
    assert info.value.origin is Origin.BACKEND


@pytest.mark.parametrize("bytewise", [False, True])  # whole: the compiled scan; bytewise: Python
def test_a_failed_response_leaves_its_error_code(bytewise: bool) -> None:
    """The relay reads `error` after a failure (a Galera node's 1047 puts it in doubt)."""
    codes: list[int] = []
    t = ResponseTracker(True, lambda token, status, failed: codes.append(t.error if failed else 0))
    stream = b"".join((
        frame(err(1047, "08S01", "WSREP has not yet prepared node for application use"), 1),
        frame(ok(AUTOCOMMIT), 1),
        frame(b"\x01", 1), frame(column_def(b"a"), 2), frame(text_row(b"1"), 3),
        frame(err(1317, "70100", "Query execution was interrupted"), 4),  # between rows
        frame(err(1146, "42S02", "Table 'shop.nope' doesn't exist"), 1),  # a single answer
    ))
    for _ in range(3):
        t.expect(Expect.RESULT)
    t.expect(Expect.SINGLE)
    for chunk in ([stream[i : i + 1] for i in range(len(stream))] if bytewise else [stream]):
        t.feed(chunk)
    assert codes == [1047, 0, 1317, 1146]
    assert t.idle
