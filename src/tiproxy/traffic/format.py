"""TiProxy's native traffic format: each command as `# Key: value` lines, then its payload.

    # Time: 2024-08-29T07:04:05.123456789Z    when the command started (RFC 3339, nanoseconds)
    # Conn_ID: 123                            the proxy's connection id
    # Cmd_type: StmtExecute                   TiProxy's command name; absent for Query
    # Success: false                          absent when the command succeeded
    # Captured_ps_id: 1                       statement commands; absent when 0
    # Prepared_stmt: "SELECT ?"               an execute's statement text, Go-quoted
    # Payload_len: 12                         last: the payload (without the command byte)
    <payload bytes>\n                         follows, then a newline

TiProxy's reader (pkg/sqlreplay/cmd/native.go) skips keys it does not know, so ours travel in the
same files: what the captured response said, for a replay to compare with (Query_time in
seconds, Error_code, Server_status, Rows_affected, Rows_sent, Result_checksum, Result_types),
written before Payload_len. A file of TiProxy's simply lacks them, and a replay then compares
success alone.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Protocol

# TiProxy's names by command byte (pkg/proxy/net/command.go); 0x1F is "ResetConnect" there.
CMD_NAMES = (
    "Sleep", "Quit", "InitDB", "Query", "FieldList", "CreateDB", "DropDB", "Refresh",
    "(DEPRECATED)Shutdown", "Statistics", "ProcessInfo", "Connect", "ProcessKill", "Debug",
    "Ping", "Time", "DelayedInsert", "ChangeUser", "BinlogDump", "TableDump", "ConnectOut",
    "RegisterSlave", "StmtPrepare", "StmtExecute", "StmtSendLongData", "StmtClose",
    "StmtReset", "SetOption", "StmtFetch", "Daemon", "BinlogDumpGtid", "ResetConnect",
)
CMD_BYTES = {name: i for i, name in enumerate(CMD_NAMES)}
QUERY = 0x03

# A line is a key and its value; a Prepared_stmt line holds a statement's whole text.
MAX_LINE = 64 * 1024 * 1024
MAX_PAYLOAD = 1024 * 1024 * 1024  # max_allowed_packet's upper bound


class FormatError(ValueError):
    """A traffic file that does not follow the format; the message names the file and line."""


@dataclass(slots=True)
class TrafficCommand:
    """One captured command and, where recorded, what its response said."""

    start_ns: int  # when it started, nanoseconds since the epoch
    conn_id: int
    packet: bytes  # the command byte and its payload, as the client sent it
    success: bool = True
    ps_id: int = 0  # Captured_ps_id: the statement id the client used
    prepared_sql: bytes | None = None  # Prepared_stmt
    query_ns: int | None = None  # ours from here on: how long the response took
    error_code: int = 0
    status: int | None = None  # the server status after the response
    affected: int | None = None  # rows affected (OK packets)
    rows: int | None = None  # rows sent (result sets)
    checksum: int | None = None  # outcome.py: result sets' rows
    types: int | None = None  # outcome.py: result sets' column types
    where: str = ""  # "file, line N" when read from a file

    @property
    def cmd(self) -> int:
        return self.packet[0]


def encode(c: TrafficCommand) -> bytes:
    """The command's lines and payload, in the order TiProxy writes them."""
    return encode_command(c.start_ns, c.conn_id, c.packet, c.success, c.ps_id, c.prepared_sql,
                          c.query_ns, c.error_code, c.status, c.affected, c.rows, c.checksum,
                          c.types)


def encode_command(start_ns: int, conn_id: int, packet: bytes, success: bool = True,  # noqa: PLR0917 - the format's keys, in its order
                   ps_id: int = 0, prepared_sql: bytes | None = None,
                   query_ns: int | None = None, error_code: int = 0, status: int | None = None,
                   affected: int | None = None, rows: int | None = None,
                   checksum: int | None = None, types: int | None = None) -> bytes:
    """encode() of a command given by its fields (the writer's way: once per command)."""
    cmd = packet[0]
    head = f"# Time: {format_time(start_ns)}\n# Conn_ID: {conn_id}\n"
    if cmd != QUERY:
        head += f"# Cmd_type: {CMD_NAMES[cmd]}\n"
    if not success:
        head += "# Success: false\n"
    if ps_id:
        head += f"# Captured_ps_id: {ps_id}\n"
    if prepared_sql:
        head += f"# Prepared_stmt: {go_quote(prepared_sql)}\n"
    if query_ns is not None:
        head += f"# Query_time: {query_ns // 1_000_000_000}.{query_ns % 1_000_000_000:09d}\n"
    if error_code:
        head += f"# Error_code: {error_code}\n"
    if status is not None:
        head += f"# Server_status: {status}\n"
    if affected is not None:
        head += f"# Rows_affected: {affected}\n"
    if rows is not None:
        head += f"# Rows_sent: {rows}\n"
    if checksum is not None:
        head += f"# Result_checksum: {checksum:08x}\n"
    if types is not None:
        head += f"# Result_types: {types:08x}\n"
    return b"%s# Payload_len: %d\n%s\n" % (head.encode(), len(packet) - 1, packet[1:])


