"""Drives one client session: the two sockets, the login, then the command phase's hot path.

Theory of operation
-------------------
A session owns a client leg and, once routed, a backend leg (both asyncio.Protocol). During login
every packet is read whole and given to `session.login.Login`, whose actions this driver carries
out. After login the hot path takes over:
- client to backend: a chunk that is exactly one command packet of a plain command is forwarded
  as it is; everything else (packets split across chunks, pipelined commands, statements that
  change tracked state, statement commands after a move, KILL, COM_CHANGE_USER, COM_QUIT, LOCAL
  INFILE data, commands the proxy refuses) is cut into packets and handled one by one. A
  command the proxy answers itself waits until the backend's earlier responses are complete,
  so its reply never lands inside another response.
- backend to client: every chunk is forwarded whole and fed to the ResponseTracker, which says
  when each response ends and what the server status is. Each response's token says what to
  record once it succeeded (a prepared statement, a temporary table, a cursor...).
Each leg pausing its writes pauses reads on the other (paired flow control).

The rest of the session is in parts mixed into Session, each a module with its own theory of
operation that declares what it uses of the session: the login (net/login_phase.py, and
net/kept.py for the backend connections kept for the next one), what is recorded of commands
(net/records.py), statements that name connection ids (net/ids.py), COM_CHANGE_USER
(net/change_user.py), moves and recovery after a backend is lost (net/moves.py,
net/recovery.py), transaction replay (net/replay.py), a handover to another process
(net/session_handover.py) and reading the sockets directly (net/direct.py).

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
import inspect
import logging
import time
import zlib
from bisect import bisect_left
from collections.abc import Callable, Coroutine
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from tiproxy.client.leg import BackendLeg
from tiproxy.net.change_user import ChangeUser
from tiproxy.net.direct import COMPILED_OFF, DirectReading
from tiproxy.net.handover import Departure, SessionHandover
from tiproxy.net.ids import CURSOR_TYPES, ConnectionIds
from tiproxy.net.kept import KeptConnections
from tiproxy.net.kill import handle_kill, handle_kill_expression
from tiproxy.net.login_phase import (
    CLOSED,
    COMMAND,
    LOGIN,
    LOGIN_TIMEOUT,
    SessionLogin,
)
from tiproxy.net.records import CommandRecords
from tiproxy.net.replay import TransactionReplay
from tiproxy.net.session_capture import SessionCapture
from tiproxy.net.session_handover import SessionHandoverPart
from tiproxy.protocol import tracker as tracker_phases
from tiproxy.protocol.codec import U32
from tiproxy.protocol.compress import Decompressor, compress_frames
from tiproxy.protocol.constants import (
    ER_UNKNOWN_COM_ERROR,
    MAX_PAYLOAD,
    Command,
    ServerStatus,
)
from tiproxy.protocol.errors import ProtocolError
from tiproxy.protocol.packets import (
    HandshakeResponse,
    build_err,
    frame,
)
from tiproxy.protocol.tracker import (
    AUTH,
    EXPECT_BY_COMMAND,
    FIRST_STEP,
    Expect,
    ResponseTracker,
)
from tiproxy.session.commands import (
    MAYBE_KILL_FIRST_BYTES,
    is_unmapped_kill,
    parse_kill_query,
    parse_process_kill,
)
from tiproxy.session.connid import ResultRewriter
from tiproxy.session.prepared import (
    LAST_PREPARED_ID,
    execute_types,
    packet_stmt_id,
)
from tiproxy.session.state import PreparedStatement, SessionState
from tiproxy.session.statements import (
    COMPOUND_FIRST_BYTES,
    COMPOUND_START,
    LETTERS,
    STATE_FIRST_BYTES,
    STATE_PREFIXES,
    reads_diagnostics,
    user_variable_names,
)
from tiproxy.views import counters
from tiproxy.views.counters import QUERY_BUCKETS, SINCE_CREATION_BUCKETS, BackendCounts, Histogram

try:
    from tiproxy.net import _hotpath
except ImportError:  # pragma: no cover - built by setup.py; the Python path does the same
    _hotpath = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from tiproxy.balance.router import Backend
    from tiproxy.net.server import ProxyServer
    from tiproxy.traffic.sink import CaptureSink

log = logging.getLogger("tiproxy.session")

ER_UNKNOWN_ERROR = 1105

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
_STMT_COMMANDS = frozenset((Command.STMT_EXECUTE, Command.STMT_FETCH, Command.STMT_CLOSE,
                            Command.STMT_RESET, Command.STMT_SEND_LONG_DATA,
                            Command.STMT_BULK_EXECUTE))
# Replication and other commands whose responses never end or that the proxy cannot relay.
_REFUSED = frozenset(
    (Command.BINLOG_DUMP, Command.BINLOG_DUMP_GTID, Command.TABLE_DUMP,
     Command.REGISTER_SLAVE, Command.CONNECT_OUT)
)
_unpack_u32 = U32.unpack_from
_monotonic = time.monotonic

# The compiled per-query path (net/_hotpath.c), if built: configured below, after Session.
_fast_command: Callable[[Session, bytes], bool] | None = None
_fast_response: Callable[[Session, bytes], bool] | None = None
_QUERY = int(Command.QUERY)
_EXECUTE = int(Command.STMT_EXECUTE)
_RESET_STMT = int(Command.STMT_RESET)
_IN_TRANS = int(ServerStatus.IN_TRANS)

# Where an unrouted session's traffic would count: nowhere (nothing is relayed before login).
_UNROUTED = BackendCounts()
_UNROUTED_AGES = Histogram(SINCE_CREATION_BUCKETS)


class ClientLeg(asyncio.Protocol):
    """The client's socket: hands everything to its Session."""

    def __init__(self, server: ProxyServer,
                 adopted: tuple[SessionHandover, BackendLeg] | None = None,
                 passed: bool = False) -> None:
        self.server = server
        self.session: Session | None = None
        self._adopted = adopted  # a session another process handed over (net/handover.py)
        self._passed = passed  # accepted by another worker, which passed it here

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._adopted is None and not self._passed \
                and self.server.hand_off(transport):
            transport.close()  # (the connection lives on in the worker it went to)
            return
        session = self.session = Session(self.server, cast(asyncio.Transport, transport),
                                         self._adopted)
        session.bound_writes(transport)
        if _fast_command is not None:
            # The event loop calls the compiled path itself; the method below is its fallback.
            self.data_received = _hotpath.Feed(  # type: ignore[method-assign,assignment]
                _fast_command, session, session.client_data)
            transport.set_protocol(self)  # (uvloop keeps the data_received it was given)

    def data_received(self, data: bytes) -> None:
        self.session.client_data(data)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is not None:
            self.session.client_lost(exc)

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_backend_reading(True)

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.pause_backend_reading(False)


