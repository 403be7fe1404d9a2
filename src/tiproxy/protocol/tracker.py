"""Where each backend response ends, and the server status after it, without copying rows.

Theory of operation
-------------------
The proxy forwards the backend's bytes to the client in whole chunks, untouched. Beside that it
feeds every chunk to a ResponseTracker, which walks the 4-byte packet headers in place and moves
a small state machine per packet. Only the packets that decide something are read: the first
packet of a result (OK, ERR, LOCAL INFILE request or column count), the terminators (EOF or the
OK that replaces it under CLIENT_DEPRECATE_EOF) and the PREPARE_OK. Column definitions and rows are
skipped by length; of a row only its first byte is looked at. A packet that straddles two chunks
is carried over only when it must be read whole (a few bytes); otherwise the tracker remembers how
many bytes of it to skip.

Each command the relay sends pushes what it expects back (`expect`). When a response completes the
tracker calls `on_done(token, status, failed)` (a failed one's ERR code is then in `error`) and
starts on the next expected response; a response with SERVER_MORE_RESULTS_EXISTS in its
terminator continues with the next result. `packets` counts the packets whose header it read
(every one, once; the owner takes the count and resets it, for the traffic metrics).

What each command's response looks like (Expect), the state machine's phases, the readers of
status flags, MariaDB's two changes to the layouts and the terminator rule are
protocol/responses.py's, shared with the compiled relay path.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from tiproxy.protocol.codec import U16, U32, Buffer
from tiproxy.protocol.constants import MAX_PAYLOAD, ServerStatus
from tiproxy.protocol.errors import Origin, ProtocolError
from tiproxy.protocol.responses import (
    AUTH,
    COLUMNS,
    COLUMNS_EOF,
    CURSOR_BINARY,
    FIELDS,
    FIRST,
    FIRST_STEP,
    IDLE,
    PREPARE_DEFS,
    PREPARE_EOF,
    PREPARE_OK,
    ROWS,
    SINGLE,
    Expect,
    backend_lenenc,
    error_code,
    is_progress,
    ok_status,
    terminator_status,
)
from tiproxy.protocol.rows import scan_result, skip_plain_rows

_NOTHING = Expect.NOTHING
# Plain ints: IntFlag arithmetic costs a Python call per operation on the hot path.
_MORE = int(ServerStatus.MORE_RESULTS_EXISTS)
_CURSOR = int(ServerStatus.CURSOR_EXISTS)


class ResponseTracker:
    """Frames the backend's responses; see the module docstring."""

    __slots__ = (
        "_binary", "_carry", "_columns", "_continued", "_defs_left", "_eof_after_defs",
        "_pending", "_skip", "deprecate_eof", "error", "local_infile", "on_done", "packets",
        "phase", "prepared", "status",
    )

    def __init__(self, deprecate_eof: bool, on_done: Callable[[Any, int, bool], None],
                 status: int = ServerStatus.AUTOCOMMIT) -> None:
        self.deprecate_eof = deprecate_eof
        self.on_done = on_done
        self.status = status
        self.phase = IDLE
        self.error = 0  # the code of the last response that failed (an ERR), 0 before any
        self.local_infile = False  # the backend asked for a file; the client is sending it
        self.packets = 0  # packets read since the owner last took the count
        # (statement id, columns, params) of the last PREPARE_OK, for the session to record.
        self.prepared: tuple[int, int, int] | None = None
        self._pending: deque[tuple[Expect, Any]] = deque()
        # A packet split across chunks that must be read whole. Only small packets are wanted
        # whole (headers, terminators, PREPARE_OK); one packet is at most 16 MiB by framing.
        self._carry = bytearray()
        self._skip = 0  # payload bytes of the current packet still to pass over
        self._continued = False  # the last packet was 16 MiB: the next one continues it
        self._binary = 0  # 0 text, 1 binary, CURSOR_BINARY: a cursor was asked for
        self._columns = 0
        self._defs_left = 0
        self._eof_after_defs = 0  # PREPARE: column definitions still to come after the params

    # -- the relay's side -------------------------------------------------------------------

    def expect(self, kind: Expect, token: Any = None) -> None:
        """A command was sent: its response comes after those already expected."""
        if kind is _NOTHING and not self._pending:
            self.on_done(token, self.status, False)
            return
        # Behind other responses, a command without one is done right after them, in order.
        self._pending.append((kind, token))
        if self.phase == IDLE:
            self._start_next()

    @property
    def idle(self) -> bool:
        return self.phase == IDLE and not self._pending

    def restart(self, status: int) -> None:
        """The backend connection was replaced with responses outstanding (its backend died):
        they will never come; the new connection starts idle with `status`."""
        self._pending.clear()
        self._carry.clear()
        self._skip = 0
        self._continued = False
        self.phase = IDLE
        self.local_infile = False
        self.prepared = None
        self.status = status

    @property
    def pending(self) -> int:
        return len(self._pending)

    def feed(self, data: Buffer) -> None:
        """Scan a chunk the backend sent. Raises ProtocolError on bytes no response can hold."""
        n = len(data)
        pos = 0
        if self._skip:
            if self._skip >= n:
                self._skip -= n
                return
            pos = self._skip
            self._skip = 0
        if self._carry:
            pos = self._fill_carry(data, pos)
            if pos >= n:
                return
        self._scan(data, pos)

    # -- scanning ---------------------------------------------------------------------------

    def _scan(self, data: Buffer, pos: int) -> None:
        n = len(data)
        unpack = U32.unpack_from
        while pos + 4 <= n:
            phase = self.phase
            if phase == FIRST and scan_result is not None and not self._continued:
                # A whole small result in this chunk: one compiled call instead of a Python
                # step per packet. None means "not plain": the state machine below reads it.
                whole = scan_result(data, pos, self.deprecate_eof, self._binary, self.status)
                if whole is not None:
                    pos, status, error, packets = whole
                    self.packets += packets
                    self._finish(status, error)
                    continue
            if phase == ROWS and not self._continued:
                pos, rows = skip_plain_rows(data, pos)
                self.packets += rows
                if pos + 4 > n:
                    break
            self.packets += 1  # its header is read here: it is handled or carried below
            length = unpack(data, pos)[0] & 0xFFFFFF
            start = pos + 4
            end = start + length
            if phase == COLUMNS and end <= n and not self._continued:
                # Inlined _packet for the commonest packet of a small result.
                self._columns -= 1
                if not self._columns:
                    self.phase = ROWS if self.deprecate_eof else COLUMNS_EOF
                pos = end
                continue
            if self._continued:
                # The rest of a 16 MiB packet: raw data whatever its first byte.
                self._continued = length == MAX_PAYLOAD
            elif end <= n or (start < n and not self._wants_whole(data[start], length)):
                self._packet(data, start, length)
                if length == MAX_PAYLOAD:
                    self._continued = True
            else:
                self._carry += data[pos:]
                return
            if end > n:
                self._skip = end - n
                return
            pos = end
        if pos < n:
            self._carry += data[pos:]

    def _fill_carry(self, data: Buffer, pos: int) -> int:
        """Complete the carried packet from `data`; returns where scanning resumes."""
        carry = self._carry
        n = len(data)
        if len(carry) < 4:
            take = min(4 - len(carry), n - pos)
            carry += data[pos : pos + take]
            pos += take
            if len(carry) < 4:
                return n
            self.packets += 1  # a header carried over in pieces is whole only now
        length = U32.unpack_from(carry, 0)[0] & 0xFFFFFF
        have = len(carry) - 4
        if self._continued:
            self._carry = bytearray()
            self._continued = length == MAX_PAYLOAD
            return self._skip_from(pos, n, length - have)
        if length and not have:
            if pos >= n:
                return n
            if not self._wants_whole(data[pos], length):
                self._carry = bytearray()
                self._packet(bytes((data[pos],)), 0, length)
                self._continued = length == MAX_PAYLOAD
                return self._skip_from(pos, n, length)
        take = min(length - have, n - pos)
        carry += data[pos : pos + take]
        pos += take
        if len(carry) - 4 < length:
            return n
        self._carry = bytearray()
        self._packet(carry, 4, length)
        self._continued = length == MAX_PAYLOAD
        return pos

    def _skip_from(self, pos: int, n: int, count: int) -> int:
        if pos + count > n:
            self._skip = pos + count - n
            return n
        return pos + count

    def _wants_whole(self, first: int, length: int) -> bool:
        """Whether a packet must be read whole, knowing only its first byte and length.

        Every packet that may end the response is read whole, so that a response is done only
        once its last byte is in: a session the relay calls idle has no bytes still to come.
        """
        phase = self.phase
        if phase in (ROWS, FIELDS):
            return first in (0xFE, 0xFF) and length < MAX_PAYLOAD
        if phase == COLUMNS:
            return False
        if phase == PREPARE_DEFS:
            return self._defs_left == 1  # the last definition may end the response
        return True  # SINGLE included: its one packet ends the response

    # -- the state machine ------------------------------------------------------------------

    def _packet(self, buf: Buffer, start: int, length: int) -> None:  # noqa: PLR0915 - one table
        """One packet; buf[start] is always there, the rest only if _wants_whole said so."""
        phase = self.phase
        if length == 0:
            raise ProtocolError(f"empty packet in response phase {phase}", Origin.BACKEND)
        if phase == ROWS:
            first = buf[start]
            if first == 0xFE and length < MAX_PAYLOAD:
                self._end_result(terminator_status(buf, start, length))
            elif first == 0xFF and not is_progress(buf, start, length):
                # (REPAIR TABLE reports progress between its rows)
                self._finish(self.status, error_code(buf, start, length))
            return
        if phase == COLUMNS:
            self._columns -= 1
            if not self._columns:
                self.phase = ROWS if self.deprecate_eof else COLUMNS_EOF
            return
        first = buf[start]
        if phase == FIRST:
            self._first(buf, start, length, first)
        elif phase == COLUMNS_EOF:
            if first == 0xFF:
                if not is_progress(buf, start, length):
                    # a cursor that failed to open
                    self._finish(self.status, error_code(buf, start, length))
                return
            if first != 0xFE:
                raise ProtocolError("column definitions not followed by EOF", Origin.BACKEND)
            status = terminator_status(buf, start, length)
            if self._binary == CURSOR_BINARY and status & _CURSOR:
                self._end_result(status)  # a cursor: rows come with COM_STMT_FETCH
            else:
                self.status = status
                self.phase = ROWS
        elif phase == SINGLE:
            # Any shape: COM_STATISTICS answers a bare string, whatever its first byte. The
            # status is taken from the packet only when it reads as an OK or an EOF.
            if first == 0x00 and length >= 7:
                with suppress(ProtocolError):
                    self.status = ok_status(buf, start, length)
            elif first == 0xFE and length == 5:
                self.status = terminator_status(buf, start, length)
            self._finish(self.status, error_code(buf, start, length) if first == 0xFF else 0)
        elif phase == FIELDS:
            if first == 0xFE and length < MAX_PAYLOAD:
                self._finish(terminator_status(buf, start, length), 0)
            elif first == 0xFF:
                self._finish(self.status, error_code(buf, start, length))
        elif phase == PREPARE_OK:
            self._prepare_ok(buf, start, length, first)
        elif phase == PREPARE_DEFS:
            self._defs_left -= 1
            if not self._defs_left:  # without EOFs the next definitions or the end follow
                if self.deprecate_eof:
                    self._after_prepare_eof()
                else:
                    self.phase = PREPARE_EOF
        elif phase == PREPARE_EOF:
            if first != 0xFE:
                raise ProtocolError("prepared statement definitions without EOF", Origin.BACKEND)
            self._after_prepare_eof()
        elif phase == AUTH:
            if first == 0x00:
                self._finish(ok_status(buf, start, length), 0)
            elif first == 0xFF:
                self._finish(self.status, error_code(buf, start, length))
            # 0xFE auth switch and 0x01 more data: the client answers, the exchange goes on.
        else:
            raise ProtocolError(f"backend sent a packet nobody asked for (0x{first:02x})",
                                Origin.BACKEND)

    def _first(self, buf: Buffer, start: int, length: int, first: int) -> None:
        if first == 0x00:
            self._end_result(ok_status(buf, start, length))
        elif first == 0xFF:
            if not is_progress(buf, start, length):  # a report: the answer is still to come
                self._finish(self.status, error_code(buf, start, length))
        elif first == 0xFB:
            # LOCAL INFILE (a prepared LOAD DATA LOCAL too): the OK or ERR comes after the
            # client's file. No column count starts with 0xFB (the length-encoded NULL).
            self.local_infile = True
        elif first == 0xFE:
            self._end_result(terminator_status(buf, start, length))
        else:
            count, end = (first, start + 1) if first < 0xFB else backend_lenenc(buf, start)
            if end > start + length:
                raise ProtocolError("column count longer than its packet", Origin.BACKEND)
            if count == 0:
                raise ProtocolError("result set with no columns", Origin.BACKEND)
            if end < start + length and buf[end] == 0:
                # CACHE_METADATA's "metadata follows" byte says no: no column definitions.
                self.phase = ROWS if self.deprecate_eof else COLUMNS_EOF
                return
            self._columns = count
            self.phase = COLUMNS

    def _prepare_ok(self, buf: Buffer, start: int, length: int, first: int) -> None:
        if first == 0xFF:
            self._finish(self.status, error_code(buf, start, length))
            return
        if first != 0x00 or length < 12:
            raise ProtocolError("malformed PREPARE_OK", Origin.BACKEND)
        stmt_id = U32.unpack_from(buf, start + 1)[0]
        columns = U16.unpack_from(buf, start + 5)[0]
        params = U16.unpack_from(buf, start + 7)[0]
        self.prepared = (stmt_id, columns, params)
        self._eof_after_defs = columns
        if params:
            self._defs_left = params
            self.phase = PREPARE_DEFS
        else:
            self._after_prepare_eof()

    def _after_prepare_eof(self) -> None:
        columns = self._eof_after_defs
        self._eof_after_defs = 0
        if columns:
            self._defs_left = columns
            self.phase = PREPARE_DEFS
        else:
            self._finish(self.status, 0)

    def _end_result(self, status: int) -> None:
        if status & _MORE:
            self.status = status
            self.phase = FIRST
        else:
            self._finish(status, 0)

    def _finish(self, status: int, error: int) -> None:
        """The response ends: `error` is its ERR's code, 0 when it succeeded."""
        status &= ~_MORE  # an ERR after a result that announced more still ends the response
        self.status = status
        self.local_infile = False
        pending = self._pending
        _, token = pending.popleft()
        self.phase = IDLE
        silent: list[Any] | None = None
        if pending and pending[0][0] is _NOTHING:
            silent = []  # commands without a response of their own: done with this one
            while pending and pending[0][0] is _NOTHING:
                silent.append(pending.popleft()[1])
        if pending:
            self._start_next()
        if error:
            self.error = error
        self.on_done(token, status, bool(error))
        if silent:
            for other in silent:
                self.on_done(other, status, False)

    def _start_next(self) -> None:
        self._binary, self.phase = FIRST_STEP[self._pending[0][0]]