class Source(Protocol):
    """A byte stream of traffic files read one after another (store.py's reader)."""

    def readline(self, limit: int) -> bytes: ...
    def read(self, size: int) -> bytes: ...
    def position(self) -> str: ...  # "file, line N" of what comes next


class Decoder:
    """Reads commands one at a time, as TiProxy's NativeDecoder does: keys in any order until
    Payload_len, unknown keys skipped, Time / Conn_ID / Cmd_type at most once each."""

    def __init__(self, source: Source) -> None:
        self._source = source
        self._pushed: bytes | None = None  # a line read ahead by skip_to_next

    def next(self) -> TrafficCommand | None:
        """The next command, or None at the end of the stream. Raises FormatError."""
        fields: dict[str, str] = {}
        where = self._source.position()
        while True:
            line, self._pushed = self._pushed or self._source.readline(MAX_LINE), None
            if not line:
                if fields:
                    raise FormatError(f"{where}: the stream ends inside a command")
                return None
            if not line.endswith(b"\n"):
                raise FormatError(f"{self._source.position()}: line too long or cut short")
            key, value = _key_value(line[:-1], where)
            if key == "Payload_len":
                return self._command(fields, value, where)
            if key in fields and key in ("Time", "Conn_ID", "Cmd_type"):
                raise FormatError(f"{where}: {key} given twice in one command")
            fields[key] = value

    def skip_to_next(self) -> None:
        """After an error: on to the next line that starts a command (`# Time: `)."""
        while line := self._source.readline(MAX_LINE):
            if line.startswith(b"# Time: "):
                self._pushed = line
                return

    def _command(self, fields: dict[str, str], length_text: str, where: str) -> TrafficCommand:
        length = _integer(length_text, "Payload_len", where)
        if length > MAX_PAYLOAD:
            raise FormatError(f"{where}: Payload_len {length} is larger than 1 GiB")
        name = fields.get("Cmd_type", "Query")
        cmd = CMD_BYTES.get(name)
        if cmd is None:
            raise FormatError(f"{where}: unknown Cmd_type {name!r}")
        payload = self._source.read(length) if length else b""
        if len(payload) != length or self._source.read(1) != b"\n":
            raise FormatError(f"{where}: the payload is shorter than Payload_len {length} or "
                              "not followed by a newline")
        if "Time" not in fields:
            raise FormatError(f"{where}: no Time")
        command = TrafficCommand(parse_time(fields["Time"], where),
                                 _integer(fields.get("Conn_ID", "0"), "Conn_ID", where),
                                 bytes((cmd,)) + payload, where=where)
        if not command.conn_id:
            raise FormatError(f"{where}: no connection id")
        _ours(command, fields, where)
        return command


def _ours(c: TrafficCommand, fields: dict[str, str], where: str) -> None:
    """The optional keys, TiProxy's and ours, onto the command."""
    c.success = fields.get("Success", "true") == "true"
    if "Captured_ps_id" in fields:
        c.ps_id = _integer(fields["Captured_ps_id"], "Captured_ps_id", where) & 0xFFFFFFFF
    if "Prepared_stmt" in fields:
        try:
            c.prepared_sql = go_unquote(fields["Prepared_stmt"])
        except ValueError as e:
            raise FormatError(f"{where}: Prepared_stmt: {e}") from None
    try:
        if "Query_time" in fields:
            c.query_ns = round(float(fields["Query_time"]) * 1e9)
        if "Result_checksum" in fields:
            c.checksum = int(fields["Result_checksum"], 16)
        if "Result_types" in fields:
            c.types = int(fields["Result_types"], 16)
    except ValueError:
        raise FormatError(f"{where}: Query_time or a Result_ key is not a number") from None
    c.error_code = _integer(fields.get("Error_code", "0"), "Error_code", where)
    for key, attr in (("Server_status", "status"), ("Rows_affected", "affected"),
                      ("Rows_sent", "rows")):
        if key in fields:
            setattr(c, attr, _integer(fields[key], key, where))


