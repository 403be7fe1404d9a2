"""One session's part in a running capture: the hook the relay calls (net/relay.py).

Theory of operation
-------------------
While a capture runs, and only then (`Session._capture` is None otherwise), the relay calls:
- `take(packet)` on the fast path with each command packet it sends to the backend, before it
  expects the response; False sends the command down the slow path instead (see READY below);
- `ready(packet)` on the slow path, before a command runs (False makes it wait), and `sent()`
  once it sent that command, before it expects the response;
- `response(data)` with each chunk the backend sends, `done(status, failed)` when a response
  ends (the tracker's callback: in the order the commands were taken);
- `closed()` when the session ends.
A command becomes a record (traffic/sink.py) when its response ends: its start and end, the client's
packet, the error code and server status, and the response's bytes when the response came alone
(no pipelined response shares its chunks) and is at most RESPONSE_LIMIT long. Nothing is parsed
here: the writer reads those bytes (traffic/outcome.py) in the control process or its thread.

A session that logs in during the capture is captured from its login on (COM_INIT_DB of its
database first). One that was open before is WAITING until a safe point (every response
complete, no transaction, cursor or pending long data): then READY, and its next command takes
the slow path; unless that command reads the last statement's diagnostics (PASS: it runs first,
uncaptured), it waits while the session's state is read on its backend connection (REBUILDING,
net/capture_rebuild.py), and the session's capture begins with the commands that rebuild
that state.
A rebuild that fails leaves the session out of this capture (OFF).
"""

from __future__ import annotations

import logging
from collections import deque
from time import time_ns
from typing import TYPE_CHECKING

from tiproxy.net.capture_rebuild import rebuild
from tiproxy.protocol.codec import U32
from tiproxy.protocol.constants import (
    MAX_PAYLOAD,
    Capability,
    Command,
    MariaDBCapability,
    ServerStatus,
)
from tiproxy.protocol.errors import ProtocolError
from tiproxy.session.commands import rewrite_change_user
from tiproxy.session.sqltext import reads_diagnostics
from tiproxy.traffic.sink import DEPRECATE_EOF, EXTENDED_METADATA, FOUND_ROWS, CaptureSink

if TYPE_CHECKING:
    from tiproxy.net.relay import Session

log = logging.getLogger("tiproxy.traffic")

RESPONSE_LIMIT = 1024 * 1024  # a longer response is recorded without rows and checksum
WAITING, READY, PASS, REBUILDING, CAPTURING, OFF = range(6)
_COMMAND_PHASE = 1  # net/relay.py's COMMAND
_IN_TRANS = ServerStatus.IN_TRANS
_PREPARE, _EXECUTE = int(Command.STMT_PREPARE), int(Command.STMT_EXECUTE)
_CHANGE_USER = int(Command.CHANGE_USER)
_RESET = bytes((Command.RESET_CONNECTION,))
_INIT_DB = bytes((Command.INIT_DB,))
_QUIT = bytes((Command.QUIT,))


