"""The command phase's slow path: client packets cut one by one out of the buffer and carried
out, each as its kind needs (net/relay.py's module docstring says which take it).

A command goes to the backend with the token its answer is recorded by (net/records.py), after
what must come first: a move or a checkpoint the session owes, a handover to a new process, the
error of a transaction lost with its backend. A command the proxy answers itself (KILL, one it
refuses) waits until the backend has answered everything before it, so that its reply never
lands inside another response; so does a command that must wait for a move.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from tiproxy.net.ids import CURSOR_TYPES
from tiproxy.net.kill import CONNECTION_ID_CALL, evaluate_kill, handle_kill, handle_kill_expression
from tiproxy.net.login_phase import COMMAND
from tiproxy.protocol.codec import U32
from tiproxy.protocol.constants import ER_UNKNOWN_COM_ERROR, MAX_PAYLOAD, Command
from tiproxy.protocol.errors import ProtocolError
from tiproxy.protocol.responses import AUTH, EXPECT_BY_COMMAND, Expect
from tiproxy.session.commands import (
    MAYBE_KILL_FIRST_BYTES,
    KillExpression,
    is_unmapped_kill,
    parse_kill_query,
    parse_process_kill,
    prepared_kill,
)
from tiproxy.session.prepared import LAST_PREPARED_ID, execute_types, packet_stmt_id
from tiproxy.session.sqltext import reads_diagnostics, user_variable_names
from tiproxy.views import counters

if TYPE_CHECKING:
    import asyncio

    from tiproxy.net.handover import Departure
    from tiproxy.net.moves import MoveRequest
    from tiproxy.net.session_capture import SessionCapture
    from tiproxy.protocol.tracker import ResponseTracker
    from tiproxy.session.state import SessionState

_QUERY = int(Command.QUERY)
_EXECUTE = int(Command.STMT_EXECUTE)
ER_UNSUPPORTED_PS = 1295  # "This command is not supported in the prepared statement protocol"
_unpack_u32 = U32.unpack_from
_monotonic = time.monotonic

_STMT_COMMANDS = frozenset((Command.STMT_EXECUTE, Command.STMT_FETCH, Command.STMT_CLOSE,
                            Command.STMT_RESET, Command.STMT_SEND_LONG_DATA,
                            Command.STMT_BULK_EXECUTE))
# Replication and other commands whose responses never end or that the proxy cannot relay.
_REFUSED = frozenset(
    (Command.BINLOG_DUMP, Command.BINLOG_DUMP_GTID, Command.TABLE_DUMP,
     Command.REGISTER_SLAVE, Command.CONNECT_OUT)
)
# Commands recorded by their kind and argument when they succeed (net/records.py).
_RECORDED: dict[int, str] = {Command.RESET_CONNECTION: "reset",
                             Command.SET_OPTION: "set_option", Command.INIT_DB: "init_db"}


class CommandPhase:
    """Mixed into Session (net/relay.py), whose attributes it uses."""

    # Provided by Session and its other mixins.
    phase: int
    state: SessionState
    tracker: ResponseTracker | None
    bt: asyncio.Transport | None
    inflight: bytes | None
    last_command: bytes
    leaving: Departure | None
    lost_transaction: str
    stale: int
    _cbuf: bytearray
    _ccont: bool
    _held: set[str]
    _sent: list[tuple[int, float]]
    _capture: SessionCapture | None
    _move: MoveRequest | None
    _moving: bool
    _prepares_sent: int
    _kill_in_flight: bool

    if TYPE_CHECKING:  # provided by Session and its other mixins: for the type checker only
        def _to_backend(self, packet: bytes) -> None: ...
        def _protocol_error(self, e: ProtocolError) -> None: ...
        def hold_input(self, reason: str) -> None: ...
        def reply_error(self, code: int, state: str, message: str) -> None: ...
        def close(self, reason: str, quiet: bool = False, kind: str = ...) -> None: ...
        def _change_user_auth(self, packet: bytes) -> None: ...
        def _change_user_command(self, packet: bytes) -> tuple[bytes, Any]: ...
        def _connection_ids(self, packet: bytes, prepare: bool) -> Any: ...
        def _renamed_execute(self, packet: bytes) -> Any: ...
        def _query_token(self, packet: bytes, original: bytes) -> Any: ...
        def _statement_command(self, packet: bytes, cmd: int) -> tuple[bytes, Any] | None: ...
        def _hold_assigned(self, client_id: int, original: bytes) -> None: ...
        def _prepare_command(self, packet: bytes) -> tuple[bytes, tuple[Any, ...]] | None: ...
        def _executed_sql(self, packet: bytes, cmd: int) -> bytes | None: ...
        def _begin_shortcut(self, sql: bytes) -> bool: ...
        def transaction_lost(self, packet: bytes) -> bool: ...
        def at_handover_point(self) -> str: ...
        def try_move(self, at_command: bool = False) -> bool: ...
        def checkpoint_due(self, packet: bytes, cmd: int) -> bool: ...

    def _execute_is_plain(self, packet: bytes) -> bool:
        """A COM_STMT_EXECUTE without a cursor, for a statement with nothing pending.
        Keeps the parameter types it carries, for the first execute after a move; one that
        must have them put back is not plain (the new backend may well have given the
        statement the client's own id: the ids of different connections often coincide)."""
        stmt_id = packet_stmt_id(packet)
        stmt = self.state.stmts.get(stmt_id)
        if stmt is None:  # the one prepared last (its types are recorded), or unknown to the
            return stmt_id != LAST_PREPARED_ID  # proxy: the backend will answer with an error
        flags, types = execute_types(packet, stmt.params)
        if types is not None:
            stmt.param_types = types
            stmt.types_sent = True
        elif not stmt.types_sent and stmt.param_types is not None:
            return False
        return not flags and not stmt.long_data and not stmt.cursor_open \
            and stmt.effects is None and not stmt.renames and stmt.variables is None \
            and stmt.kill is None

    def _reset_is_plain(self, packet: bytes) -> bool:
        """A COM_STMT_RESET of a statement the proxy knows, which from now on has no long data
        and no open cursor (as _statement_command records)."""
        if len(packet) != 9:
            return False
        stmt = self.state.stmts.get(packet_stmt_id(packet))
        if stmt is None:
            return False
        stmt.reset()
        return True

    def _drain_client(self) -> None:
        buf = self._cbuf
        tracker = self.tracker
        assert tracker is not None and self.bt is not None
        pos = 0
        try:
            while not self._held and self.phase == COMMAND and pos + 4 <= len(buf):
                header = _unpack_u32(buf, pos)[0]
                length = header & 0xFFFFFF
                end = pos + 4 + length
                if end > len(buf):
                    break
                packet = bytes(buf[pos:end])
                pos = end
                seq = header >> 24
                if self._ccont:
                    self._ccont = length == MAX_PAYLOAD
                    self.inflight = None  # a command of several packets: never sent again
                    self.last_command = b""
                    self._to_backend(packet)
                elif tracker.local_infile:
                    self.inflight = None
                    self.last_command = b""
                    self._to_backend(packet)
                    if length == 0:
                        tracker.local_infile = False  # the file is sent; OK or ERR comes next
                elif tracker.phase == AUTH and seq != 0:
                    self._change_user_auth(packet)
                elif seq != 0:
                    raise ProtocolError(f"packet with sequence id {seq} where a command was due")
                elif length == 0:
                    raise ProtocolError("empty command packet")
                elif not (self._capture is None or self._capture.ready(packet)) \
                        or not self._command(packet, length):
                    pos -= len(packet)  # it waits, with what follows, until the backend is idle
                    self.hold_input("idle")
        except ProtocolError as e:
            self._protocol_error(e)
            return
        finally:
            del buf[:pos]

    def _command(self, packet: bytes, length: int) -> bool:
        """Carry out one command; False if it must wait until earlier responses are complete."""
        tracker = self.tracker
        assert tracker is not None and self.bt is not None
        cmd = packet[4]
        kind = EXPECT_BY_COMMAND.get(cmd)
        first = self._before_command(packet, cmd, tracker)
        if first is not None:
            return first
        original = packet
        token: Any = cmd
        if cmd == _QUERY:
            handled = self._query_command(packet)
            if handled is not None:
                return handled
            rewritten = self._connection_ids(packet, prepare=False)
            if rewritten is False:
                return False
            packet = rewritten
            token = self._query_token(packet, original)
        elif kind is None or cmd in _REFUSED:
            if not tracker.idle:
                return False
            self.reply_error(ER_UNKNOWN_COM_ERROR, "08S01",
                             f"TiProxy does not relay command 0x{cmd:02x}")
            return True
        elif cmd == Command.PROCESS_KILL:
            if not tracker.idle:
                return False
            handle_kill(self, parse_process_kill(packet[4:]),  # type: ignore[arg-type]
                        query_only=False, prefix=None)
            return True
        elif cmd in _STMT_COMMANDS:
            if cmd == _EXECUTE:
                killed = self._kill_by_execute(packet, tracker)
                if killed is not None:
                    return killed
            if cmd == _EXECUTE and self._renamed_execute(packet) is False:
                return False
            result = self._statement_command(packet, cmd)
            if result is None:
                return True
            packet, token = result
            if cmd == _EXECUTE:
                kind = self._execute_expects(packet, token, original)
        elif cmd == Command.STMT_PREPARE:
            refused = self._unmapped_kill_prepare(packet[5:])
            if refused is not False:
                return bool(refused)
            prepare = self._prepare_command(packet)
            if prepare is None:
                return False
            packet, token = prepare
        elif cmd == Command.CHANGE_USER:
            packet, token = self._change_user_command(packet)
        elif cmd in _RECORDED:
            token = (_RECORDED[cmd], packet[5:])
        self._ccont = length == MAX_PAYLOAD
        self.inflight = original if tracker.idle and not self._ccont else None
        # What a transaction replay sends again: a rewritten statement's text cannot be.
        self.last_command = original if packet is original or cmd == _EXECUTE else b""
        self._to_backend(packet)
        self._sent.append((cmd, _monotonic()))
        if self._capture is not None:
            self._capture.sent()
        tracker.expect(kind, token)  # type: ignore[arg-type]
        return True

    def _execute_expects(self, packet: bytes, token: Any, original: bytes) -> Expect:
        """How a COM_STMT_EXECUTE's response ends: at the EOF only when a cursor was asked
        for. Without one, the answer of a statement that only assigns user variables is held
        until they are read (records.py; `original`, as the client sent it, runs again if the
        backend is lost before)."""
        if len(packet) > 9 and packet[9] & CURSOR_TYPES:
            return Expect.CURSOR
        if token.__class__ is tuple:
            self._hold_assigned(token[1], original)
        return Expect.BINARY

    def _before_command(self, packet: bytes, cmd: int, tracker: ResponseTracker) -> bool | None:
        """What comes before a command runs: _command's answer, or None to run it."""
        if cmd == Command.QUIT:
            self.close("client quit", quiet=True, kind=counters.QUIT_OK)
            return True
        if self.lost_transaction and self.transaction_lost(packet):
            return True
        if self.leaving is not None and tracker.idle and not self.at_handover_point() \
                and self.leaving.now(self):  # type: ignore[arg-type]
            return False  # to the new process, with this command unread (net/handover.py)
        if self._move is not None and not self._moving \
                and not reads_diagnostics(packet, self._executed_sql(packet, cmd)) \
                and self.try_move(at_command=True):
            return False  # the move first; the command then runs on the new backend
        if self.stale and tracker.idle and self.checkpoint_due(packet, cmd):
            return False  # the checkpoint first (net/checkpoints.py)
        return None

    def _kill_by_execute(self, packet: bytes, tracker: ResponseTracker) -> bool | None:
        """A COM_STMT_EXECUTE of a prepared KILL of a proxy id: carried out as that KILL sent
        as a query would be (True), once the backend is idle (False: wait). None: not one."""
        if len(packet) < 9:
            return None
        stmt_id = packet_stmt_id(packet)
        if stmt_id == LAST_PREPARED_ID:  # "the one prepared last" (execute_direct)
            if self._prepares_sent and not tracker.idle:
                # Behind a KILL's prepare it waits for the PREPARE_OK; behind any other it goes
                # on at once (records.py: _direct_execute), as Connector/C pipelines it.
                return False if self._kill_in_flight else None
            last = self.state.last_prepared
            stmt_id = last if last is not None else stmt_id
        stmt = self.state.stmts.get(stmt_id)
        if stmt is None or stmt.kill is None:
            return None
        if not tracker.idle:
            return False
        kill = stmt.kill
        if isinstance(kill, KillExpression):
            evaluate_kill(self, kill)  # type: ignore[arg-type]
        else:
            handle_kill(self, kill.connection_id, kill.query_only, kill.prefix)  # type: ignore[arg-type]
        return True

    def _unmapped_kill_prepare(self, sql: bytes) -> bool | None:
        """A KILL whose target the proxy cannot map (`KILL ?`) is not prepared: executed, the
        backend would read a proxy id as one of its own thread ids. Refused with the reason
        (True; None: wait for the backend to be idle, False: not one). A lone CONNECTION_ID()
        is no such target (net/ids.py makes it the proxy's id), nor an expression without a
        parameter, which each execute evaluates as the same KILL sent as a query
        (prepared_kill: the backend prepares it and never runs it)."""
        if not sql or sql[0] not in MAYBE_KILL_FIRST_BYTES or prepared_kill(sql) is not None \
                or parse_kill_query(CONNECTION_ID_CALL.sub(b"0", sql)) is not None \
                or not is_unmapped_kill(sql):
            return False
        if self.tracker is not None and not self.tracker.idle:
            return None  # answered in turn, once the responses before it are
        self.reply_error(ER_UNSUPPORTED_PS, "HY000",
                         "TiProxy: a KILL whose target is a parameter cannot be prepared through "
                         "the proxy; send it as a query" if b"?" in sql else
                         "TiProxy: a KILL with a backslash in it is not evaluated")
        return True

    def _query_command(self, packet: bytes) -> bool | None:
        """A COM_QUERY the proxy answers or holds: True answered (KILL), False wait (the
        backend is busy, or a move comes first); None: send it on."""
        sql = packet[5:]
        maybe_kill = bool(sql) and sql[0] in MAYBE_KILL_FIRST_BYTES
        kill = parse_kill_query(sql) if maybe_kill else None
        if kill is not None or (maybe_kill and is_unmapped_kill(sql)):
            if not self.tracker or not self.tracker.idle:
                return False
            if kill is None:
                handle_kill_expression(self, sql)  # type: ignore[arg-type]
            else:
                handle_kill(self, kill.connection_id, kill.query_only, kill.prefix)  # type: ignore[arg-type]
            return True
        if self._begin_shortcut(sql):
            return False  # the move runs first; the BEGIN follows on the new backend
        if b"@" in sql:
            self.state.note_user_vars(user_variable_names(sql))
        return None

