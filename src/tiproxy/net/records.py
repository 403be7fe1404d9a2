"""What the proxy records of the commands that change a session, so that a move or a replay
can give it back: prepared statements (their ids translated, their parameter types, an execute
of the one prepared last), and, when a response completes, what its command did (statements
that change state, user variables, a reset, COM_INIT_DB, multi-statements).
"""

from __future__ import annotations

import time
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from tiproxy.protocol.codec import U32
from tiproxy.protocol.constants import Capability, Command, ServerStatus
from tiproxy.protocol.errors import ProtocolError
from tiproxy.protocol.responses import Expect
from tiproxy.session.commands import prepared_kill
from tiproxy.session.prepared import (
    LAST_PREPARED_ID,
    execute_types,
    packet_stmt_id,
    with_stmt_id,
    with_types,
)
from tiproxy.session.rebuild import variable_changes
from tiproxy.session.sqltext import user_variable_names
from tiproxy.session.statements import may_change_state, statement_effects

if TYPE_CHECKING:
    from tiproxy.protocol.tracker import ResponseTracker
    from tiproxy.session.connid import ResultRewriter
    from tiproxy.session.rebuild import VariableChanges
    from tiproxy.session.state import SessionState

_QUERY = int(Command.QUERY)
_EXECUTE = int(Command.STMT_EXECUTE)
_CURSOR_EXISTS = int(ServerStatus.CURSOR_EXISTS)
_LAST_ROW_SENT = int(ServerStatus.LAST_ROW_SENT)
_monotonic = time.monotonic
_MULTI_STATEMENTS_ON = b"\x00\x00"  # COM_SET_OPTION's MYSQL_OPTION_MULTI_STATEMENTS_ON
# Commands whose effect is recorded when they succeed (_record): the token's kind; its argument
# is the command's payload.