class SessionCapture:
    """The relay's hook; see the module docstring."""

    __slots__ = ("_aligned", "_buf", "_change_db", "_conn", "_flags", "_hold", "_keep", "_last",
                 "_pending", "_ready", "_session", "_sink", "_skip", "state")

    def __init__(self, sink: CaptureSink, session: Session, fresh: bool) -> None:
        self._sink = sink
        self._session = session
        self._conn = session.id
        self._pending: deque[tuple[int, bytes] | None] = deque()
        self._buf = bytearray()
        tracker = session.tracker
        self._skip = tracker.pending if tracker is not None else 0  # responses already due
        self._aligned = not self._skip  # the buffer starts where a response starts
        self._keep = False  # collecting response bytes
        self._last = 0
        self._change_db: bytes | None = None
        self._ready = b""  # the packet ready() let run, as the client sent it
        self._hold = f"capture {id(self)}"
        self._flags = (DEPRECATE_EOF if session.backend_caps & Capability.DEPRECATE_EOF else 0) \
            | (EXTENDED_METADATA if session.mariadb_caps & MariaDBCapability.EXTENDED_METADATA
               else 0) | (FOUND_ROWS if session.client_caps & Capability.FOUND_ROWS else 0)
        self.state = WAITING
        if fresh:
            self._capturing()
            state = session.state
            if state.database_known and state.database:
                self._emit(_INIT_DB + state.database)
        else:
            self._check_safe_point()

    # -- the relay's calls ------------------------------------------------------------------------

    def take(self, packet: bytes) -> bool:
        """A command is about to be sent (its whole packet, header included)."""
        state = self.state
        if state == CAPTURING:
            now = time_ns()  # _now(), inlined: this is the fast path
            if now <= self._last:
                now = self._last + 1
            self._last = now
            if len(packet) - 4 >= MAX_PAYLOAD:
                self._sink.add((now, self._conn, b"", 0, 0, 0, None, None, 0))
                self._pending.append(None)
            elif packet[4] == _CHANGE_USER:
                self._change_db = self._change_user_db(packet)
                self._pending.append((now, _RESET))  # the credentials stay out
            else:
                self._pending.append((now, packet[4:]))
            return True
        if state == READY:
            return False
        if state == PASS:
            self.state = WAITING
        self._pending.append(None)
        return True

    def sent(self) -> None:
        """The command ready() let run went to the backend (perhaps rewritten)."""
        if self._ready:
            self.take(self._ready)
            self._ready = b""

    def ready(self, packet: bytes) -> bool:
        """Before a command runs in the slow path: False while the state is being read."""
        self._ready = packet
        if self.state != READY or packet[4] == _QUIT[0]:
            return self.state != REBUILDING
        session = self._session
        tracker = session.tracker
        if tracker is None or not tracker.idle or tracker.status & _IN_TRANS:
            self.state = WAITING
            return True
        if reads_diagnostics(packet, self._executed_sql(packet)):
            self.state = PASS
            return True
        self.state = REBUILDING
        session.hold_input(self._hold)
        session.run_task(self._rebuild())
        return False

    def response(self, data: bytes) -> None:
        if self._keep:
            buf = self._buf
            buf += data
            if len(buf) > RESPONSE_LIMIT:
                self._keep = False
                buf.clear()

    def done(self, status: int, failed: bool) -> None:
        tracker = self._session.tracker
        assert tracker is not None
        idle = tracker.idle
        body = bytes(self._buf) if self._keep and self._aligned and idle else None
        self._buf.clear()
        self._aligned = idle
        self._keep = self.state == CAPTURING
        if self._skip:
            self._skip -= 1
        elif self._pending:
            item = self._pending.popleft()
            if item is not None:
                self._record(item, status, tracker.error if failed else 0, body)
        if self.state == WAITING and idle:
            self._check_safe_point()

    def closed(self) -> None:
        if self.state == CAPTURING:
            self._emit(_QUIT)
        self.state = OFF

    # -- records ----------------------------------------------------------------------------------

    def _record(self, item: tuple[int, bytes], status: int, error: int,
                body: bytes | None) -> None:
        start, packet = item
        statement = None
        if packet[0] == _PREPARE and not error:
            tracker = self._session.tracker
            prepared = tracker.prepared if tracker is not None else None
            if prepared is not None:
                backend_id, _, params = prepared
                statement = (self._session.state.to_client.get(backend_id, backend_id), params,
                             None)
        if packet is _RESET:
            body = None  # the response was COM_CHANGE_USER's
        self._sink.add((start, self._conn, packet, time_ns(), error, status, body,
                        statement, self._flags))
        if packet is _RESET and self._change_db and not error:
            self._emit(_INIT_DB + self._change_db)
        self._change_db = None

    def _emit(self, packet: bytes, statement: tuple[int, int, bytes | None] | None = None,
              ) -> None:
        """A command the session did not send now (its state, its quit): no response."""
        self._sink.add((self._now(), self._conn, packet, 0, 0, 0, None, statement, 0))

    def _now(self) -> int:
        """The time, never before the session's previous record's (its order is kept)."""
        now = time_ns()
        if now <= self._last:
            now = self._last + 1
        self._last = now
        return now

    def _change_user_db(self, packet: bytes) -> bytes | None:
        try:
            return rewrite_change_user(packet[4:], self._session.client_caps, "").database
        except ProtocolError:
            return None

    def _executed_sql(self, packet: bytes) -> bytes | None:
        if len(packet) < 9 or packet[4] != _EXECUTE:
            return None
        stmt = self._session.state.stmts.get(U32.unpack_from(packet, 5)[0])
        return stmt.sql if stmt is not None else None

    # -- joining a session that was open before ----------------------------------------------------

    def _capturing(self) -> None:
        self.state = CAPTURING
        self._keep = self._aligned

    def _check_safe_point(self) -> None:
        session = self._session
        tracker = session.tracker
        if session.phase != _COMMAND_PHASE or tracker is None or not tracker.idle \
                or tracker.status & _IN_TRANS or tracker.local_infile:
            return
        if any(s.cursor_open or s.long_data for s in session.state.stmts.values()):
            return
        self.state = READY

    async def _rebuild(self) -> None:
        session = self._session
        try:
            commands = await rebuild(session)
        except Exception as e:  # noqa: BLE001 - any failure leaves the session out, logged
            self.state = OFF
            log.info("session %d is left out of the traffic capture: its state could not be "
                     "read (%s)", session.id, e or type(e).__name__)
        else:
            self._aligned = True
            self._buf.clear()
            self._capturing()
            for command in commands:
                self._emit(command.packet, command.statement)
        finally:
            if session.phase == _COMMAND_PHASE:
                session.release_input(self._hold)
