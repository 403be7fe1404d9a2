"""The session's flow control and its end.

Flow control. Each leg pausing its writes pauses reads on the other (paired flow control), and
client commands are held (read no further) for as long as any reason to wait stands: earlier
responses to finish before a command the proxy answers itself, a move, a handover. A transport
buffers at most `conn-buffer-size` for a peer that reads slowly.

The end. Whatever ends a session (the client's COM_QUIT or its socket, the proxy, a backend
lost with no way to rebuild it) goes through close(), which counts it once by its kind
(views/counters.py), hands an idle backend connection to the pool for the next login when it is
fit for one (net/pool.py), and otherwise ends it with a COM_QUIT so that the server logs a
clean exit. One end is the server's own, carried across moves: a session idle for its
wait_timeout since its last answer is closed, though its new backend counts from the move.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from tiproxy.net.login_phase import CLOSED, COMMAND, LOGIN
from tiproxy.protocol.compress import Decompressor, compress_frames
from tiproxy.protocol.constants import ServerStatus
from tiproxy.protocol.errors import ProtocolError
from tiproxy.views import counters

if TYPE_CHECKING:
    from tiproxy.balance.router import Backend
    from tiproxy.client.leg import BackendLeg
    from tiproxy.net.moves import MoveRequest
    from tiproxy.net.pool import PoolLogin
    from tiproxy.net.server import ProxyServer
    from tiproxy.net.session_capture import SessionCapture
    from tiproxy.protocol.packets import Greeting
    from tiproxy.protocol.tracker import ResponseTracker
    from tiproxy.views.counters import BackendCounts

log = logging.getLogger("tiproxy.session")

_IN_TRANS = int(ServerStatus.IN_TRANS)
_monotonic = time.monotonic

# Sessions whose end leaves their backend connection fit for the next login (net/pool.py).
_KEEPABLE = frozenset((counters.QUIT_OK, counters.CLIENT_NETWORK))


class SessionFlow:
    """Mixed into Session (net/relay.py), whose attributes it uses."""

    # Provided by Session and its other mixins.
    server: ProxyServer
    id: int
    phase: int
    client: asyncio.Transport
    bt: asyncio.Transport | None
    backend: Backend | None
    backend_leg: BackendLeg | None
    tracker: ResponseTracker | None
    _traffic: BackendCounts
    _counted: bool
    _opened: float
    _cbuf: bytearray
    _held: set[str]
    _pause_reasons: set[str]
    _decompress: Decompressor | None
    _zseq: int
    _capture: SessionCapture | None
    _move: MoveRequest | None
    _pool_login: PoolLogin | None
    _task: asyncio.Task[None] | None
    _move_task: asyncio.Task[None] | None
    _soon: asyncio.TimerHandle | None
    _idle_timer: asyncio.TimerHandle | None
    _idle_wait: float
    _moving: bool
    last_answer: float

    if TYPE_CHECKING:  # provided by Session and its other mixins: for the type checker only
        def _drain_client(self) -> None: ...
        def leave_direct(self) -> None: ...
        def try_move(self, at_command: bool = False) -> bool: ...
        def backend_gone(self, exc: Exception | None,
                         unanswered: bytes | None = None) -> None: ...
        def keep_backend(self) -> bool: ...
        def _take_early(self) -> tuple[Backend, BackendLeg, Greeting] | None: ...

    def _idle_again(self) -> None:
        """The backend finished every response: held commands go on, or a move can start."""
        if self.phase != COMMAND:
            return
        if self._move is not None and self.try_move():
            return
        self.release_input("idle")

    def _keep_wait_timeout(self, wait_timeout: float | None) -> None:
        """A server closes a connection idle for its wait_timeout, counted from its last answer;
        the new backend counts from the move. Until the client sends a command, the proxy
        keeps the old count: a session idle that long is closed as its server would have."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if wait_timeout:
            self._idle_wait = wait_timeout
            since = self.last_answer
            delay = max(since + wait_timeout - time.monotonic(), 0.0)
            self._idle_timer = asyncio.get_running_loop().call_later(
                delay, self._idle_too_long, since, wait_timeout)

    def _idle_too_long(self, since: float, wait_timeout: float) -> None:
        self._idle_timer = None
        tracker = self.tracker
        if self.phase != COMMAND or self._moving or self.last_answer != since or tracker is None \
                or not tracker.idle or self._cbuf:
            return  # it sent a command since: the backend counts from that one's answer
        self.close(f"idle for its wait_timeout ({wait_timeout:g}s) since its last answer, "
                   "counted across its moves: closed as its server would",
                   kind=counters.BACKEND_NETWORK)

    def hold_input(self, reason: str) -> None:
        """Client commands wait (they are read into the buffer no further)."""
        self._held.add(reason)
        self.pause_client_reading("held", True)

    def release_input(self, reason: str) -> None:
        self._held.discard(reason)
        if self.tracker is not None and self.tracker.idle:
            self._held.discard("idle")
        if self._held or self.phase != COMMAND:
            return
        self.pause_client_reading("held", False)
        self._drain_client()

    def send_client(self, data: bytes) -> None:
        if self._decompress is None:
            self.client.write(data)
            return
        frames, self._zseq = compress_frames(data, self._zseq)
        self.client.writelines(frames)

    # -- flow control and closing -----------------------------------------------------------

    def bound_writes(self, transport: asyncio.BaseTransport | None) -> None:
        """`conn-buffer-size` (TiProxy's): what the proxy holds for a peer that reads slowly.
        Past it the transport asks to pause (pause_writing), and the session stops reading the
        other leg until it drains to a quarter; so a session buffers about that much towards
        each peer, whatever the other side sends. (Reads go into the event loop's one shared
        buffer, so there is no per-connection read buffer to size.)"""
        if isinstance(transport, asyncio.WriteTransport):
            transport.set_write_buffer_limits(high=self.server.config().proxy.buffer_size)

    def pause_backend_reading(self, pause: bool) -> None:
        if self.bt is None:
            return
        self.leave_direct()
        if pause:
            self.bt.pause_reading()
        else:
            self.bt.resume_reading()

    def pause_client_reading(self, reason: str, pause: bool) -> None:
        self.leave_direct()
        if pause:
            if not self._pause_reasons:
                self.client.pause_reading()
            self._pause_reasons.add(reason)
        elif reason in self._pause_reasons:
            self._pause_reasons.discard(reason)
            if not self._pause_reasons and not self.client.is_closing():
                self.client.resume_reading()

    def between_transactions(self) -> bool:
        """Every response complete and no transaction open: closing now loses nothing."""
        tracker = self.tracker
        return tracker is not None and tracker.idle and not tracker.status & _IN_TRANS \
            and not self._cbuf

    def client_lost(self, exc: Exception | None) -> None:
        self.leave_direct()
        if self.phase != CLOSED:  # a socket error (keep-alive gave up, a reset) is worth a line
            self.close("client disconnected" + (f": {exc}" if exc else ""), quiet=exc is None,
                       kind=counters.CLIENT_NETWORK)

    def backend_lost(self, exc: Exception | None) -> None:
        self.leave_direct()
        if self.phase == COMMAND:
            self.backend_gone(exc)  # rebuilt elsewhere, or closed with the reason (recovery.py)
        elif self.phase == LOGIN:
            self.close(f"backend {self.backend.addr if self.backend else '?'} closed the "
                       "connection during the login", kind=counters.BACKEND_HANDSHAKE)

    def _count_end(self, kind: str) -> None:
        if not self._counted:
            return  # refused at once: counted as such, never accepted
        metrics = self.server.metrics
        metrics.disconnections[kind] += 1
        metrics.lifetimes.observe(_monotonic() - self._opened)
        tracker = self.tracker
        if tracker is not None and tracker.packets:  # a response cut short
            self._traffic.in_packets += tracker.packets
            tracker.packets = 0

    def _protocol_error(self, e: ProtocolError) -> None:
        self.close(f"protocol error from {e.origin.value}: {e}", kind=counters.MALFORMED)

    def close(self, reason: str, quiet: bool = False, kind: str = counters.PROXY_ERROR) -> None:
        """End the session; `kind` is what ended it (views/counters.py), for the metrics."""
        if self.phase == CLOSED:
            return
        self.leave_direct()
        was_established = self.phase == COMMAND
        self.phase = CLOSED
        self._count_end(kind)
        self.server.logging_in.pop(self, None)  # type: ignore[call-overload]
        if self._soon is not None:
            self._soon.cancel()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        early = self._take_early()
        if early is not None:
            early[1].abort()
        if self._capture is not None:
            self._capture.closed()
        leg = self.backend_leg
        idle = was_established and self.tracker is not None and self.tracker.idle
        # Kept for the next login (net/pool.py) before the tasks are cancelled: a cancelled
        # task is not done yet, and no task may be at work on a kept leg.
        kept = idle and self._pool_login is not None and kind in _KEEPABLE \
            and self.keep_backend()
        for task in (self._task, self._move_task):
            if task is not None and not task.done():
                task.cancel()
        if leg is not None and not kept:
            leg.close(quit_first=idle)  # COM_QUIT: the server logs a clean exit
        if self.backend is not None:
            self.backend.connections -= 1
        self.client.close()
        self.server.session_closed(self)  # type: ignore[arg-type]
        # A client that ends its own session is routine (debug); the proxy ending one is not.
        (log.debug if quiet else log.warning)("session %d closed: %s", self.id, reason)
