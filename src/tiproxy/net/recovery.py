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
of the server's time. That keeping is net/checkpoints.py's; this module rebuilds from it.

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
from tiproxy.net.checkpoints import SessionCheckpoints
from tiproxy.net.login_phase import COMMAND
from tiproxy.net.migration import MigrationError, move_session
from tiproxy.protocol.codec import U32
from tiproxy.protocol.constants import Command, ServerStatus
from tiproxy.protocol.errors import ProtocolError
from tiproxy.protocol.packets import parse_greeting
from tiproxy.session.rebuild import (
    retryable,
)
from tiproxy.session.statements import first_keyword
from tiproxy.session.txlog import TransactionLog
from tiproxy.views import counters
from tiproxy.views.history import MoveRecord

if TYPE_CHECKING:
    from tiproxy.balance.router import Backend
    from tiproxy.net.migration import MoveResult

log = logging.getLogger("tiproxy.session")

REBUILD_TARGETS = 3  # backends tried, best first, before the session is given up
PROBE_TIMEOUT = 1.0  # is the server that lost a connection still up: a greeting within this
ER_UNKNOWN_ERROR = 1105
ER_WSREP_NOT_READY = 1047  # ER_UNKNOWN_COM_ERROR, what a Galera node outside the primary says
_IN_TRANS = int(ServerStatus.IN_TRANS)


class SessionRecovery(SessionCheckpoints):
    """Mixed into Session (net/relay.py), after SessionMoves, whose moves it builds on, and
    SessionCheckpoints (net/checkpoints.py), what it rebuilds from."""

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
        # The last command sent while nothing else was outstanding, until its answer begins:
        # what may be sent again if the backend dies first.
        self.inflight: bytes | None = None
        self.lost_transaction = ""  # the next command's error: its transaction died

    # -- the backend is gone ----------------------------------------------------------------

    def backend_gone(self, exc: Exception | None, unanswered: bytes | None = None) -> None:
        """The backend connection was lost unplanned: rebuild the session elsewhere, or close
        it with the reason. `unanswered`: a statement that only reads and assigns user
        variables, whose answer the client never got: it runs again after the rebuild."""
        if self.phase != COMMAND or self.backend is None or self.tracker is None:
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
                           "(killed, a timeout, or a RELEASE): the session ends with it",
                           kind=counters.BACKEND_NETWORK)
                return
            self.server.doubt_backend(lost, "a session's connection to it was lost")
            landed = await self._land_elsewhere(lost)
        finally:
            self._moving = False
        if landed is None or self.phase != COMMAND:
            return
        if replay is not None and await self.replay_elsewhere(replay[0]):
            notice, lost_transaction, resend = None, "", replay[1]  # and the one in flight
        elif original is not None:
            self.send_client(original)  # the node's own error: its transaction is gone
        if self.phase != COMMAND:
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
        leg, backend = self.backend_leg, self.backend
        if error.code != ER_WSREP_NOT_READY and leg is not None and leg.closed \
                and backend is not None and await self._server_still_up(backend):
            # It ended the connection on purpose (a KILL, a timeout, a COMMIT RELEASE) just
            # before the move: the session ends with it, as when no move came (backend_gone).
            self.close(f"backend {backend.addr} closed the connection while the server runs on "
                       "(killed, a timeout, or a RELEASE): the session ends with it",
                       kind=counters.BACKEND_NETWORK)
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
