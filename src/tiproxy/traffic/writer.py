"""The capture's writer: records in, TiProxy's files out, in a thread of the control process.

Theory of operation
-------------------
Batches of records (sink.py) come from this process's sessions or from the workers' links and
wait in a queue bounded by bytes; a batch with no room is dropped and counted (the data path
never waits). The writer's thread makes each record a command of the file (format.py):
- what must not be written is left out and counted as filtered: statements that may carry a
  password (sql.py), the statement commands of a prepared statement left out so, commands
  TiProxy's format has no name for (MariaDB's COM_STMT_BULK_EXECUTE), commands of 16 MiB or more;
- per connection it follows the prepared statements (from their PREPARE records, rebuilt ones
  included), so that an execute carries the statement's text (Prepared_stmt) and the first
  execute of each statement carries its parameter types, which a replay needs;
- it reads the response's bytes for rows affected, rows sent, the checksum and the column types
  (outcome.py), unless a worker did (`summarized`: a worker sends what each response said, not
  its bytes, which would cost more to send than to read).
Commands arrive in the order they ended, from several processes; files want them in the order
they started, which is what a replay follows. So each waits REORDER_WINDOW in a heap keyed by its
start before it is written: a command that ran longer than that is written late (a replay then
sends it at once, keeping its connection's order). The heap holds encoded commands (without
their responses), at most MAX_HELD of them. Then gzip, AES-CTR and rotation (store.py); the
meta is written last, when the job closes the writer.
"""

from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tiproxy.protocol.codec import U32
from tiproxy.protocol.constants import Command
from tiproxy.protocol.errors import ProtocolError
from tiproxy.session.prepared import execute_types, with_types
from tiproxy.traffic.format import CMD_NAMES, encode_command
from tiproxy.traffic.outcome import Summary, summary_of
from tiproxy.traffic.sink import DEPRECATE_EOF, EXTENDED_METADATA, FOUND_ROWS, Record
from tiproxy.traffic.sql import is_sensitive
from tiproxy.traffic.store import CaptureFiles, write_meta

log = logging.getLogger("tiproxy.traffic")

QUEUE_BYTES = 64 * 1024 * 1024  # records waiting for the thread, at most
REORDER_WINDOW_NS = 2_000_000_000
MAX_HELD = 200_000  # commands waiting in the reorder heap at most (then the oldest go early)
WRITE_CHUNK = 1024 * 1024
_TICK = 0.2  # seconds between looks at the heap when no batch comes
_TEXT = frozenset((Command.QUERY, Command.STMT_PREPARE))
_STATEMENT = frozenset((Command.STMT_EXECUTE, Command.STMT_SEND_LONG_DATA, Command.STMT_CLOSE,
                        Command.STMT_RESET, Command.STMT_FETCH))
_HEADER = b"\0\0\0\0"  # session/prepared.py works on whole packets


@dataclass
class _Statement:
    sql: bytes
    params: int
    types: bytes | None  # the parameter types the client last sent
    typed: bool = False  # an execute with its types has been written


@dataclass
class _Connection:
    statements: dict[int, _Statement] = field(default_factory=dict)
    hidden: set[int] = field(default_factory=set)  # statements left out: their commands too


@dataclass(frozen=True)
class Meta:
    """What `meta` says, known once the sessions stopped recording."""

    duration_ns: int
    method: str
    dropped: int


