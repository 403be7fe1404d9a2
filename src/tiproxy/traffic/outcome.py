"""What a response says: its error, rows affected, rows sent, a checksum of its result sets.

Capture and replay compute it the same way, so that the two compare: the capture from the bytes
of a response the relay forwarded (read once it ended, in the writer), the replay from the
packets its own connection reads. Only what does not depend on the client's capabilities goes
in, so a replaying client with other capabilities gets the same figures for the same result:
- rows affected: the sum over the response's OK packets;
- rows sent: the row packets of its result sets;
- the checksum: CRC-32 over, for each result set, its column count then each row's payload;
- the column types: CRC-32 of every result set's column types, in order; unknown when a result
  set came without its column definitions (MariaDB's cached metadata: an execute of a prepared
  statement whose client has them already).
Sequence ids, the EOF-or-OK terminators (CLIENT_DEPRECATE_EOF), column names and MariaDB's
extended metadata stay out.
Response layouts: https://dev.mysql.com/doc/dev/mysql-server/latest/page_protocol_command_phase.html
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tiproxy.client.channel import column_type
from tiproxy.protocol.codec import U16, U32, lenenc_int, read_lenenc_int
from tiproxy.protocol.constants import MAX_PAYLOAD, Command, ServerStatus
from tiproxy.protocol.errors import Origin, ProtocolError
from tiproxy.protocol.packets import parse_err
from tiproxy.protocol.responses import EXPECT_BY_COMMAND, Expect, terminator_status

_MORE = ServerStatus.MORE_RESULTS_EXISTS
_CURSOR = ServerStatus.CURSOR_EXISTS

# Phases: plain ints, one comparison per packet.
FIRST, COLUMNS, COLUMNS_EOF, ROWS, INFILE, SINGLE, PREPARE, PREPARE_DEFS, FIELDS, AUTH, DONE = \
    range(11)
_START = {Expect.RESULT: FIRST, Expect.BINARY: FIRST, Expect.CURSOR: FIRST, Expect.SINGLE: SINGLE,
          Expect.PREPARE: PREPARE, Expect.FETCH: ROWS, Expect.FIELD_LIST: FIELDS,
          Expect.AUTH: AUTH, Expect.NOTHING: DONE}


@dataclass(slots=True)
class Outcome:
    error: int = 0  # the ERR's code; 0: it succeeded
    message: str = ""  # the ERR's message
    status: int | None = None  # the server status after the response, when it said one
    affected: int | None = None  # None: no OK packet
    rows: int | None = None  # None: no result set
    checksum: int | None = None  # None: no result set
    types: int | None = None  # None: no result set, or one without its column definitions
    prepared: tuple[int, int, int] | None = None  # PREPARE_OK: (statement id, columns, params)


def expect_of(packet: bytes) -> Expect:
    """What the response to a command (its payload, command byte first) looks like."""
    cmd = packet[0]
    kind = EXPECT_BY_COMMAND.get(cmd, Expect.SINGLE)
    if cmd == Command.STMT_EXECUTE and len(packet) > 5 and packet[5] & 0x07:
        return Expect.CURSOR
    return kind


class OutcomeReader:
    """Fed the packets of one response (payloads, a 16 MiB packet's continuations joined);
    `feed` says when the response is complete, `outcome` what it said."""

    def __init__(self, kind: Expect, deprecate_eof: bool, extended_metadata: bool = False,
                 ) -> None:
        self.outcome = Outcome()
        self._kind = kind
        self._eof = deprecate_eof
        self._extended = extended_metadata
        self._phase = _START[kind]
        self._left = 0  # column definitions still to come
        self._crc: int | None = None
        self._types: int | None = None
        self._blind = False  # a result set without column definitions: no types
        self._after_defs = 0  # PREPARE: column definitions after the parameters'
        self.asked_for_file = False  # LOCAL INFILE: the client must answer with the file now

    @property
    def done(self) -> bool:
        return self._phase == DONE

    def feed(self, p: bytes) -> bool:
        if not p:
            raise ProtocolError("empty packet in a response", Origin.BACKEND)
        phase = self._phase
        if phase == ROWS:
            self._row(p)
        elif phase == COLUMNS:
            self._types = zlib.crc32(bytes((column_type(p, self._extended)[0],)),
                                     self._types or 0)
            self._left -= 1
            if not self._left:
                self._phase = ROWS if self._eof else COLUMNS_EOF
        elif phase in (FIRST, INFILE):
            self._first(p, phase == INFILE)
        elif phase == COLUMNS_EOF:
            self._columns_eof(p)
        elif phase == SINGLE:
            if p[0] == 0x00 and len(p) >= 7:
                self._ok(p, final=True)
            elif not self._error(p):
                self._phase = DONE
        elif phase in (PREPARE, PREPARE_DEFS):
            self._prepare(p)
        elif phase == FIELDS:
            if p[0] == 0xFE and len(p) < MAX_PAYLOAD:
                self._end(terminator_status(p, 0, len(p)))
            else:
                self._error(p)
        elif phase == AUTH:
            if p[0] == 0x00:
                self._ok(p, final=True)
            else:
                self._error(p)
        else:
            raise ProtocolError("a packet after the response ended", Origin.BACKEND)
        return self._phase == DONE

    def _first(self, p: bytes, after_file: bool) -> None:
        first = p[0]
        if first == 0x00:
            self._ok(p, final=False)
        elif first == 0xFF:
            self._error(p)
        elif first == 0xFB and not after_file:
            self._phase = INFILE  # the client's file goes to the server; its OK or ERR follows
            self.asked_for_file = True
        elif first == 0xFE:
            self._end(terminator_status(p, 0, len(p)))
        else:
            count, end = read_lenenc_int(p, 0)
            self._crc = zlib.crc32(lenenc_int(count), self._crc or 0)
            self.outcome.rows = self.outcome.rows or 0
            if end < len(p) and p[end] == 0:  # MariaDB's cached metadata: no definitions
                self._blind = True
                self._phase = ROWS if self._eof else COLUMNS_EOF
            else:
                self._left = count
                self._phase = COLUMNS

    def _columns_eof(self, p: bytes) -> None:
        if self._error(p):
            return
        status = terminator_status(p, 0, len(p))
        if self._kind is Expect.CURSOR and status & _CURSOR:
            self._end(status)  # a cursor: rows come with COM_STMT_FETCH
        else:
            self._phase = ROWS

    def _row(self, p: bytes) -> None:
        if p[0] == 0xFE and len(p) < MAX_PAYLOAD:
            self._end(terminator_status(p, 0, len(p)))
        elif not (p[0] == 0xFF and self._error(p)):
            self.outcome.rows = (self.outcome.rows or 0) + 1
            self._crc = zlib.crc32(p, self._crc or 0)

    def _prepare(self, p: bytes) -> None:
        if self._phase == PREPARE:
            if self._error(p):
                return
            if p[0] != 0x00 or len(p) < 12:
                raise ProtocolError("malformed PREPARE_OK", Origin.BACKEND)
            columns, params = U16.unpack_from(p, 5)[0], U16.unpack_from(p, 7)[0]
            self.outcome.prepared = (U32.unpack_from(p, 1)[0], columns, params)
            self._after_defs = columns
            self._left = params + (1 if params and not self._eof else 0)
            self._phase = PREPARE_DEFS
        else:
            self._left -= 1
        while not self._left:
            if not self._after_defs:
                self._phase = DONE
                return
            self._left = self._after_defs + (0 if self._eof else 1)
            self._after_defs = 0

    def _ok(self, p: bytes, final: bool) -> None:
        affected, pos = read_lenenc_int(p, 1)
        _, pos = read_lenenc_int(p, pos)
        self.outcome.affected = (self.outcome.affected or 0) + affected
        status = U16.unpack_from(p, pos)[0] if pos + 2 <= len(p) else 0
        if final:
            self.outcome.status = status
            self._phase = DONE
        else:
            self._end(status)

    def _error(self, p: bytes) -> bool:
        """An ERR packet ends the response (False: not an ERR); a progress report does not."""
        if p[0] != 0xFF:
            return False
        if p[1:3] == b"\xff\xff":
            return True  # MariaDB's progress report: the answer is still to come
        err = parse_err(p)
        self.outcome.error = err.code or 1
        self.outcome.message = err.message
        self._crc = self._types = None  # a failed response has no result to compare
        self._finish()
        return True

    def _end(self, status: int) -> None:
        """A result ended with `status`: the next one follows, or the response is done."""
        self.outcome.status = status & ~_MORE
        if status & _MORE:
            self._phase = FIRST
        else:
            self._finish()

    def _finish(self) -> None:
        self._phase = DONE
        self.outcome.checksum = self._crc
        if not self._blind:
            self.outcome.types = self._types


_COUNTS = [lenenc_int(i) for i in range(251)]


def _plain_results(data: bytes, deprecate_eof: bool, strings: int) -> Summary | None:
    """The common captured response (OKs and result sets, nothing long, cached or unusual) read
    in one loop, as OutcomeReader would read it; None for anything else (the reader reads it):
    the writer reads every captured response, so this is the capture's cost per command."""
    n, pos = len(data), 0
    crc: int | None = None
    types: int | None = None
    blind = False  # a result set without its column definitions: no types
    rows: int | None = None
    affected: int | None = None
    while pos + 4 < n:
        start = pos + 4
        end = start + (_unpack(data, pos)[0] & 0xFFFFFF)
        first = data[start]
        if end > n or end - start >= MAX_PAYLOAD or first in (0xFB, 0xFE, 0xFF):
            return None
        if first == 0x00:  # OK
            count, p = read_lenenc_int(data, start + 1)
            _, p = read_lenenc_int(data, p)
            affected = (affected or 0) + count
            status = U16.unpack_from(data, p)[0] if p + 2 <= end else 0
            pos = end
        else:
            # A count of 251 or more is left to the reader; MariaDB's cached metadata adds a
            # byte to the count: 1 when the definitions follow, 0 when they do not.
            if first >= 0xFB or end > start + 2 or (end == start + 2 and data[start + 1] > 1):
                return None
            crc = zlib.crc32(_COUNTS[first], crc or 0)
            if end == start + 2 and data[start + 1] == 0:
                blind, pos = True, end
            else:
                types, pos = _columns(data, end, first, strings, types or 0)
            if not deprecate_eof:  # the EOF after the definitions
                pos += 4 + (_unpack(data, pos)[0] & 0xFFFFFF)
            rows = rows or 0
            pos, count, crc = sum_rows(data, pos, crc)
            rows += count
            while True:
                start = pos + 4
                end = start + (_unpack(data, pos)[0] & 0xFFFFFF)
                if end > n or end - start >= MAX_PAYLOAD:
                    return None
                first = data[start]
                pos = end
                if first == 0xFE:
                    status = terminator_status(data, start, end - start)
                    break
                if first == 0xFF:
                    return None
                rows += 1
                crc = zlib.crc32(data[start:end], crc)
        if not status & _MORE:
            return (affected, rows, crc, None if blind else types) if pos == n else None
    return None


def _columns(data: bytes, pos: int, count: int, strings: int, crc: int) -> tuple[int, int]:
    """The column types' CRC after `crc`, and where the definitions end."""
    types = bytearray()
    for _ in range(count):
        end = pos + 4 + (_unpack(data, pos)[0] & 0xFFFFFF)
        q = pos + 4
        for _ in range(strings):  # catalog, schema, table, org_table, name, org_name
            size = data[q]
            if size >= 0xFB:
                raise ProtocolError("a long name: left to the reader", Origin.BACKEND)
            q += 1 + size
        types.append(data[q + 7])  # after the fixed fields' length, charset and length
        pos = end
    return zlib.crc32(types, crc), pos


_unpack = U32.unpack_from


def _sum_rows_py(data: bytes, pos: int, crc: int) -> tuple[int, int, int]:
    """Where the plain whole rows from `pos` end, how many, and the CRC-32 of their payloads
    after `crc` (rows as rows.skip_plain_rows passes them). _rowscan.c compiles it."""
    n, rows = len(data), 0
    while pos + 4 < n:
        length = _unpack(data, pos)[0] & 0xFFFFFF
        end = pos + 4 + length
        if end > n or length in (0, MAX_PAYLOAD) or data[pos + 4] in (0xFE, 0xFF):
            break
        crc = zlib.crc32(data[pos + 4 : end], crc)
        rows += 1
        pos = end
    return pos, rows, crc


SumRows = Callable[[bytes, int, int], "tuple[int, int, int]"]
sum_rows: SumRows
try:
    from tiproxy.protocol._rowscan import sum_rows
except ImportError:  # pragma: no cover - built by setup.py; the Python loop is the fallback
    sum_rows = _sum_rows_py


def packets(data: bytes) -> Iterator[bytes]:
    """The packets' payloads in raw protocol bytes, a 16 MiB packet joined to its continuation.
    Raises ProtocolError at a packet cut short."""
    pos, n = 0, len(data)
    pending: list[bytes] = []
    while pos < n:
        if pos + 4 > n:
            raise ProtocolError("a packet header cut short", Origin.BACKEND)
        length = U32.unpack_from(data, pos)[0] & 0xFFFFFF
        end = pos + 4 + length
        if end > n:
            raise ProtocolError("a packet cut short", Origin.BACKEND)
        pending.append(data[pos + 4 : end])
        pos = end
        if length < MAX_PAYLOAD:
            yield pending[0] if len(pending) == 1 else b"".join(pending)
            pending = []


# rows affected, rows sent, checksum, column types
Summary = tuple[int | None, int | None, int | None, int | None]


def summary_of(response: bytes, packet: bytes, deprecate_eof: bool,
               extended_metadata: bool) -> Summary | None:
    """Rows affected, rows sent, checksum and column types of a whole captured response to
    `packet` (as OutcomeReader reads them); None if its bytes do not make one."""
    kind = expect_of(packet)
    if kind is Expect.RESULT or kind is Expect.BINARY:
        try:
            quick = _plain_results(response, deprecate_eof, 7 if extended_metadata else 6)
        except (ProtocolError, IndexError, struct.error):  # cut short: the reader says where
            quick = None
        if quick is not None:
            return quick
    reader = OutcomeReader(kind, deprecate_eof, extended_metadata)
    try:
        for payload in packets(response):
            if reader.feed(payload):
                break
    except ProtocolError:
        return None
    o = reader.outcome
    return (o.affected, o.rows, o.checksum, o.types) if reader.done else None