class Session(DirectReading, CommandRecords, ConnectionIds, ChangeUser, SessionHandoverPart,
              KeptConnections, TransactionReplay, SessionLogin):
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
        self.peer = _peer(transport)
        # PROXY protocol, if on when the client connected: the bytes of the client's header
        # until it is judged, then None; and the (client, proxy) addresses that the backends'
        # headers name (the socket's, or the ones the client's header gave). None: off.
        self._pp, self._origin = _proxy_protocol_start(server, transport)
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
            and stmt.effects is None and not stmt.renames and stmt.variables is None

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
            handle_kill(self, parse_process_kill(packet[4:]), query_only=False, prefix=None)
            return True
        elif cmd in _STMT_COMMANDS:
            if cmd == _EXECUTE and self._renamed_execute(packet) is False:
                return False
            result = self._statement_command(packet, cmd)
            if result is None:
                return True
            packet, token = result
            if cmd == _EXECUTE and length > 5 and packet[9] & CURSOR_TYPES:
                kind = Expect.CURSOR  # only a cursor asked for ends the response at the EOF
        elif cmd == Command.STMT_PREPARE:
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

    def _before_command(self, packet: bytes, cmd: int, tracker: ResponseTracker) -> bool | None:
        """What comes before a command runs: _command's answer, or None to run it."""
        if cmd == Command.QUIT:
            self.close("client quit", quiet=True, kind=counters.QUIT_OK)
            return True
        if self.lost_transaction and self.transaction_lost(packet):
            return True
        if self.leaving is not None and tracker.idle and not self.at_handover_point() \
                and self.leaving.now(self):
            return False  # to the new process, with this command unread (net/handover.py)
        if self._move is not None and not self._moving \
                and not reads_diagnostics(packet, self._executed_sql(packet, cmd)) \
                and self.try_move(at_command=True):
            return False  # the move first; the command then runs on the new backend
        if self.stale and tracker.idle and self.checkpoint_due(packet, cmd):
            return False  # the checkpoint first (session/rebuild.py)
        return None

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
                handle_kill_expression(self, sql)
            else:
                handle_kill(self, kill.connection_id, kill.query_only, kill.prefix)
            return True
        if self._begin_shortcut(sql):
            return False  # the move runs first; the BEGIN follows on the new backend
        if b"@" in sql:
            self.state.note_user_vars(user_variable_names(sql))
        return None

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
                self.answer_complete()  # recovery.py: its variables are read, then it goes
        if self._capture is not None:
            self._capture.done(status, failed)
        if failed and self.backend is not None and self.backend.galera \
                and self.tracker is not None and self.tracker.error == ER_UNKNOWN_COM_ERROR:
            self.server.doubt_backend(self.backend, "a session got 1047 (WSREP not ready)")
        if (self._held or self._move is not None) and self.tracker is not None \
                and self.tracker.idle:
            asyncio.get_running_loop().call_soon(self._idle_again)

    def _idle_again(self) -> None:
        """The backend finished every response: held commands go on, or a move can start."""
        if self.phase != COMMAND:
            return
        if self._move is not None and self.try_move():
            return
        self.release_input("idle")

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
        self.server.logging_in.pop(self, None)
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
        self.server.session_closed(self)
        # A client that ends its own session is routine (debug); the proxy ending one is not.
        (log.debug if quiet else log.warning)("session %d closed: %s", self.id, reason)


