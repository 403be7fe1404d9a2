"""What each command's response looks like, and the few fields of its packets that the proxy
reads: the shared vocabulary of the ResponseTracker (protocol/tracker.py), the compiled relay
path that stands in for it (net/_hotpath.c), and the clients of the proxy's own.

A command's Expect says the shape of its answer; the tracker's phases (plain ints, compared once
per packet on the hot path) say where in that shape a response is. Status flags are read from
an EOF packet (5 bytes) or an OK packet (7 bytes or more), by the terminator rule below.

Response layouts: https://dev.mysql.com/doc/dev/mysql-server/latest/page_protocol_command_phase.html
MariaDB's extended capabilities change two shapes (https://mariadb.com/kb/en/err_packet/ ,
https://mariadb.com/kb/en/result-set-packets/): with PROGRESS, ERR packets with error code 0xFFFF
are progress reports, and the real answer still follows; with CACHE_METADATA, a column count is
followed by one more byte, 0 when the column definitions are left out (an execute of a prepared
statement whose client already has them). Both are read from the packets themselves: without the
capability no server sends an error 0xFFFF or a byte after the column count.

Terminator rule: a packet starting 0xFE with a payload shorter than 0xFFFFFF ends a row stream;
a text row may start with 0xFE only as an 8-byte length, which makes its packet 16 MiB long. A
terminator of 5 bytes is an EOF packet (warnings, status); a longer one is an OK packet.
"""

from __future__ import annotations

import enum

from tiproxy.protocol.codec import U16, Buffer, read_lenenc_int
from tiproxy.protocol.constants import Command
from tiproxy.protocol.errors import Origin, ProtocolError


class Expect(enum.IntEnum):
    """What a command's response looks like."""

    NOTHING = 0  # COM_STMT_CLOSE, COM_STMT_SEND_LONG_DATA, COM_QUIT
    RESULT = 1  # OK | ERR | LOCAL INFILE | text result sets, possibly several
    BINARY = 2  # COM_STMT_EXECUTE: OK | ERR | LOCAL INFILE | binary result sets
    SINGLE = 3  # exactly one packet of any shape (COM_PING, COM_STATISTICS, ...)
    PREPARE = 4  # PREPARE_OK, parameter and column definitions | ERR
    FETCH = 5  # binary rows then a terminator | ERR
    FIELD_LIST = 6  # column definitions then a terminator | ERR
    AUTH = 7  # COM_CHANGE_USER: auth switch and more-data rounds, then OK | ERR
    # COM_STMT_EXECUTE that asked for a cursor: as BINARY, and a CURSOR_EXISTS status after the
    # column definitions ends the response (rows come with COM_STMT_FETCH). Only then: a plain
    # execute of a CALL whose procedure has a cursor open carries the flag too, rows following.
    CURSOR = 8


# What every command's response looks like. A command missing here is refused by the proxy.
EXPECT_BY_COMMAND: dict[int, Expect] = {
    Command.SLEEP: Expect.SINGLE,
    Command.QUIT: Expect.NOTHING,
    Command.INIT_DB: Expect.SINGLE,
    Command.QUERY: Expect.RESULT,
    Command.FIELD_LIST: Expect.FIELD_LIST,
    Command.CREATE_DB: Expect.SINGLE,
    Command.DROP_DB: Expect.SINGLE,
    Command.REFRESH: Expect.SINGLE,
    Command.SHUTDOWN: Expect.SINGLE,
    Command.STATISTICS: Expect.SINGLE,
    Command.PROCESS_INFO: Expect.RESULT,
    Command.CONNECT: Expect.SINGLE,
    Command.PROCESS_KILL: Expect.SINGLE,
    Command.DEBUG: Expect.SINGLE,
    Command.PING: Expect.SINGLE,
    Command.TIME: Expect.SINGLE,
    Command.DELAYED_INSERT: Expect.SINGLE,
    Command.CHANGE_USER: Expect.AUTH,
    Command.STMT_PREPARE: Expect.PREPARE,
    Command.STMT_EXECUTE: Expect.BINARY,
    Command.STMT_SEND_LONG_DATA: Expect.NOTHING,
    Command.STMT_CLOSE: Expect.NOTHING,
    Command.STMT_RESET: Expect.SINGLE,
    Command.SET_OPTION: Expect.SINGLE,
    Command.STMT_FETCH: Expect.FETCH,
    Command.DAEMON: Expect.SINGLE,
    Command.RESET_CONNECTION: Expect.SINGLE,
    Command.STMT_BULK_EXECUTE: Expect.BINARY,  # OK, or the rows of INSERT ... RETURNING
}