class CaptureWriter:
    """See the module docstring. `put` and `close` are called on the event loop; everything
    that touches the disk runs in the writer's own thread, so a disk that stops answering holds
    up nothing else (the thread is a daemon: not even the proxy's exit)."""

    def __init__(self, files: CaptureFiles, failed: Callable[[], None] = lambda: None,
                 finished: Callable[[], None] = lambda: None) -> None:
        self.files = files
        self._on_failure = failed  # called in the thread when writing stops
        self._on_finish = finished  # called in the thread when the files are complete
        self._meta: Meta | None = None
        self.captured = 0
        self.filtered = 0
        self.error = ""  # why writing stopped, if it did
        self._queue: queue.SimpleQueue[tuple[list[Record], int] | None] = queue.SimpleQueue()
        self._queued = 0
        self._lock = threading.Lock()
        self._closed = False
        self._connections: dict[int, _Connection] = {}
        self._heap: list[tuple[int, int, bytes]] = []  # (start, arrival, the encoded command)
        self._seq = 0
        self._thread = threading.Thread(target=self._run, name="traffic-writer", daemon=True)
        self._thread.start()

    def put(self, batch: list[Record], size: int) -> bool:
        """Queue a batch; False when there is no room (the caller counts it dropped)."""
        with self._lock:
            if self._closed or self.error or self._queued + size > QUEUE_BYTES:
                return False
            self._queued += size
        self._queue.put((batch, size))
        return True

    def close(self, meta: Meta | None = None) -> None:
        """Nothing more comes: the thread writes what is left, closes the last file, writes
        `meta`, then calls `finished`."""
        with self._lock:
            self._closed = True
            self._meta = meta
        self._queue.put(None)

    def finish(self, meta: Meta | None = None) -> None:
        """close(), and wait for the thread (blocking)."""
        self.close(meta)
        self._thread.join()

    # -- the thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                try:
                    item = self._queue.get(timeout=_TICK)
                except queue.Empty:
                    item = ([], 0)
                if item is None:
                    break
                batch, size = item
                with self._lock:
                    self._queued -= size
                if not self.error:
                    for record in batch:
                        self._take(record)
                    self._release(time.time_ns() - REORDER_WINDOW_NS)
            if not self.error:
                self._release(None)
                self.files.close()
        except OSError as e:
            self._failed(f"failed to flush traffic to disk: {e.strerror or e}")
        except Exception as e:
            log.exception("traffic writer failed")
            self._failed(f"the traffic writer failed: {e}")
        if self.error:
            while self._queue.get() is not None:  # until close(): nothing more is written
                pass
        self._write_meta()
        self._on_finish()

    def _write_meta(self) -> None:
        meta = self._meta
        if meta is None:
            return
        try:
            write_meta(self.files.directory, duration_ns=meta.duration_ns, cmds=self.captured,
                       filtered=self.filtered, method=meta.method, dropped=meta.dropped)
        except OSError as e:
            self.error = self.error or f"failed to write meta: {e.strerror or e}"

    def _failed(self, error: str) -> None:
        with self._lock:
            self.error = error
        log.error("traffic capture stopped: %s", error)
        self._on_failure()

    def _release(self, before_ns: int | None) -> None:
        heap = self._heap
        chunk: list[bytes] = []
        size = 0
        while heap and (before_ns is None or heap[0][0] < before_ns or len(heap) > MAX_HELD):
            data = heapq.heappop(heap)[2]
            chunk.append(data)
            size += len(data)
            if size >= WRITE_CHUNK:
                self._write(chunk)
                chunk, size = [], 0
        self._write(chunk)

    def _write(self, chunk: list[bytes]) -> None:
        if chunk:
            self.files.write(b"".join(chunk))
            self.captured += len(chunk)

    def _take(self, record: Record) -> None:
        try:
            command = self._command(record)
        except ProtocolError:
            command = None  # a malformed statement command: not worth a line in the capture
        if command is None:
            self.filtered += 1
            return
        heapq.heappush(self._heap, (record[0], self._seq, command))
        self._seq += 1

    def _command(self, record: Record) -> bytes | None:
        """The record as a command of the file, or None to leave it out."""
        start, conn_id, packet, end, error, status, response, statement, flags = record
        if not packet or packet[0] >= len(CMD_NAMES):
            return None
        cmd = packet[0]
        conn = self._connections.get(conn_id)
        if conn is None:
            conn = self._connections[conn_id] = _Connection()
        if cmd == Command.QUIT:
            del self._connections[conn_id]
        elif cmd == Command.RESET_CONNECTION:
            conn.statements.clear()
            conn.hidden.clear()
        ps_id, sql = 0, None
        if cmd in _TEXT and is_sensitive(packet[1:]):
            if statement is not None:
                conn.hidden.add(statement[0])
            return None
        if cmd == Command.STMT_PREPARE and statement is not None:
            ps_id, params, types = statement
            conn.statements[ps_id] = _Statement(packet[1:], params, types)
        elif cmd in _STATEMENT and len(packet) >= 5:
            ps_id = U32.unpack_from(packet, 1)[0]
            if ps_id in conn.hidden:
                if cmd == Command.STMT_CLOSE:
                    conn.hidden.discard(ps_id)
                return None
            stmt = conn.statements.get(ps_id)
            if stmt is not None and cmd == Command.STMT_EXECUTE:
                sql = stmt.sql
                packet = _typed(stmt, packet)
            elif cmd == Command.STMT_CLOSE:
                conn.statements.pop(ps_id, None)
        if not end:  # no response recorded
            return encode_command(start, conn_id, packet, True, ps_id, sql)
        affected = rows = checksum = column_types = None
        if response is not None and not error:
            summary = _summary(record)
            if summary is not None:
                affected, rows, checksum, column_types = summary
                if flags & FOUND_ROWS:  # matched rows, not changed ones: nothing to compare
                    affected = None
        return encode_command(start, conn_id, packet, not error, ps_id, sql,
                              max(0, end - start), error, status, affected, rows, checksum,
                              column_types)


def _summary(record: Record) -> Summary | None:
    response = record[6]
    if not isinstance(response, bytes):
        return response
    flags = record[8]
    return summary_of(response, record[2], bool(flags & DEPRECATE_EOF),
                      bool(flags & EXTENDED_METADATA))


def summarized(batch: list[Record]) -> tuple[list[Record], int]:
    """The batch with each response's bytes replaced by what they say (outcome.summary_of),
    and its size now: what a worker sends the control process."""
    out: list[Record] = []
    size = 0
    for record in batch:
        if record[6] is not None:
            summary = _summary(record) if not record[4] else None
            out.append((*record[:6], summary, *record[7:]))
        else:
            out.append(record)
        size += len(record[2]) + 64
    return out, size


def _typed(stmt: _Statement, packet: bytes) -> bytes:
    """The execute with its statement's parameter types, if it is the first written and came
    without them (the client sent them before the capture began)."""
    if stmt.typed or not stmt.params:
        return packet
    _, types = execute_types(_HEADER + packet, stmt.params)
    if types is not None:
        stmt.types, stmt.typed = types, True
        return packet
    if stmt.types is None:
        return packet
    stmt.typed = True
    return with_types(_HEADER + packet, stmt.params, stmt.types)[4:]
