"""The part of a session that moves it to another backend when asked.

Theory of operation
-------------------
A move is requested (a drained backend, the redirect API, a rebalance) with a reason. The session
moves at its next safe point: between commands, with every response complete, outside a
transaction, with no pin (temporary tables, locks, an open cursor, pending long data, a user
without a reusable credential). Until then it reports why it waits. The client's input is held
while the move runs, so no command can slip in between capture and restore.

TiProxy's shortcut: when a move is due and the client sends BEGIN or START TRANSACTION inside a
transaction (which would commit it anyway), the proxy commits on the old backend, moves, and
sends the BEGIN to the new one.

A failed move leaves the session where it was; it is counted and tried again after a delay that
doubles up to half a minute, never at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tiproxy.balance.router import LASTING_RETRY
from tiproxy.client.channel import query
from tiproxy.net.login_phase import COMMAND
from tiproxy.net.migration import MigrationError, move_session
from tiproxy.protocol.constants import ER_ACCESS_DENIED_ERROR, Capability, ServerStatus
from tiproxy.session.statements import statement_effects
from tiproxy.views import counters
from tiproxy.views.history import MoveRecord

if TYPE_CHECKING:
    from tiproxy.balance.router import Backend
    from tiproxy.client.leg import BackendLeg
    from tiproxy.net.migration import MoveResult
    from tiproxy.net.server import ProxyServer
    from tiproxy.protocol.tracker import ResponseTracker
    from tiproxy.session.state import SessionState

log = logging.getLogger("tiproxy.session")

RETRY_FIRST = 1.0
RETRY_MAX = 30.0
RECHECK = 5.0  # a session holding a lock the proxy did not see taken is looked at again then
_IN_TRANS = int(ServerStatus.IN_TRANS)


@dataclass
class MoveRequest:
    reason: str
    target: Backend | None  # None: the router chooses
    requested_at: float
    retry_at: float = 0.0
    failures: int = 0
    waiting: str = ""  # why it has not moved yet


# How long a session that sends nothing waits before it moves: a client reads the warnings or
# FOUND_ROWS() of a statement right after it, well within this.
DIAGNOSTICS_GRACE = 0.1


class SessionMoves:
    """Mixed into Session (net/relay.py), whose attributes it uses."""

    # Provided by Session.
    server: ProxyServer
    id: int
    user: str
    phase: int
    backend: Backend | None
    backend_leg: BackendLeg | None
    tracker: ResponseTracker | None
    state: SessionState
    backend_caps: int
    backend_tls: bool
    mariadb_caps: int
    keepalive_unhealthy: bool

    _cbuf: bytearray
    _held: set[str]
    _ccont: bool

    def __init__(self) -> None:
        self._move: MoveRequest | None = None
        self._moving = False
        self._move_task: asyncio.Task[None] | None = None
        self._soon: asyncio.TimerHandle | None = None  # a quiet session's move, after the grace
        # When a response last completed (the login's, first), or an unanswered statement
        # command went out: the server's idle clock, and how long a session has been quiet.
        self.last_answer = time.monotonic()
        self._idle_timer: asyncio.TimerHandle | None = None  # the session's wait_timeout, moved
        self._idle_wait = 0.0  # the wait_timeout _idle_timer counts
        self.balanced_at = float("-inf")  # when the rebalance loop last moved this session
        self.moves = 0
        self.namespace = ""
        # A move's target refused the login (1045): (target, why, the session's backend),
        # until the stored hashes, read again from that backend, say whether the session's
        # password or the target is to blame (server_views.py's credentials_changed).
        self.refused_login: tuple[Backend, str, str] | None = None

    if TYPE_CHECKING:  # provided by Session and its other mixins: for the type checker only
        def set_backend_keepalive(self, leg: BackendLeg | None, unhealthy: bool) -> None: ...
        def bound_writes(self, transport: asyncio.BaseTransport | None) -> None: ...
        def count_on(self, backend: Backend) -> None: ...
        def hold_input(self, reason: str) -> None: ...
        def release_input(self, reason: str) -> None: ...
        def close(self, reason: str, quiet: bool = False, kind: str = "") -> None: ...
        def backend_data(self, data: bytes) -> None: ...
        def backend_lost(self, exc: Exception | None) -> None: ...
        def pause_client_reading(self, reason: str, pause: bool) -> None: ...
        def _keep_wait_timeout(self, wait_timeout: float | None) -> None: ...  # net/flow.py

    # -- asking -----------------------------------------------------------------------------

    def request_move(self, reason: str, target: Backend | None = None) -> None:
        """Move at the next safe point (now, if this is one)."""
        if self._move is None:
            self._move = MoveRequest(reason, target, time.monotonic())
        elif target is not None:
            self._move.target = target
        self.try_move()

    def cancel_move(self) -> None:
        if not self._moving:
            self._move = None

    @property
    def move_request(self) -> MoveRequest | None:
        return self._move

    @property
    def moving(self) -> bool:
        """A move is asked for or under way."""
        return self._move is not None

    def at_safe_point(self) -> bool:
        """wait_reason() == "", without building the reasons: the rebalancer asks it of every
        session once a second."""
        tracker = self.tracker
        if tracker is not None and tracker.status & _IN_TRANS:
            self.state.next_transaction = False  # the transaction that takes it has begun
        if self.phase != COMMAND or tracker is None or not tracker.idle or self._ccont \
                or tracker.local_infile or tracker.status & _IN_TRANS or self.state.pinned():
            return False
        if self._held and self._held != {"idle"}:
            return False
        return not (self.state.user_vars_overflow and self.backend is not None
                    and self.backend.user_variables_table is False)

    def wait_reason(self) -> str:
        """Why the session cannot move right now; "" at a safe point."""
        tracker = self.tracker
        if self.phase != COMMAND or tracker is None:
            return "not logged in"
        if not tracker.idle or self._ccont or tracker.local_infile or self._held - {"idle"}:
            return "busy with a command"
        reasons = ["in a transaction"] if tracker.status & _IN_TRANS else []
        if reasons:
            self.state.next_transaction = False  # the transaction that takes it has begun
        pins = self.state.pins()
        if self.state.user_vars_overflow and self.backend is not None \
                and self.backend.user_variables_table is False:
            pins.append("too many user variables to carry where USER_VARIABLES is missing")
        if pins:
            reasons.append("pinned: " + "; ".join(pins))
        return "; ".join(reasons)

    def try_move(self, at_command: bool = False) -> bool:
        """Start the requested move if this is a safe point; True if it started.

        A move starts when the client's next command arrives (`at_command`), unless that command
        reads the last statement's diagnostics (warnings, FOUND_ROWS()...): those exist only on
        this backend. A session that sends nothing moves once it has been quiet for
        DIAGNOSTICS_GRACE, a client reading its warnings asks for them sooner than that."""
        move = self._move
        if move is None or self._moving or self.phase != COMMAND:
            return False
        now = time.monotonic()
        if now < move.retry_at:
            return False
        move.waiting = self.wait_reason()
        if move.waiting:
            return False
        quiet = now - max(self.last_answer, move.requested_at)
        if not at_command and quiet < DIAGNOSTICS_GRACE:
            self._move_soon(DIAGNOSTICS_GRACE - quiet)
            return False
        target = move.target
        if target is None or target.draining or target is self.backend or not self._fits(target):
            choices = self._targets()
            target = choices[0] if choices else None
        if target is None:
            move.waiting = "no backend to move to"
            return False
        self._start_move(target)
        return True

    def recheck_move(self) -> None:
        """What pins the session changed between commands (its credential): the move asked
        for is looked at afresh, its reason with it, whenever it was to be tried again."""
        if self._move is not None:
            self._move.retry_at = 0.0
            self.try_move()

    def _move_soon(self, delay: float) -> None:
        if self._soon is None:
            self._soon = asyncio.get_running_loop().call_later(delay, self._quiet_enough)

    def _quiet_enough(self) -> None:
        self._soon = None
        if self.phase == COMMAND and self._move is not None and self.tracker is not None \
                and self.tracker.idle and not self._cbuf:
            self.try_move()

    def _targets(self) -> list[Backend]:
        """Where this session may move, best first."""
        return [b for b in self.server.router.candidates(exclude=self.backend,
                                                         namespace=self.namespace,
                                                         tls=self.backend_tls) if self._fits(b)]

    def _fits(self, target: Backend) -> bool:
        """A TLS backend leg may only move to a backend that offers TLS, a session with
        MariaDB's extended capabilities only to one that offers them all."""
        if self.backend_tls and target.offers_tls is False:
            return False
        offered = target.mariadb_capabilities
        return offered is None or not self.mariadb_caps & ~offered

    # -- moving -----------------------------------------------------------------------------

    def _start_move(self, target: Backend, commit_first: bool = False) -> None:
        self._moving = True
        self.hold_input("move")
        self._move_task = asyncio.get_running_loop().create_task(
            self._run_move(target, commit_first))

    async def _run_move(self, target: Backend, commit_first: bool) -> None:
        move = self._move
        assert move is not None and self.backend is not None
        source = self.backend
        started = time.monotonic()
        try:
            try:
                if commit_first:
                    await self._commit_for_move()
                result = await move_session(self, target)  # type: ignore[arg-type]
            except MigrationError as e:
                rescued = await self.rescue_move(e, target)
                if rescued is None:
                    if self.phase == COMMAND:  # (else the rescue found the session ended)
                        self._move_failed(e, move, source, target, started)
                    return
                result = rescued
            self._swap(result, target)
            self.moves += 1
            self.server.record_migration(MoveRecord(
                time.time(), self.id, self.user, source.addr, target.addr, move.reason, True,
                time.monotonic() - started))
            log.info("session %d moved %s -> %s (%s) in %.1f ms", self.id, source.addr,
                     target.addr, move.reason, (time.monotonic() - started) * 1000)
            self._move = None
        finally:
            self._moving = False
            if self.phase == COMMAND:
                self.release_input("move")

    async def rescue_move(self, error: MigrationError, target: Backend) -> MoveResult | None:
        """A move that failed another way, if it can still land (recovery.py); None if not."""
        return None

    def _move_failed(self, e: MigrationError, move: MoveRequest, source: Backend,
                     target: Backend, started: float) -> None:
        if e.pinned:
            log.info("session %d pinned: %s", self.id, e)
            if not e.old_intact:
                self.close(f"move to {target.addr} broke the old connection: {e}",
                           kind=counters.PROXY_ERROR)
                return
            if e.recheck:
                move.retry_at = time.monotonic() + RECHECK
                move.waiting = f"{e}; checked again in {RECHECK:.0f}s"
            else:
                move.waiting = self.wait_reason()
            return
        self.server.record_migration(MoveRecord(
            time.time(), self.id, self.user, source.addr, target.addr, move.reason, False,
            time.monotonic() - started, str(e)))
        if not e.old_intact:
            self.close(f"move to {target.addr} failed and broke the old connection: {e}",
                       kind=counters.PROXY_ERROR)
            return
        move.failures += 1
        if e.lasting:
            delay = LASTING_RETRY
            move.waiting = (f"last move failed for a lasting reason ({e}); next try in "
                            f"{delay:.0f}s")
            if e.step == "login" and e.code == ER_ACCESS_DENIED_ERROR \
                    and self.server.config().security.auth_sync_user:
                # The session's password changed since its login, or the target's account
                # differs: the stored hashes, read again, tell which (credentials_changed).
                log.warning("session %d: move %s -> %s failed: the target refused its login: "
                            "%s", self.id, source.addr, target.addr, e)
                self.refused_login = (target, str(e), source.addr)
                self.server.control.sync_soon(source.addr)  # its account matched there
            else:
                self.server.lasting_move_problem(source if e.step == "capture" else target,
                                                 str(e))
        else:
            delay = min(RETRY_MAX, RETRY_FIRST * 2 ** (move.failures - 1))
            move.waiting = f"last move failed ({e}); next try in {delay:.0f}s"
            log.warning("session %d: move %s -> %s failed at %s", self.id, source.addr,
                        target.addr, e)
        move.retry_at = time.monotonic() + delay

    async def _commit_for_move(self) -> None:
        """The BEGIN shortcut: end the open transaction on the old backend first."""
        leg = self.backend_leg
        assert leg is not None
        leg.detach()
        try:
            # As the client's BEGIN would: whatever completion_type says (CHAIN would open
            # another transaction there, RELEASE would end the connection).
            result = await query(leg, "COMMIT AND NO CHAIN NO RELEASE",
                                 bool(self.backend_caps & Capability.DEPRECATE_EOF))
        except Exception as e:
            raise MigrationError("commit", str(e), old_intact=_reattach(self, leg)) from e
        assert self.tracker is not None  # moves happen in the command phase
        self.tracker.status = result.status
        if not leg.clean:
            raise MigrationError("commit", "unexpected data", old_intact=False)
        leg.attach(self)
        if result.status & _IN_TRANS:
            raise MigrationError("commit", "still in a transaction after COMMIT")

    def _swap(self, result: MoveResult, target: Backend) -> None:
        old_leg, old_backend = self.backend_leg, self.backend
        assert old_leg is not None and old_backend is not None
        old_leg.close(quit_first=True)
        old_backend.connections -= 1
        target.connections += 1
        self.backend = target
        self.backend_leg = result.leg
        self.set_backend_keepalive(result.leg, bool(target.health))
        self.count_on(target)
        self.bt = result.leg.transport
        self.bound_writes(self.bt)
        self.backend_connection_id = result.connection_id
        assert self.tracker is not None
        self.tracker.status = result.status
        self.state.rebound(result.stmt_ids)
        # A new connection: the server's counts start from what the restore did.
        self.state.temp_creates, self.state.sql_prepares = 0, len(self.state.sql_prepared)
        if result.database is not None:
            self.state.use(result.database or None)
        result.leg.attach(self)
        self.server.router.forget_empty()
        if result.captured is not None:
            self._keep_wait_timeout(result.captured.wait_timeout)

    def _begin_shortcut(self, sql: bytes) -> bool:
        """A BEGIN inside a transaction while a move is due: commit, move, then BEGIN."""
        move = self._move
        if move is None or self._moving or self.tracker is None or not self.tracker.idle:
            return False
        if not self.tracker.status & _IN_TRANS or time.monotonic() < move.retry_at:
            return False
        if not statement_effects(sql).begins_transaction:
            return False
        saved = self.tracker.status
        self.tracker.status = saved & ~_IN_TRANS  # the commit ends it; check the rest
        reason = self.wait_reason()
        self.tracker.status = saved
        if reason:
            move.waiting = reason
            return False
        choices = self._targets()
        target = move.target if move.target is not None and not move.target.draining \
            and self._fits(move.target) else (choices[0] if choices else None)
        if target is None:
            move.waiting = "no backend to move to"
            return False
        self._start_move(target, commit_first=True)
        return True


def _reattach(session: SessionMoves, leg: BackendLeg) -> bool:
    if leg.closed or not leg.clean:
        return False
    leg.attach(session)
    return True
