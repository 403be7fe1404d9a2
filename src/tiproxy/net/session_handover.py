"""The session's side of a handover to or from another proxy process (net/handover.py moves the
sockets and the state): when a session may travel, what travels, and how a session that came
from another process goes on here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from tiproxy.net.handover import SessionHandover
from tiproxy.net.login_phase import CLOSED, COMMAND
from tiproxy.protocol.compress import Decompressor
from tiproxy.protocol.constants import Capability
from tiproxy.protocol.tracker import ResponseTracker
from tiproxy.session.rebuild import VARS_ALL, VARS_SYSTEM

if TYPE_CHECKING:
    from tiproxy.balance.router import Backend
    from tiproxy.client.leg import BackendLeg
    from tiproxy.net.server import ProxyServer
    from tiproxy.protocol.packets import HandshakeResponse
    from tiproxy.session.connid import ResultRewriter
    from tiproxy.session.dialects.mysql_restore import CapturedState
    from tiproxy.session.state import SessionState
    from tiproxy.session.txlog import TransactionLog

log = logging.getLogger("tiproxy.session")
_monotonic = time.monotonic


class SessionHandoverPart:
    """Mixed into Session (net/relay.py), whose attributes it uses."""

    # Provided by Session and its other mixins.
    server: ProxyServer
    client: asyncio.Transport
    id: int
    peer: str
    user: str
    namespace: str
    dialect: str
    phase: int
    started: float
    moves: int
    backend: Backend | None
    backend_leg: BackendLeg | None
    bt: asyncio.Transport | None
    backend_connection_id: int
    backend_caps: int
    client_caps: int
    mariadb_caps: int
    client_tls: bool
    backend_tls: bool
    login_response: HandshakeResponse | None
    credential: bytes | None
    client_salt: bytes | None
    state: SessionState
    tracker: ResponseTracker | None
    last_answer: float
    checkpoint: CapturedState | None
    replays: dict[bytes, bytes]
    stale: int
    replay_limit: int
    txlog: TransactionLog | None
    held_answer: bytearray | None
    lost_transaction: str
    _stale_system: set[str]
    _replay_bytes: int
    _idle_wait: float
    _idle_timer: asyncio.TimerHandle | None
    _task: asyncio.Task[None] | None
    _origin: tuple[tuple[str, int], tuple[str, int]] | None
    _decompress: Decompressor | None
    _multi: bool
    _cbuf: bytearray
    _ccont: bool
    _held: set[str]
    _moving: bool
    _intercept: bytearray | None
    _rewriter: ResultRewriter | None
    _counted: bool
    _opened: float

    if TYPE_CHECKING:  # provided by Session and its other mixins: for the type checker only
        def _response_done(self, token: Any, status: int, failed: bool) -> None: ...
        def _drain_client(self) -> None: ...
        def _keep_wait_timeout(self, wait_timeout: float | None) -> None: ...
        def count_on(self, backend: Backend) -> None: ...
        def set_backend_keepalive(self, leg: BackendLeg | None, unhealthy: bool) -> None: ...
        def bound_writes(self, transport: asyncio.BaseTransport | None) -> None: ...
        def hold_input(self, reason: str) -> None: ...
        def release_input(self, reason: str) -> None: ...
        def pause_backend_reading(self, pause: bool) -> None: ...
        def leave_direct(self) -> None: ...

    def at_handover_point(self) -> str:
        """Why this session cannot be handed over now; "" when it can."""
        if self.client_tls or self.backend_tls:
            return "a TLS leg, whose keys stay in this process"
        tracker = self.tracker
        if self.phase != COMMAND or tracker is None or not tracker.idle \
                or self._ccont or self._held - {"idle"} or self._moving \
                or self._intercept is not None or self._rewriter is not None \
                or self.held_answer is not None or self.lost_transaction \
                or (self._task is not None and not self._task.done()) \
                or (self._decompress is not None and self._decompress.buffered):
            return "busy"
        return ""

    def handover_state(self) -> SessionHandover:
        assert self.backend is not None and self.tracker is not None
        return SessionHandover(
            self.id, self.peer, self.user, self.namespace, self.dialect, self.backend.addr,
            self.backend_connection_id, self.backend_caps, self.client_caps, self.mariadb_caps,
            self.login_response, self.credential, self.state, self.tracker.status,
            self._decompress is not None, self._origin, self.started, self.moves,
            self.checkpoint, self.replays, self.stale, self.replay_limit, self.txlog,
            bytes(self._cbuf), tuple(sorted(self._stale_system)), self.client_salt,
            self.last_answer, self._idle_wait if self._idle_timer is not None else None,
            commits=True)

    def _adopt(self, h: SessionHandover, leg: BackendLeg) -> None:
        """Go on with a session another process handed over, in the command phase."""
        self.phase = COMMAND
        self.peer, self.user, self.namespace, self.dialect = h.peer, h.user, h.namespace, \
            h.dialect
        self.backend_connection_id, self.backend_caps = h.backend_connection_id, h.backend_caps
        self.client_caps, self.mariadb_caps = h.client_caps, h.mariadb_caps
        self._multi = bool(h.client_caps & Capability.MULTI_STATEMENTS)
        self.login_response, self.credential, self.state = h.login_response, h.credential, \
            h.state
        self._origin, self.started, self.moves = h.origin, h.started, h.moves
        self.checkpoint, self.replays, self.stale = h.checkpoint, h.replays, h.stale
        if h.stale_system is None and h.stale >= VARS_SYSTEM:
            self.stale = VARS_ALL  # an older process's 2 meant "everything"
        self._stale_system = set(h.stale_system or ())
        self.client_salt = h.client_salt
        if h.last_answer:
            self.last_answer = h.last_answer
        if h.idle_wait_timeout:  # a move's idle clock, still running
            self._keep_wait_timeout(h.idle_wait_timeout)
        self.replay_limit, self.txlog = h.replay_limit, h.txlog
        self._replay_bytes = sum(len(s) for s in h.replays.values())
        self._decompress = Decompressor() if h.compressed else None
        self.backend = self.server.router.adopted_backend(h.backend_addr)
        self.backend.connections += 1
        self.count_on(self.backend)
        self._counted = True  # accepted by the old process: its end counts here
        self._opened = _monotonic() - max(0.0, time.time() - h.started)
        deprecate_eof = bool(h.backend_caps & Capability.DEPRECATE_EOF)
        self.tracker = ResponseTracker(deprecate_eof, self._response_done, h.status)
        self.backend_leg, self.bt = leg, leg.transport
        self.bound_writes(self.bt)
        self.set_backend_keepalive(leg, bool(self.backend.health))
        leg.attach(self)  # type: ignore[arg-type]  # Session is the Owner
        if h.pending:  # a command that arrived as the old process let go
            self._cbuf += h.pending
            asyncio.get_running_loop().call_soon(self._drain_client)

    def staying_view(self) -> tuple[int, str, str, str, str]:
        return (self.id, self.user, self.peer, self.backend.addr if self.backend else "",
                self.at_handover_point())

    def handover_sockets(self) -> list[int]:
        """The client's and the backend's socket descriptors, in that order."""
        assert self.bt is not None
        return [self.client.get_extra_info("socket").fileno(),
                self.bt.get_extra_info("socket").fileno()]

    def hold_for_handover(self, hold: bool) -> None:
        """Nothing read from either peer (nor any move begun) while the session travels."""
        if hold:
            self.hold_input("handover")
            self.pause_backend_reading(True)
        else:
            self.pause_backend_reading(False)
            self.release_input("handover")

    def handed_over(self) -> None:
        """Another process has taken this session: let go of it without a word to either
        peer (closing this process's descriptors leaves the connections open)."""
        self.leave_direct()  # (done at hold_for_handover: a handed-over socket must not stay)
        self.phase = CLOSED
        if self.backend is not None:
            self.backend.connections -= 1
        if self.backend_leg is not None:
            self.backend_leg.detach()
            self.backend_leg.close(quit_first=False)
        self.client.close()
        self.server.session_closed(self)  # type: ignore[arg-type]  # (self is a Session)
        log.info("session %d handed over to the new process", self.id)
