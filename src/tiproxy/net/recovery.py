"""Sessions that outlive their backend: what a rebuild needs, kept as the session runs, and the
rebuild itself when the backend connection is lost unplanned.

Theory of operation
-------------------
A move asks the old backend for the session's state. When the old backend is gone (killed,
crashed, shut down, cut off) there is no one to ask, so a session keeps beside it what rebuilding
needs without its backend (session/rebuild.py): the database and prepared statements it follows
anyway, a checkpoint of the variables, the literal assignments made since, and whether a
statement since may have changed them in a way only the server knows ("stale"). A stale session
takes a new checkpoint when its next command arrives, before that command runs: the capture
statement costs one round trip, and reading the user variables alone a tenth of a millisecond
of the server's time. Commands that read the last statement's diagnostics (which a capture
would clear) go first; the checkpoint waits for the next command.

When the backend connection is lost (the read error itself, keep-alive, the server closing it):
- between commands, the session logs in to another backend and its snapshot is restored there;
  the client notices nothing. Inside a transaction, the transaction is gone: the client's next
  command (unless it is a ROLLBACK) gets an error saying so, and the session goes on;
- with a command in flight whose answer has not begun: a read-only statement (or a command whose
  effect the proxy records only from its answer) runs again on the new backend; anything else
  gets an error saying its outcome is unknown, and the session goes on;
- a session that cannot be rebuilt (pinned by temporary tables or locks, no reusable
  credential, a TiDB session, a stale checkpoint, an answer cut off midway) is closed as before,
  with the reason logged.
A move whose capture fails because the old backend died (or is a Galera node that left the
primary component) lands the session from its snapshot the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from tiproxy.client.leg import BackendLeg
from tiproxy.net.migration import MigrationError, move_session
from tiproxy.net.moves import SessionMoves
from tiproxy.net.state_capture import (
    HiddenStateError,
    capture_named_variables,
    capture_state,
    capture_system_variables,
    capture_user_variables,
)
from tiproxy.protocol.codec import U32
from tiproxy.protocol.constants import Command, ServerStatus
from tiproxy.protocol.errors import ProtocolError, SQLError
from tiproxy.protocol.packets import parse_greeting
from tiproxy.session.dialects.mysql import CapturedState
from tiproxy.session.rebuild import (
    VARS_ALL,
    VARS_NONE,
    VARS_SYSTEM,
    VARS_USER,
    Snapshot,
    VariableChanges,
    charset_change,
    retryable,
)
from tiproxy.session.statements import first_keyword, reads_diagnostics
from tiproxy.session.txlog import TransactionLog
from tiproxy.views import counters
from tiproxy.views.history import MoveRecord

if TYPE_CHECKING:
    from tiproxy.balance.router import Backend
    from tiproxy.net.migration import MoveResult

log = logging.getLogger("tiproxy.session")

# Bounds of the assignments kept since the last checkpoint (each variable's last only): past
# them the session is stale, and its next command takes a checkpoint, which empties them. They
# stop a client that assigns ever new variables from growing the proxy's memory.
MAX_REPLAYS = 256
MAX_REPLAY_BYTES = 64 * 1024
CHECKPOINT_BACKOFF = 5.0  # after a checkpoint failed, seconds before the next try
# An answer kept back until the variables its statement assigned are read: past this size it
# goes on to the client (the session is then stale until its next command's checkpoint).
HELD_ANSWER_LIMIT = 256 * 1024
REBUILD_TARGETS = 3  # backends tried, best first, before the session is given up
PROBE_TIMEOUT = 1.0  # is the server that lost a connection still up: a greeting within this
ER_UNKNOWN_ERROR = 1105
ER_WSREP_NOT_READY = 1047  # ER_UNKNOWN_COM_ERROR, what a Galera node outside the primary says
_IN_TRANS = int(ServerStatus.IN_TRANS)
_COMMAND = 1  # relay.COMMAND


class SessionRecovery(SessionMoves):
    """Mixed into Session (net/relay.py), after SessionMoves, whose moves it builds on."""

    # Provided by Session.
    dialect: str
    _cbuf: bytearray
    _rewriter: Any
    _intercept: bytearray | None

    if TYPE_CHECKING:  # provided by Session and its other mixins: for the type checker only
        def reply_error(self, code: int, state: str, message: str) -> None: ...
        def _executed_sql(self, packet: bytes, cmd: int) -> bytes | None: ...
        def backend_header(self) -> bytes | None: ...
        def send_client(self, data: bytes) -> None: ...

    def __init__(self) -> None:
        super().__init__()
        self.checkpoint: CapturedState | None = None  # None: as the login left it
        self.replays: dict[bytes, bytes] = {}  # variable -> its last literal assignment
        self._replay_bytes = 0
        self.stale = VARS_NONE
        self._stale_system: set[str] = set()  # assigned from expressions: read at a checkpoint
        self.role_changed = False  # the current role may differ from the login's (pool.py)
        # The last command sent while nothing else was outstanding, until its answer begins:
        # what may be sent again if the backend dies first.
        self.inflight: bytes | None = None
        self._checkpoint_after = 0.0
        self._checkpoint_task: asyncio.Task[None] | None = None
        self.lost_transaction = ""  # the next command's error: its transaction died
        # The answer to a statement that assigned user variables from expressions, kept back
        # until they are read (then the statement it answers, and the names to read).
        self.held_answer: bytearray | None = None
        self._held_for: tuple[bytes, list[bytes]] = (b"", [])

    # -- keeping what a rebuild needs ---------------------------------------------------------

    def variables_changed(self, changes: VariableChanges, failed: bool) -> None:
        """A statement that assigns variables completed."""
        if changes.role:
            self.role_changed = True  # even if it failed part way
            if changes.role_set:
                self.state.role_set = True
        if not (changes.rerun_names and self.held_answer is not None):
            self.stale = max(self.stale, changes.stale)  # (else: read right after it)
        if failed:
            if changes.replays or changes.system_names:
                # Several statements, a later one failed: the assignments before it took.
                self.stale = VARS_ALL
            return
        if charset_change(changes, list(self.replays.values())):
            self.stale = VARS_ALL  # only a capture knows the literals' bytes now
        self._stale_system.update(name.decode() for name in changes.system_names)
        self._keep(changes.replays)

    def _keep(self, replays: list[tuple[bytes, bytes]]) -> None:
        """Assignments to run again: the last of each variable, in the order of the last ones."""
        for key, statement in replays:
            old = self.replays.pop(key, None)
            if old is not None:
                self._replay_bytes -= len(old)
            self.replays[key] = statement
            self._replay_bytes += len(statement)
        if len(self.replays) > MAX_REPLAYS or self._replay_bytes > MAX_REPLAY_BYTES:
            self.stale = VARS_ALL

    def variables_reset(self) -> None:
        """COM_RESET_CONNECTION or COM_CHANGE_USER: the server set every variable to its global
        value, not to what the login chose (SET NAMES included): only a capture is exact."""
        self._forget_replays()
        self.checkpoint = None
        self.stale = VARS_ALL

    def captured_whole(self, state: CapturedState | None) -> None:
        """A move or a checkpoint read every variable: it is the checkpoint now."""
        if state is None:
            return
        self.checkpoint = state
        self._forget_replays()
        self._stale_system.clear()
        self.stale = VARS_NONE

    def _forget_replays(self, users_only: bool = False) -> None:
        for key in [k for k in self.replays if not users_only or k.startswith(b"@")]:
            self._replay_bytes -= len(self.replays.pop(key))

    def snapshot(self) -> Snapshot:
        base = self.checkpoint or CapturedState()
        state = CapturedState(database=base.database, last_insert_id=base.last_insert_id,
                              system=list(base.system), user=list(base.user))
        if self.state.database_known:
            state.database = self.state.database
        return Snapshot(state, tuple(self.replays.values()))

    def rebuild_problem(self) -> str:
        """Why this session cannot be rebuilt without its backend; "" when it can."""
        if self.dialect != "mysql":
            return "a TiDB session is rebuilt from its server's own state, which is gone"
        if self.stale:
            return ("its variables changed since its last checkpoint in a way only its backend "
                    "knew")
        pins = self.state.pins()
        return "pinned: " + "; ".join(pins) if pins else ""

    # -- checkpoints ------------------------------------------------------------------------

    def checkpoint_due(self, packet: bytes, cmd: int) -> bool:
        """At a command's arrival: take a checkpoint first if the session is stale (and could
        be rebuilt with one). True: the command waits for it."""
        if not self.stale or self._moving or time.monotonic() < self._checkpoint_after:
            return False
        if self.dialect != "mysql" or self.state.pinned() or self.backend_leg is None:
            return False  # no checkpoint would make a rebuild possible
        if reads_diagnostics(packet, self._executed_sql(packet, cmd)):
            return False  # it reads what a capture would clear: it goes first
        self.hold_input("checkpoint")
        self._checkpoint_task = asyncio.get_running_loop().create_task(self._take_checkpoint())
        return True

    async def _take_checkpoint(self) -> None:
        leg = self.backend_leg
        assert leg is not None
        by_name = self.stale in (VARS_USER, VARS_SYSTEM)
        leg.detach()
        try:
            if by_name:
                system = sorted(self._stale_system)
                assignments = await capture_system_variables(
                    self, leg, system) if system else []  # type: ignore[arg-type]
                users, last_insert_id = await capture_user_variables(
                    self, leg)  # type: ignore[arg-type]
                base = self.checkpoint or CapturedState()
                base.user = users
                if last_insert_id is not None:
                    base.last_insert_id = last_insert_id
                self.checkpoint = base
                self._forget_replays(users_only=True)
                self._keep([(name.encode(), statement) for name, statement in assignments])
                self._stale_system.clear()
                if self.stale != VARS_ALL:  # (_keep: too many to keep)
                    self.stale = VARS_NONE
            else:
                self.captured_whole(await capture_state(self, leg))  # type: ignore[arg-type]
        except HiddenStateError as e:  # state made unseen: no rebuild could carry it
            self._checkpoint_after = time.monotonic() + CHECKPOINT_BACKOFF
            log.info("session %d cannot be rebuilt without its backend (looked at again in "
                     "%.0fs): %s", self.id, CHECKPOINT_BACKOFF, e)
        except (SQLError, ProtocolError, OSError, TimeoutError) as e:
            self._checkpoint_after = time.monotonic() + CHECKPOINT_BACKOFF
            if by_name:  # what could not be read by name: the next one reads everything
                self.stale, self._stale_system = VARS_ALL, set()
            log.info("session %d: checkpoint failed (tried again in %.0fs): %s", self.id,
                     CHECKPOINT_BACKOFF, e)
        finally:
            if self.phase == _COMMAND:
                if leg.closed or not leg.clean:
                    self.backend_gone(None)
                else:
                    leg.attach(self)
                self.release_input("checkpoint")

    # -- an answer held until the variables its statement assigned are read ------------------

    def hold_answer(self, packet: bytes, changes: VariableChanges) -> None:
        """Before sending `packet`, a statement that only reads and assigns user variables
        from expressions: keep its answer back, read those variables right after it, then
        let the answer go. If the backend dies before they are read, the client never got the
        answer: the statement runs again, on the backend the session is rebuilt on."""
        if self.dialect != "mysql" or self.state.pinned() or self._moving \
                or self.tracker is None or not self.tracker.idle:
            return
        self.held_answer = bytearray()
        self._held_for = (packet, sorted(changes.rerun_names))
        self.hold_input("capture")

    def keep_answer(self, data: bytes) -> None:
        held = self.held_answer
        assert held is not None
        held += data
        if len(held) > HELD_ANSWER_LIMIT:  # too large to keep: it goes on, stale afterwards
            self.held_answer = None
            self.stale = max(self.stale, VARS_USER)
            self.send_client(bytes(held))
            self.release_input("capture")

    def answer_complete(self) -> None:
        """The held answer is whole: read the variables, then send it on."""
        self._checkpoint_task = asyncio.get_running_loop().create_task(self._read_assigned())

    async def _read_assigned(self) -> None:
        leg = self.backend_leg
        assert leg is not None
        packet, names = self._held_for
        leg.detach()
        try:
            users, last_insert_id = await capture_named_variables(
                self, leg, names)  # type: ignore[arg-type]
        except (OSError, TimeoutError, ProtocolError, SQLError) as e:
            if self.phase != _COMMAND:
                return
            if leg.closed or not leg.clean:  # gone before the client saw the answer
                self.held_answer = None
                self.backend_gone(None, unanswered=packet)
                self.release_input("capture")
                return
            self.stale = max(self.stale, VARS_USER)
            log.info("session %d: reading its user variables failed: %s", self.id, e)
        else:
            base = self.checkpoint or CapturedState()
            wanted = set(names)
            base.user = [v for v in base.user if v.name not in wanted] + users
            base.last_insert_id = last_insert_id
            self.checkpoint = base
            for name in names:  # read after them: their assignments need not run again
                old = self.replays.pop(b"@" + name, None)
                self._replay_bytes -= len(old) if old is not None else 0
        if self.phase != _COMMAND:
            return
        held, self.held_answer = self.held_answer, None
        leg.attach(self)
        if held:
            self.send_client(bytes(held))
        self.release_input("capture")

    # -- the backend is gone ----------------------------------------------------------------

    def backend_gone(self, exc: Exception | None, unanswered: bytes | None = None) -> None:
        """The backend connection was lost unplanned: rebuild the session elsewhere, or close
        it with the reason. `unanswered`: a statement that only reads and assigns user
        variables, whose answer the client never got: it runs again after the rebuild."""
        if self.phase != _COMMAND or self.backend is None or self.tracker is None:
            return
        if self._moving:
            return  # the move's own queries fail; it lands from the snapshot (see _run_move)
        if self.held_answer is not None:  # the client saw none of it: the statement runs again
            self.held_answer = None
            unanswered = self._held_for[0]
            self.release_input("capture")
        addr = self.backend.addr
        tracker = self.tracker
        in_trans = bool(tracker.status & _IN_TRANS)
        resend = notice = packet = None
        if unanswered is not None and not in_trans:
            resend = packet = unanswered
        elif not tracker.idle or unanswered is not None:
            packet = unanswered or self.inflight
            if packet is None:
                self.close(f"backend {addr} closed the connection during a command whose "
                           "answer had begun (or behind another)", kind=counters.BACKEND_NETWORK)
                return
            if not in_trans and retryable(packet, self._executed_sql(packet, packet[4])):
                resend = packet
            else:
                notice = (f"TiProxy: backend {addr} was lost before it answered; the "
                          "statement's outcome is unknown"
                          + ("; the transaction was rolled back" if in_trans else ""))
        problem = self.rebuild_problem()
        if problem:
            self.close(f"backend {addr} closed the connection"
                       + (f" ({exc})" if exc else "")
                       + f"; the session cannot be rebuilt elsewhere: {problem}",
                       kind=counters.BACKEND_NETWORK)
            return
        lost = "" if notice is not None or not in_trans else (
            f"TiProxy: backend {addr} was lost with this session's open transaction, which was "
            "rolled back; this statement did not run")
        txlog = self.replayable_transaction(packet) if in_trans else None
        self.hold_input("rebuild")
        tracker.restart(int(ServerStatus.AUTOCOMMIT))
        self._rewriter = self._intercept = None
        self.inflight = None
        self._checkpoint_task = asyncio.get_running_loop().create_task(
            self._recover(self.backend, resend, notice, lost,
                          replay=(txlog, packet) if txlog is not None else None))

    def wsrep_not_ready(self, data: bytes, packet: bytes) -> bool:
        """The first chunk of the answer to `packet` is a Galera node's 1047 (it left the
        primary component, or is shutting down): the statement did not run there. True when
        the session goes on on another node instead and the statement runs there; False to
        relay the error (inside a transaction that cannot be replayed, or a session that cannot
        be rebuilt)."""
        if len(data) < 7 or (data[5] | data[6] << 8) != ER_WSREP_NOT_READY \
                or (U32.unpack_from(data, 0)[0] & 0xFFFFFF) + 4 != len(data):
            return False
        tracker, backend = self.tracker, self.backend
        assert tracker is not None and backend is not None
        in_trans = bool(tracker.status & _IN_TRANS)
        txlog = self.replayable_transaction(packet) if in_trans else None
        if (in_trans and txlog is None) or self.rebuild_problem() or tracker.pending > 1:
            return False
        self.hold_input("rebuild")
        tracker.restart(tracker.status)  # this answer is not relayed: nothing is outstanding
        self.server.doubt_backend(backend, "a session got 1047 (WSREP not ready)")
        old = self.backend_leg
        self._checkpoint_task = asyncio.get_running_loop().create_task(self._recover(
            backend, None if in_trans else packet, None, "",
            replay=(txlog, packet) if txlog is not None else None, probe=False,
            original=bytes(data) if in_trans else None))
        if old is not None:
            old.detach()  # said goodbye to once the session lands elsewhere
        return True

    async def _recover(self, lost: Backend, resend: bytes | None, notice: str | None,
                       lost_transaction: str, *,
                       replay: tuple[TransactionLog, bytes | None] | None = None,
                       probe: bool = True, original: bytes | None = None) -> None:
        """Rebuild the session elsewhere, unless its server is alive and well: then the
        connection was ended on purpose (a KILL, wait_timeout), and the session ends with it,
        as a direct connection would. (`probe` False: the server said it cannot serve;
        `original`: its error, for the client if the transaction cannot be replayed.)"""
        started = time.monotonic()
        self._moving = True
        try:
            if probe and await self._server_still_up(lost):
                self.close(f"backend {lost.addr} closed the connection while the server runs on "
                           "(killed, or a timeout): the session ends with it",
                           kind=counters.BACKEND_NETWORK)
                return
            self.server.doubt_backend(lost, "a session's connection to it was lost")
            landed = await self._land_elsewhere(lost)
        finally:
            self._moving = False
        if landed is None or self.phase != _COMMAND:
            return
        if replay is not None and await self.replay_elsewhere(replay[0]):
            notice, lost_transaction, resend = None, "", replay[1]  # and the one in flight
        elif original is not None:
            self.send_client(original)  # the node's own error: its transaction is gone
        if self.phase != _COMMAND:
            return
        self.server.record_migration(MoveRecord(
            time.time(), self.id, self.user, lost.addr, landed.addr, "backend_lost", True,
            time.monotonic() - started))
        log.warning("session %d: backend %s was lost; the session goes on on %s (rebuilt in "
                    "%.1f ms)%s", self.id, lost.addr, landed.addr,
                    (time.monotonic() - started) * 1000,
                    "; the command in flight runs again" if resend else
                    "; the command in flight was answered with an error" if notice else "")
        if notice is not None:
            self.reply_error(ER_UNKNOWN_ERROR, "HY000", notice)
        self.lost_transaction = lost_transaction
        if resend is not None:
            self._cbuf[:0] = resend
        self.release_input("rebuild")

    async def _server_still_up(self, backend: Backend) -> bool:
        """Whether the server that lost this session's connection is the same one still
        running: it greets a new connection with a higher thread id than this session's (a
        restarted server counts from 1 again; a dead one does not answer)."""
        leg: BackendLeg | None = None
        try:
            leg = await BackendLeg.open(backend.host, backend.port, PROBE_TIMEOUT,
                                        header=self.backend_header())
            _, payload = await leg.read_packet(PROBE_TIMEOUT)
        except (OSError, TimeoutError, ProtocolError):
            return False
        finally:
            if leg is not None:
                leg.abort()
        if payload[:1] == b"\xff":
            return True  # it answers (too many connections, a blocked host): it is up
        try:
            return parse_greeting(payload).connection_id > self.backend_connection_id
        except ProtocolError:
            return False

    async def _land_elsewhere(self, lost: Backend) -> Backend | None:
        """Log in to the best other backend and restore the snapshot; None: the session was
        closed, no backend would take it."""
        snapshot = self.snapshot()
        why = "no other backend is available"
        for target in self._targets()[:REBUILD_TARGETS]:
            try:
                result = await move_session(self, target, snapshot)  # type: ignore[arg-type]
            except MigrationError as e:
                why = f"{target.addr}: {e}"
                continue
            self._swap(result, target)
            return target
        self.close(f"backend {lost.addr} closed the connection and no other backend took the "
                   f"session ({why})", kind=counters.BACKEND_NETWORK)
        return None

    async def rescue_move(self, error: MigrationError, target: Backend) -> MoveResult | None:
        """A move whose capture failed because the old backend died, or answers nothing but
        1047 (a Galera node that left the primary component): land from the snapshot."""
        if error.step != "capture" or (error.old_intact and error.code != ER_WSREP_NOT_READY):
            return None
        if self.rebuild_problem():
            return None
        log.info("session %d: its backend cannot be read (%s): moving it from its snapshot",
                 self.id, error)
        try:
            return await move_session(self, target, self.snapshot())  # type: ignore[arg-type]
        except MigrationError as e:
            log.info("session %d: the move from its snapshot failed too: %s", self.id, e)
            return None

    def _swap(self, result: MoveResult, target: Backend) -> None:
        super()._swap(result, target)
        self.captured_whole(result.captured)  # a move read every variable: a checkpoint

    def replayable_transaction(self, inflight: bytes | None) -> TransactionLog | None:
        """The open transaction, if transaction replay can carry it (net/replay.py)."""
        return None

    async def replay_elsewhere(self, txlog: TransactionLog) -> bool:
        return False

    def transaction_lost(self, packet: bytes) -> bool:
        """The command after a transaction died with its backend: True if it was answered with
        the error (anything but ROLLBACK, which has nothing left to undo, and runs)."""
        notice, self.lost_transaction = self.lost_transaction, ""
        if packet[4] == Command.QUERY and first_keyword(packet[5:]) == b"ROLLBACK":
            return False
        self.reply_error(ER_UNKNOWN_ERROR, "HY000", notice)
        return True