class CommandRecords:
    """Mixed into Session (net/relay.py), whose attributes it uses."""

    # Provided by Session and its other mixins.
    dialect: str
    backend_caps: int
    state: SessionState
    tracker: ResponseTracker | None
    last_answer: float
    _multi: bool
    _rewriter: ResultRewriter | None
    _intercept: bytearray | None
    _prepares_sent: int
    _kill_in_flight = False  # the last COM_STMT_PREPARE sent is a KILL (an execute by id -1 waits)
    _direct_execute: bytes | None

    if TYPE_CHECKING:  # provided by Session and its other mixins: for the type checker only
        def hold_answer(self, original: bytes, variables: VariableChanges) -> None: ...
        def variables_changed(self, changes: VariableChanges, failed: bool) -> None: ...
        def variables_reset(self) -> None: ...
        def _connection_ids(self, packet: bytes, prepare: bool) -> Any: ...
        def _user_changed(self, user: str, failed: bool) -> None: ...
        def own_password_set(self, password: bytes) -> None: ...  # net/login_phase.py
        def _to_client(self, data: bytes) -> None: ...

    def _query_token(self, packet: bytes, original: bytes) -> Any:
        """What to record of a COM_QUERY when it completes: ("query", effects, variable
        changes), or just its command byte when there is nothing."""
        # While LOCK TABLES holds, every statement is read: START TRANSACTION releases it.
        look = self.state.table_locks or may_change_state(packet[4:], True)
        fx = statement_effects(packet[5:]) if look else None
        variables = variable_changes(packet[5:]) if self.dialect == "mysql" else None
        if variables is not None and variables.rerun_names and self._rewriter is None \
                and not self.state.counts_reset:  # (no rebuild: reading would only count)
            self.hold_answer(original, variables)  # checkpoints.py: read right after it
        if fx or (variables is not None and (variables.stale or variables.replays)):
            return ("query", fx, variables)
        return _QUERY

    def _hold_assigned(self, client_id: int, original: bytes) -> None:
        """A COM_STMT_EXECUTE of a statement that only reads and assigns user variables: its
        answer is held until they are read by name, as a query's is (_query_token), rather
        than the next command's checkpoint reading every user variable from a table."""
        stmt = self.state.stmts.get(client_id)
        variables = stmt.variables if stmt is not None else None
        if variables is not None and variables.rerun_names and self.dialect == "mysql" \
                and self._rewriter is None and not self.state.counts_reset:
            self.hold_answer(original, variables)

    def _prepare_command(self, packet: bytes) -> tuple[bytes, tuple[Any, ...]] | None:
        """COM_STMT_PREPARE: what to send and its token; None: wait."""
        if b"@" in packet:
            self.state.note_user_vars(user_variable_names(packet[5:]))
        assert self.tracker is not None
        if self.state.mapped and not self.tracker.idle:
            return None
        rewritten = self._connection_ids(packet, prepare=True)
        if rewritten is False:
            return None
        if self.state.mapped:
            self._intercept = bytearray()  # its PREPARE_OK gets the client's id
        # Rewritten: the rewriter was made for this statement's response just now.
        renames = self._rewriter.renames if rewritten is not packet and self._rewriter else ()
        packet = rewritten
        self._prepares_sent += 1
        self._kill_in_flight = prepared_kill(packet[5:]) is not None  # commands.py: id -1
        return packet, ("prepare", packet[5:], renames)

    def _executed_sql(self, packet: bytes, cmd: int) -> bytes | None:
        """The text of the prepared statement a COM_STMT_EXECUTE runs, if the proxy knows it."""
        if cmd != _EXECUTE:
            return None
        stmt = self.state.stmts.get(packet_stmt_id(packet))
        return stmt.sql if stmt is not None else None

    def _statement_command(self, packet: bytes, cmd: int) -> tuple[bytes, Any] | None:
        """Translate the statement id and record what the command does; None: nothing to send."""
        state = self.state
        client_id = packet_stmt_id(packet)
        stmt = state.stmts.get(client_id)
        if stmt is None and client_id == LAST_PREPARED_ID and cmd == Command.STMT_EXECUTE:
            if self._prepares_sent and self.tracker is not None and not self.tracker.idle:
                # Its statement is still being prepared: its types are recorded with it.
                self._direct_execute = packet
                return packet, cmd
            stmt = state.stmts.get(state.last_prepared) if state.last_prepared is not None \
                else None
            if stmt is not None:  # that statement, by its id on this backend
                client_id = stmt.client_id
                packet = with_stmt_id(packet, stmt.backend_id)
        elif stmt is not None and stmt.backend_id != client_id:
            packet = with_stmt_id(packet, stmt.backend_id)
        token: Any = cmd
        if stmt is None:
            pass  # unknown statement: the backend answers with its own error
        elif cmd == Command.STMT_EXECUTE:
            flags, types = execute_types(packet, stmt.params)
            if types is not None:
                stmt.param_types = types
                stmt.types_sent = True
            elif not stmt.types_sent and stmt.param_types is not None:
                packet = with_types(packet, stmt.params, stmt.param_types)
                stmt.types_sent = True
            stmt.reset()
            recorded = flags or stmt.effects is not None or stmt.variables is not None
            token = ("execute", client_id) if recorded else cmd
        elif cmd == Command.STMT_FETCH:
            token = ("fetch", client_id)
        elif cmd == Command.STMT_CLOSE:
            state.closed(client_id)
            self.last_answer = _monotonic()  # unanswered, it restarts the server's idle clock
        elif cmd == Command.STMT_RESET:
            stmt.reset()
        elif cmd == Command.STMT_SEND_LONG_DATA:
            stmt.long_data = True
            self.last_answer = _monotonic()  # (as COM_STMT_CLOSE)
        return packet, token

    def packet_for_replay(self, packet: bytes) -> tuple[bytes, Expect]:
        """A recorded command as the current backend must get it (statement ids translated)."""
        if packet[4] == _EXECUTE:
            result = self._statement_command(packet, _EXECUTE)
            assert result is not None
            return result[0], Expect.BINARY
        return packet, Expect.RESULT

    def _record(self, token: tuple[Any, ...], status: int, failed: bool) -> None:
        """A response completed: record what its command did to the session."""
        kind = token[0]
        state = self.state
        if kind == "query":
            if token[1]:
                state.ran(token[1], failed)
                if token[1].own_password is not None and not failed:
                    self.own_password_set(token[1].own_password)
            if token[2] is not None:
                self.variables_changed(token[2], failed)
        elif kind == "prepare":
            self._prepared(token[1], token[2], failed)
        elif kind == "execute":
            stmt = state.stmts.get(token[1])
            if stmt is not None:
                stmt.cursor_open = not failed and bool(status & _CURSOR_EXISTS)
                if stmt.effects is not None:
                    state.ran(stmt.effects, failed)
                if stmt.variables is not None:
                    self.variables_changed(stmt.variables, failed)
        elif kind == "fetch":
            stmt = state.stmts.get(token[1])
            if stmt is not None and (failed or status & _LAST_ROW_SENT):
                stmt.cursor_open = False
        elif kind == "reset" and not failed:
            state.reset()
            self.variables_reset()
        elif kind == "init_db" and not failed:
            state.use(token[1])
        elif kind == "set_option" and not failed:
            # Multi-statements turned on or off for the rest of the connection: the proxy
            # reads `;` by it, and a move logs in again with it (net/migration.py).
            multi = token[1][:2] == _MULTI_STATEMENTS_ON
            self._multi = multi
            caps = self.backend_caps & ~Capability.MULTI_STATEMENTS
            self.backend_caps = caps | Capability.MULTI_STATEMENTS if multi else caps
        elif kind == "change_user":
            self._user_changed(token[1], failed)

    def _prepared(self, sql: bytes, renames: tuple[tuple[bytes, bytes], ...],
                  failed: bool) -> None:
        assert self.tracker is not None
        prepared = self.tracker.prepared
        client_id = None
        self._prepares_sent = max(self._prepares_sent - 1, 0)
        direct = self._direct_execute if not self._prepares_sent else None
        if direct is not None:
            self._direct_execute = None
        if not failed and prepared is not None:
            backend_id, columns, params = prepared
            client_id = self.state.prepared(backend_id, sql, columns, params)
            stmt = self.state.stmts[client_id]
            stmt.renames = renames
            if direct is not None:  # an execute_direct's: the first execute's types
                with suppress(ProtocolError):  # malformed: the backend refused it already
                    types = execute_types(direct, params)[1]
                    if types is not None:
                        stmt.param_types, stmt.types_sent = types, True
        elif failed:
            self.state.last_prepared = None  # MariaDB forgets its last one too
        held, self._intercept = self._intercept, None
        if held is not None:
            if client_id is not None and len(held) >= 9:
                held[5:9] = U32.pack(client_id)  # PREPARE_OK's statement id, first packet
            self._to_client(bytes(held))
