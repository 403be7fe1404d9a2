"""Drives one client session: the two sockets, the login, then the command phase's hot path.

Theory of operation
-------------------
A session owns a client leg and, once routed, a backend leg (both asyncio.Protocol). During login
every packet is read whole and given to `session.login.Login`, whose actions this driver carries
out. After login the hot path takes over:
- client to backend: a chunk that is exactly one command packet of a plain command is forwarded
  as it is; everything else (packets split across chunks, pipelined commands, statements that
  change tracked state, statement commands after a move, KILL, COM_CHANGE_USER, COM_QUIT, LOCAL
  INFILE data, commands the proxy refuses) is cut into packets and handled one by one
  (net/commands.py).
- backend to client: every chunk is forwarded whole and fed to the ResponseTracker, which says
  when each response ends and what the server status is. Each response's token says what to
  record once it succeeded (a prepared statement, a temporary table, a cursor...).
Each leg pausing its writes pauses reads on the other (paired flow control, net/flow.py).

The client's socket is a ClientLeg (net/client_leg.py), which starts the session. The rest of
the session is in parts mixed into Session, each a module with its own theory of operation that
declares what it uses of the session: who the client is (net/client_origin.py), the command
phase's slow path (net/commands.py), flow control and the session's end (net/flow.py), the login
(net/login_phase.py; net/login_route.py for the way to a backend, net/kept.py for the backend
connections kept for the next one), what is recorded of commands (net/records.py), statements
that name connection ids (net/ids.py), COM_CHANGE_USER (net/change_user.py), moves
(net/moves.py), what a rebuild needs, kept as the session runs (net/checkpoints.py), the rebuild
after a backend is lost (net/recovery.py), transaction replay (net/replay.py), a handover to
another process (net/session_handover.py) and reading the sockets directly (net/direct.py).

The commonest case of both directions, a plain command and then its whole answer in one chunk
each, is compiled (net/_hotpath.c): the event loop hands each chunk to a `Feed` (the client
leg's and the backend leg's data_received), which either does all that `client_data` or
`backend_data` would do for that chunk, or nothing and calls them with it. The code below
stays the reference and takes every other case; it runs alone where the module was not built.

A session that the compiled path has served for a while goes further when nothing else is going
on: the event loop calls the compiled path straight from its two sockets (net/direct.py).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from bisect import bisect_left
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from tiproxy.client.leg import BackendLeg
from tiproxy.net.change_user import ChangeUser
from tiproxy.net.client_origin import ClientOrigin
from tiproxy.net.commands import CommandPhase
from tiproxy.net.direct import DirectReading, configure_compiled_path
from tiproxy.net.flow import SessionFlow
from tiproxy.net.handover import Departure, SessionHandover
from tiproxy.net.ids import ConnectionIds
from tiproxy.net.kept import KeptConnections
from tiproxy.net.login_phase import COMMAND, LOGIN, LOGIN_TIMEOUT, SessionLogin
from tiproxy.net.login_route import LoginRoute
from tiproxy.net.records import CommandRecords
from tiproxy.net.replay import TransactionReplay
from tiproxy.net.session_capture import SessionCapture
from tiproxy.net.session_handover import SessionHandoverPart
from tiproxy.protocol.codec import U32
from tiproxy.protocol.compress import Decompressor
from tiproxy.protocol.constants import ER_UNKNOWN_COM_ERROR, MAX_PAYLOAD, Command
from tiproxy.protocol.errors import ProtocolError
from tiproxy.protocol.packets import HandshakeResponse, build_err, frame
from tiproxy.protocol.responses import AUTH, EXPECT_BY_COMMAND, Expect
from tiproxy.protocol.tracker import ResponseTracker
from tiproxy.session.connid import ResultRewriter
from tiproxy.session.state import SessionState
from tiproxy.session.statements import (
    COMPOUND_FIRST_BYTES,
    COMPOUND_START,
    LETTERS,
    STATE_FIRST_BYTES,
    STATE_PREFIXES,
)
from tiproxy.views.counters import QUERY_BUCKETS, SINCE_CREATION_BUCKETS, BackendCounts, Histogram

try:
    from tiproxy.net import _hotpath
except ImportError:  # pragma: no cover - built by setup.py; the Python path does the same
    _hotpath = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from tiproxy.balance.router import Backend
    from tiproxy.net.server import ProxyServer
    from tiproxy.traffic.sink import CaptureSink

# Commands that may go to the backend untouched on the fast path, with the response they expect.
# The statement commands are here too: the fast path takes them only while statement ids need
# no translation and nothing about them has to be recorded.
_FAST: dict[int, Expect] = {
    cmd: kind
    for cmd, kind in EXPECT_BY_COMMAND.items()
    if cmd not in (Command.QUIT, Command.PROCESS_KILL, Command.CHANGE_USER,
                   Command.STMT_PREPARE, Command.STMT_CLOSE,
                   Command.STMT_SEND_LONG_DATA, Command.STMT_FETCH, Command.RESET_CONNECTION,
                   Command.STMT_BULK_EXECUTE, Command.INIT_DB, Command.SET_OPTION)
}
_unpack_u32 = U32.unpack_from
_monotonic = time.monotonic

# The compiled per-query path (net/_hotpath.c), if on: configured below, after Session
# (net/direct.py's configure_compiled_path).
_fast_command: Callable[[Session, bytes], bool] | None = None
_fast_response: Callable[[Session, bytes], bool] | None = None
_QUERY = int(Command.QUERY)
_EXECUTE = int(Command.STMT_EXECUTE)
_RESET_STMT = int(Command.STMT_RESET)

# Where an unrouted session's traffic would count: nowhere (nothing is relayed before login).
_UNROUTED = BackendCounts()
_UNROUTED_AGES = Histogram(SINCE_CREATION_BUCKETS)


class Session(DirectReading, CommandPhase, SessionFlow, CommandRecords, ConnectionIds,
              ChangeUser, SessionHandoverPart, KeptConnections, TransactionReplay, LoginRoute,
              SessionLogin, ClientOrigin):
    """One client session; see the module docstring."""

    # The metrics (views/counters.py), set at login and when the session moves: the backend's
    # counters, whether that backend is in another location, and the data plane's histogram of
    # the session's age at each command.
    _traffic: BackendCounts = _UNROUTED
    _cross = False
    _ages: Histogram = _UNROUTED_AGES
    _counted = False  # accepted: its end counts in tiproxy_server_disconnection_total
    _early_seconds = 0.0  # how long the early backend connection took (the login waited)

    def __init__(self, server: ProxyServer, transport: asyncio.Transport,
                 adopted: tuple[SessionHandover, BackendLeg] | None = None) -> None:
        super().__init__()
        self.server = server
        self.client = transport
        self.id = server.new_session_id() if adopted is None else adopted[0].id
        self._origin_fields(server, transport)  # peer, PROXY protocol: net/client_origin.py
        self.phase = LOGIN
        self.backend: Backend | None = None
        self.backend_leg: BackendLeg | None = None
        self.bt: asyncio.Transport | None = None  # the backend transport, once attached
        self.backend_connection_id = 0
        self.backend_caps = 0
        self.client_caps = 0
        self.mariadb_caps = 0  # MariaDB's extended capabilities, the same on both legs
        self._multi = False  # the client may send several statements in one COM_QUERY
        self.dialect = "mysql"
        self.user = ""
        self.login_response: HandshakeResponse | None = None
        self.credential: bytes | None = None  # SHA1(password): secret, never logged
        self.state = SessionState()
        self.tracker: ResponseTracker | None = None
        # What the event loop calls with each chunk of an attached backend leg (client/leg.py
        # installs it): the compiled path, else backend_data. None without the compiled path.
        self.backend_feed = (None if _fast_response is None else
                             _hotpath.Feed(_fast_response, self, self.backend_data))
        self.started = time.time()
        self._login_fields()
        self._cbuf = bytearray()  # client bytes not yet handled (partial or held packets)
        self._ccont = False  # the last client packet was 16 MiB: the next one continues it
        self._held: set[str] = set()  # why client commands wait (earlier responses, a move)
        self._intercept: bytearray | None = None  # a response kept back to be rewritten
        self._rewriter: ResultRewriter | None = None  # a response rewritten as it streams
        self._pause_reasons: set[str] = set()
        self._decompress: Decompressor | None = None
        self._zseq = 0
        self._opened = _monotonic()
        # Commands whose responses have not ended, for their durations: (command byte, when
        # it came), in order. A list: it is empty or short (pipelines).
        self._sent: list[tuple[int, float]] = []
        self._capture: SessionCapture | None = None  # while a traffic capture runs
        # COM_STMT_PREPAREs sent and not answered, and an execute of "the one prepared last"
        # sent behind them (execute_direct): its types are the new statement's first ones.
        self._prepares_sent = 0
        self._direct_execute: bytes | None = None
        self.leaving: Departure | None = None  # an upgrade's: to the new process, when safe
        self.client_tls = False
        self.backend_tls = False  # kept when the session moves: the target must offer TLS
        self._task: asyncio.Task[None] | None = None
        server.session_opened(self)  # keep-alive: inherited from the listening socket
        self.keepalive_unhealthy = False  # which backend keep-alive the backend socket has
        if adopted is not None:
            self._adopt(*adopted)
            return
        if not self._admitted():
            return
        server.logging_in[self] = self._opened + LOGIN_TIMEOUT  # (server.py cuts it off then)
        if not self._greet_now():
            self._task = asyncio.get_running_loop().create_task(self._greet())

    def _admitted(self) -> bool:
        """Not refused at once: counted in tiproxy_server_create_connection_total."""
        refusal = self.server.refusal()
        if refusal is not None:
            self._refuse_at_once(*refusal)
            return False
        self.server.metrics.created += 1
        self._counted = True
        return True

    def follow_capture(self, sink: CaptureSink | None, fresh: bool = False) -> None:
        """A traffic capture starts (its sink in this process) or ends (None): see
        net/session_capture.py. `fresh`: the session logged in during the capture."""
        self._capture = SessionCapture(sink, self, fresh) if sink is not None else None

    # -- command phase: client to backend ---------------------------------------------------

    def client_data(self, data: bytes) -> None:
        if self.phase != COMMAND:
            if self.phase == LOGIN:
                self._login_client_data(data)
            return
        if self._decompress is not None:
            try:
                data = self._decompress.feed(data)
            except ProtocolError as e:
                self._protocol_error(e)
                return
            self._zseq = (self._decompress.last_seq + 1) & 0xFF
            if not data:
                return
        tracker = self.tracker
        assert tracker is not None
        if not self._cbuf and not self._held and not self._ccont and not tracker.local_infile \
                and self._move is None and not self.stale and not self.lost_transaction \
                and self.leaving is None:
            n = len(data)
            if n > 5:
                header = _unpack_u32(data, 0)[0]
                # One whole packet, sequence id 0: a command on its own. It goes untouched
                # when nothing about it needs recording (statements.py says why that is cheap).
                if header + 4 == n and n - 4 < MAX_PAYLOAD:
                    cmd = data[4]
                    if cmd == _QUERY:
                        first = data[5]
                        fast = (not self.state.table_locks
                                and (first not in STATE_FIRST_BYTES or (
                                    first in LETTERS
                                    and data[5:9].upper() not in STATE_PREFIXES))
                                and b"@" not in data and not (self._multi and b";" in data)
                                and not (first in COMPOUND_FIRST_BYTES
                                         and COMPOUND_START.match(data, 5)))
                        if fast:  # named locks and connection ids, in any letter case
                            low = data.lower()
                            fast = (b"_lock" not in low and b"ection_id" not in low
                                    and b"ocesslist" not in low)
                    elif cmd == _EXECUTE:
                        try:
                            fast = not self.state.to_client and self._execute_is_plain(data)
                        except ProtocolError as e:  # too short for what it must hold
                            self._protocol_error(e)
                            return
                    elif cmd == _RESET_STMT:  # (mysql-connector sends one before each execute)
                        fast = not self.state.to_client and self._reset_is_plain(data)
                    else:
                        fast = cmd in _FAST
                    if fast and (self._capture is None or self._capture.take(data)):
                        self.inflight = data if tracker.idle else None
                        self.last_command = data
                        self.bt.write(data)  # type: ignore[union-attr]
                        traffic = self._traffic
                        traffic.out_bytes += n
                        traffic.out_packets += 1
                        if self._cross:
                            self.server.metrics.cross_location_bytes += n
                        self._sent.append((cmd, _monotonic()))
                        tracker.expect(_FAST[cmd], cmd)
                        return
        self._cbuf += data
        self._drain_client()

    def _to_backend(self, packet: bytes) -> None:
        """One client packet to the backend, counted (the fast path does the same inline)."""
        assert self.bt is not None
        self.bt.write(packet)
        traffic = self._traffic
        traffic.out_bytes += len(packet)
        traffic.out_packets += 1
        if self._cross:
            self.server.metrics.cross_location_bytes += len(packet)

    def _to_client(self, data: bytes) -> None:
        """Backend bytes through the response rewriter, while there is one."""
        rewriter = self._rewriter
        if rewriter is not None:
            data = rewriter.feed(data)
            if rewriter.done:
                self._rewriter = None
        if data:
            self.send_client(data)

    def run_task(self, coro: Coroutine[Any, Any, None]) -> None:
        """The session's one task of the moment (a KILL's lookup or statement); cancelled
        when the session closes."""
        self._task = asyncio.get_running_loop().create_task(coro)

    def reply_error(self, code: int, state: str, message: str) -> None:
        self.send_client(frame(build_err(code, state, message), 1))

    # -- command phase: backend to client ---------------------------------------------------

    def backend_data(self, data: bytes) -> None:
        if self.phase != COMMAND:
            return
        inflight = self.inflight
        if inflight is not None:  # the first bytes of its answer: never sent again
            self.inflight = None
            if data[4:5] == b"\xff" and self._kept_back(data, inflight):
                return
        if self.replay_limit:
            self.answer_crc = zlib.crc32(data, self.answer_crc)
        tracker = self.tracker
        assert tracker is not None
        if tracker.phase == AUTH:
            data = self._watch_auth_switch(data)
        if self._intercept is not None:
            self._intercept += data
        elif self.held_answer is not None:
            self.keep_answer(data)
        elif self._rewriter is not None:
            self._to_client(data)
        elif self._decompress is None:
            self.client.write(data)
        else:
            self.send_client(data)
        traffic = self._traffic
        traffic.in_bytes += len(data)
        if self._cross:
            self.server.metrics.cross_location_bytes += len(data)
        if self._capture is not None:
            self._capture.response(data)
        try:
            tracker.feed(data)
        except ProtocolError as e:
            self._protocol_error(e)
            return
        traffic.in_packets += tracker.packets
        tracker.packets = 0

    def _kept_back(self, data: bytes, packet: bytes) -> bool:
        """An error answering `packet` that the client need not see: a deadlock in a
        recorded transaction (net/replay.py), a Galera node not ready (recovery.py)."""
        if self.txlog is not None and self.replay_on_error(data, packet):
            return True
        return self.backend is not None and self.backend.galera \
            and self.wsrep_not_ready(data, packet)

    def _response_done(self, token: Any, status: int, failed: bool) -> None:
        sent = self._sent  # Histogram.observe, inlined: once per command
        if sent:
            cmd, started = sent.pop(0)
            self.last_answer = now = _monotonic()
            seconds = now - started
            times = self._traffic.commands[cmd]
            times.counts[bisect_left(QUERY_BUCKETS, seconds)] += 1
            times.total += seconds
            age = started - self._opened
            ages = self._ages
            ages.counts[bisect_left(SINCE_CREATION_BUCKETS, age)] += 1
            ages.total += age
        if self.replay_limit:
            self.track_transaction(token, status)
        if token.__class__ is not int:
            self._record(token, status, failed)
            if self.held_answer is not None:
                self.answer_complete()  # checkpoints.py: its variables are read, then it goes
        if self._capture is not None:
            self._capture.done(status, failed)
        if failed and self.backend is not None and self.backend.galera \
                and self.tracker is not None and self.tracker.error == ER_UNKNOWN_COM_ERROR:
            self.server.doubt_backend(self.backend, "a session got 1047 (WSREP not ready)")
        if (self._held or self._move is not None) and self.tracker is not None \
                and self.tracker.idle:
            asyncio.get_running_loop().call_soon(self._idle_again)




def compiled_client_feed(session: Session) -> Callable[[bytes], None] | None:
    """What the event loop should call with each chunk of the session's client socket: the
    compiled path (its fallback, client_data), or None where it is not built."""
    if _fast_command is None:
        return None
    return _hotpath.Feed(_fast_command, session, session.client_data)


_compiled = configure_compiled_path(Session, _FAST)
if _compiled is not None:
    _fast_command, _fast_response = _compiled