# Phases of the state machine, as plain ints: they are compared once per packet on the hot path.
IDLE = 0
FIRST = 1  # the first packet of a (text or binary) result
COLUMNS = 2  # column definitions to skip
COLUMNS_EOF = 3  # the EOF after the column definitions (no CLIENT_DEPRECATE_EOF)
ROWS = 4
SINGLE = 5
PREPARE_OK = 6
PREPARE_DEFS = 7  # parameter, then column, definitions of a prepared statement
PREPARE_EOF = 8
FIELDS = 9
AUTH = 10

CURSOR_BINARY = 2  # ResponseTracker._binary: 0 text, 1 binary, 2 binary with a cursor asked for


def error_code(buf: Buffer, start: int, length: int) -> int:
    """The code of an ERR packet read whole; 1 when it is too short to hold one."""
    return (buf[start + 1] | buf[start + 2] << 8) or 1 if length >= 3 else 1


def is_progress(buf: Buffer, start: int, length: int) -> bool:
    """An ERR packet (read whole) that is a MariaDB progress report: error code 0xFFFF."""
    return length >= 3 and buf[start + 1] == 0xFF and buf[start + 2] == 0xFF


def terminator_status(buf: Buffer, start: int, length: int) -> int:
    """The status flags of an EOF packet (5 bytes) or of an OK packet (7 bytes or more)."""
    if length == 5:
        return buf[start + 3] | buf[start + 4] << 8
    return ok_status(buf, start, length)


def ok_status(buf: Buffer, start: int, length: int) -> int:
    if length >= 7 and buf[start + 1] < 0xFB and buf[start + 2] < 0xFB:
        # Both counts fit in one byte, as in almost every OK: the status follows them.
        return buf[start + 3] | buf[start + 4] << 8
    pos = start + 1
    end = start + length
    _, pos = backend_lenenc(buf, pos)  # affected rows
    _, pos = backend_lenenc(buf, pos)  # last insert id
    if pos + 2 > end:
        raise ProtocolError("OK packet without status flags", Origin.BACKEND)
    return int(U16.unpack_from(buf, pos)[0])


def backend_lenenc(buf: Buffer, pos: int) -> tuple[int, int]:
    """A length-encoded integer the backend sent: a bad one is the backend's protocol error."""
    try:
        return read_lenenc_int(buf, pos)
    except ProtocolError as e:
        raise ProtocolError(str(e), Origin.BACKEND) from None


# The phase a response starts in, by what the command expects.
_FIRST_PHASE = {
    Expect.RESULT: FIRST,
    Expect.BINARY: FIRST,
    Expect.CURSOR: FIRST,
    Expect.SINGLE: SINGLE,
    Expect.PREPARE: PREPARE_OK,
    Expect.FETCH: ROWS,
    Expect.FIELD_LIST: FIELDS,
    Expect.AUTH: AUTH,
}
# (_binary, phase) as a response of each kind starts: also what the compiled relay path
# (net/_hotpath.c) sets when it sends a command.
FIRST_STEP: dict[Expect, tuple[int, int]] = {
    kind: (CURSOR_BINARY if kind is Expect.CURSOR
           else int(kind is Expect.BINARY or kind is Expect.FETCH), phase)
    for kind, phase in _FIRST_PHASE.items()
}