def _key_value(line: bytes, where: str) -> tuple[str, str]:
    if not line.startswith(b"# "):
        raise FormatError(f"{where}: line does not start with '# ': {line[:80]!r}")
    key, sep, value = line[2:].partition(b": ")
    if not sep or not value:
        raise FormatError(f"{where}: not a '# Key: value' line: {line[:80]!r}")
    try:
        return key.decode("ascii"), value.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{where}: a key line that is not text: {line[:80]!r}") from None


def _integer(text: str, key: str, where: str) -> int:
    if not text.isdigit():
        raise FormatError(f"{where}: {key} is not a number: {text[:40]!r}")
    return int(text)


# -- times --------------------------------------------------------------------------------------

_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d\d):(\d\d))")


@functools.lru_cache(maxsize=64)  # one entry per second: commands come in time order
def _second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def format_time(ns: int) -> str:
    """RFC 3339 in UTC with nanoseconds, trailing zeros dropped (Go's RFC3339Nano)."""
    seconds, frac = divmod(ns, 1_000_000_000)
    text = _second(seconds)
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    return text + "Z"


def parse_time(text: str, where: str = "") -> int:
    """Nanoseconds since the epoch of an RFC 3339 time (any offset, up to nanoseconds)."""
    m = _RFC3339.fullmatch(text.strip())
    if m is None:
        raise FormatError(f"{where}: not an RFC 3339 time: {text[:60]!r}".lstrip(": "))
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    offset = timedelta(0)
    if m.group(9):
        offset = timedelta(hours=int(m.group(10)), minutes=int(m.group(11)))
        if m.group(9) == "-":
            offset = -offset
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=timezone(offset))
    except ValueError as e:
        raise FormatError(f"{where}: {text[:60]!r}: {e}".lstrip(": ")) from None
    frac = int((m.group(7) or "0").ljust(9, "0"))
    return int(moment.timestamp()) * 1_000_000_000 + frac


# -- Go string literals (strconv.Quote / strconv.Unquote) -----------------------------------------

_SIMPLE_ESCAPES = {7: "\\a", 8: "\\b", 12: "\\f", 10: "\\n", 13: "\\r", 9: "\\t", 11: "\\v",
                   0x5C: "\\\\", 0x22: '\\"'}
_UNESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 0x5C,
              '"': 0x22, "'": 0x27}


@functools.lru_cache(maxsize=4096)  # an execute's statement text, written with every execute
def go_quote(data: bytes) -> str:
    """A double-quoted Go string literal of `data` on one line; bytes that are not UTF-8 as
    \\xNN, as strconv.Quote writes them."""
    out = ['"']
    text = data.decode("utf-8", "surrogateescape")
    for ch in text:
        code = ord(ch)
        if code in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[code])
        elif 0xDC80 <= code <= 0xDCFF:  # an undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def go_unquote(literal: str) -> bytes:
    """The bytes of a double-quoted Go string literal (strconv.Unquote's escapes)."""
    if len(literal) < 2 or literal[0] != '"' or literal[-1] != '"':
        raise ValueError("not a double-quoted string")
    body = literal[1:-1]
    out = bytearray()
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            if ch == '"':
                raise ValueError("unescaped quote inside the string")
            out += ch.encode("utf-8", "surrogateescape")
            i += 1
            continue
        i = _unescape(body, i + 1, out)
    return bytes(out)


def _unescape(body: str, i: int, out: bytearray) -> int:
    """Append the escape starting after the backslash at body[i]; returns where it ends."""
    if i >= len(body):
        raise ValueError("a backslash at the end")
    ch = body[i]
    if ch in _UNESCAPES:
        out.append(_UNESCAPES[ch])
        return i + 1
    digits = {"x": 2, "u": 4, "U": 8}.get(ch)
    if digits is not None:
        value = int(_exact(body[i + 1 : i + 1 + digits], digits, 16), 16)
        if ch == "x":
            out.append(value)
        else:
            out += chr(value).encode("utf-8", "surrogatepass")
        return i + 1 + digits
    if "0" <= ch <= "7":
        value = int(_exact(body[i : i + 3], 3, 8), 8)
        if value > 0xFF:
            raise ValueError("octal escape over \\377")
        out.append(value)
        return i + 3
    raise ValueError(f"unknown escape \\{ch}")


_DIGITS = {8: frozenset("01234567"), 16: frozenset("0123456789abcdefABCDEF")}


def _exact(digits: str, count: int, base: int) -> str:
    if len(digits) != count or not set(digits) <= _DIGITS[base]:
        raise ValueError(f"bad escape digits {digits!r}")
    return digits