_RECORDED: dict[int, str] = {Command.RESET_CONNECTION: "reset",
                             Command.SET_OPTION: "set_option", Command.INIT_DB: "init_db"}

# Sessions whose end leaves their backend connection fit for the next login (net/pool.py).
_KEEPABLE = frozenset((counters.QUIT_OK, counters.CLIENT_NETWORK))


def _proxy_protocol_start(server: ProxyServer, transport: asyncio.Transport) -> tuple[
        bytearray | None, tuple[tuple[str, int], tuple[str, int]] | None]:
    """A new session's PROXY protocol state (Session._pp, Session._origin)."""
    if not server.config().proxy.proxy_protocol:
        return None, None
    return bytearray(), _addresses(transport)


def _addresses(transport: asyncio.Transport) -> tuple[tuple[str, int], tuple[str, int]] | None:
    """(peer, local) of a TCP connection; None for another kind of socket."""
    peer, local = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
    if not (isinstance(peer, tuple) and isinstance(local, tuple)):
        return None
    return (str(peer[0]), int(peer[1])), (str(local[0]), int(local[1]))


def _peer(transport: asyncio.Transport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _reason(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _configure_compiled_path(hotpath: ModuleType) -> None:
    """Hand net/_hotpath.c what it reads."""
    # It reads these from the objects' own dicts, which a descriptor would have overridden.
    classes = {"Session": Session, "SessionState": SessionState,
               "PreparedStatement": PreparedStatement}
    described = [f"{name}.{field}" for name, fields in hotpath.DICT_FIELDS.items()
                 for field in fields
                 if hasattr(type(inspect.getattr_static(classes[name], field, None)), "__set__")]
    if described:
        raise RuntimeError(f"net/_hotpath.c reads attributes that are descriptors: "
                           f"{', '.join(described)}")
    if hotpath.TRACKER_PHASES != (tracker_phases.IDLE, tracker_phases.FIRST,
                                  tracker_phases.SINGLE):
        raise RuntimeError("net/_hotpath.c's tracker phases are not protocol/tracker.py's")
    hotpath.configure(
        COMMAND,
        {cmd: (kind, *FIRST_STEP[kind]) for cmd, kind in _FAST.items()
         if kind is not Expect.NOTHING},
        STATE_FIRST_BYTES, LETTERS, STATE_PREFIXES, COMPOUND_FIRST_BYTES, COMPOUND_START.match,
        ResponseTracker, BackendCounts, Histogram,
    )


if _hotpath is not None and not COMPILED_OFF:
    _configure_compiled_path(_hotpath)
    _fast_command, _fast_response = _hotpath.command, _hotpath.response
