"""Drives one client session: the two sockets, the login, then the command phase's hot path.

Theory of operation
-------------------
A session owns a client leg and, once routed, a backend leg (both asyncio.Protocol). During login
every packet is read whole and given to `session.login.Login`, whose actions this driver carries
out. After login the hot path takes over:
- client to backend: a chunk that is exactly one command packet of a plain command is forwarded
  as it is; everything else (packets split across chunks, pipelined commands, KILL,
  COM_CHANGE_USER, COM_QUIT, LOCAL INFILE data, commands the proxy refuses) is cut into packets
  and handled one by one. A command the proxy answers itself waits until the backend's earlier
  responses are complete, so its reply never lands inside another response.
- backend to client: every chunk is forwarded whole and fed to the ResponseTracker, which says
  when each response ends and what the server status is.
Each leg pausing its writes pauses reads on the other (paired flow control).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from tiproxy.balance.router import Backend
from tiproxy.net.admin import AdminConnection
from tiproxy.protocol.codec import U32
from tiproxy.protocol.compress import Decompressor, compress_frames
from tiproxy.protocol.constants import (
    COMMAND_NAMES,
    ER_CON_COUNT_ERROR,
    ER_NO_SUCH_THREAD,
    ER_UNKNOWN_COM_ERROR,
    MAX_PAYLOAD,
    Capability,
    Command,
)
from tiproxy.protocol.errors import Origin, ProtocolError, SQLError
from tiproxy.protocol.framer import PacketSplitter
from tiproxy.protocol.packets import build_err, build_ok, frame, parse_greeting
from tiproxy.protocol.tracker import AUTH, EXPECT_BY_COMMAND, Expect, ResponseTracker
from tiproxy.session.commands import (
    MAYBE_KILL_FIRST_BYTES,
    build_process_kill,
    parse_kill_query,
    parse_process_kill,
    rewrite_change_user,
)
from tiproxy.session.login import (
    FORCE_SWITCH_PLUGIN,
    Action,
    Established,
    Login,
    Refused,
    Route,
    SendBackend,
    SendClient,
    StartClientTLS,
)

if TYPE_CHECKING:
    from tiproxy.net.server import ProxyServer

log = logging.getLogger("tiproxy.session")

ER_UNKNOWN_ERROR = 1105
ER_KILL_DENIED = 1095
LOGIN_PACKET_LIMIT = 1 << 20  # a handshake response with connect attributes is a few KiB
LOGIN_TIMEOUT = 30.0  # a client that does not finish logging in by then is cut off
CONNECT_TIMEOUT = 5.0

# Commands that go to the backend untouched on the fast path, with the response they expect.
_FAST: dict[int, Expect] = {
    cmd: kind
    for cmd, kind in EXPECT_BY_COMMAND.items()
    if cmd not in (Command.QUIT, Command.PROCESS_KILL, Command.CHANGE_USER)
}
# Replication and other commands whose responses never end or that the proxy cannot relay.
_REFUSED = frozenset(
    (Command.BINLOG_DUMP, Command.BINLOG_DUMP_GTID, Command.TABLE_DUMP,
     Command.REGISTER_SLAVE, Command.CONNECT_OUT)
)
_NAMES = [COMMAND_NAMES.get(i, f"Unknown{i:#04x}") for i in range(256)]
_unpack_u32 = U32.unpack_from

LOGIN, COMMAND, CLOSED = 0, 1, 2


class ClientLeg(asyncio.Protocol):
    """The client's socket: hands everything to its Session."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.session: Session | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.session = Session(self.server, cast(asyncio.Transport, transport))

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


class BackendLeg(asyncio.Protocol):
    """A backend's socket. Until the greeting arrives it only waits for it."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None
        self.greeting: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.splitter = PacketSplitter(LOGIN_PACKET_LIMIT, Origin.BACKEND)
        self.attached = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.attached:
            self.session.backend_data(data)
            return
        if self.greeting.done():
            self.splitter.keep(data)  # nothing is due before the login goes on; keep it anyway
            return
        try:
            for _, payload in self.splitter.feed(data):
                self.greeting.set_result(payload)
                break
        except ProtocolError as e:
            self.greeting.set_exception(e)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.greeting.done():
            self.greeting.set_exception(ConnectionError("backend closed before its greeting"))
        if self.attached:
            self.session.backend_lost(exc)

    def pause_writing(self) -> None:
        if self.attached:
            self.session.pause_client_reading("backend", True)

    def resume_writing(self) -> None:
        if self.attached:
            self.session.pause_client_reading("backend", False)


class Session:
    """One client session; see the module docstring."""

    def __init__(self, server: ProxyServer, transport: asyncio.Transport) -> None:
        self.server = server
        self.client = transport
        self.id = server.new_session_id()
        self.peer = _peer(transport)
        self.phase = LOGIN
        self.backend: Backend | None = None
        self.backend_leg: BackendLeg | None = None
        self.bt: asyncio.Transport | None = None  # the backend transport, once attached
        self.backend_connection_id = 0
        self.user = ""
        self.tracker: ResponseTracker | None = None
        self.login: Login | None = None
        self._splitter = PacketSplitter(LOGIN_PACKET_LIMIT, Origin.CLIENT)
        self._cbuf = bytearray()  # client bytes not yet handled (partial or held packets)
        self._ccont = False  # the last client packet was 16 MiB: the next one continues it
        self._held = False  # a command waits for the backend to finish earlier responses
        self._pause_reasons: set[str] = set()
        self._decompress: Decompressor | None = None
        self._zseq = 0
        self._counts: Counter[str] = Counter()
        self.client_caps = 0
        self._login_timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self.started = time.time()
        server.session_opened(self)
        if server.over_capacity():
            log.warning("session %d from %s refused: too many connections", self.id, self.peer)
            err = build_err(ER_CON_COUNT_ERROR, "08004", "Too many connections")
            self._send_client(frame(err, 0))
            self.close("too many connections", quiet=True)
            return
        loop = asyncio.get_running_loop()
        self._login_timer = loop.call_later(LOGIN_TIMEOUT, self._login_timed_out)
        self._task = loop.create_task(self._greet())

    # -- login ------------------------------------------------------------------------------

    async def _greet(self) -> None:
        router = self.server.router
        if router.template is None:
            await self._probe_template()
            if router.template is None:
                self._refuse_no_backend(0)
                return
        if self.phase == CLOSED:
            return
        self.login = Login(router.template, self.id, tls_available=False)
        self.client.write(self.login.start())

    async def _probe_template(self) -> None:
        """No backend has greeted the proxy yet: connect to one to learn what to greet with."""
        for backend in self.server.router.candidates():
            try:
                leg, payload = await self._open_backend(backend)
            except (OSError, TimeoutError, ProtocolError) as e:
                self.server.router.failed(backend, _reason(e))
                continue
            if leg.transport is not None:
                leg.transport.close()
            if payload[:1] != b"\xff":
                self.server.router.succeeded(backend, parse_greeting(payload))
                return

    async def _open_backend(self, backend: Backend) -> tuple[BackendLeg, bytes]:
        loop = asyncio.get_running_loop()
        leg = BackendLeg(self)
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: leg, backend.host, backend.port), CONNECT_TIMEOUT
            )
            payload = await asyncio.wait_for(asyncio.shield(leg.greeting), CONNECT_TIMEOUT)
        except BaseException:
            if leg.transport is not None:
                leg.transport.abort()
            raise
        return leg, payload

    def _login_client_data(self, data: bytes) -> None:
        login = self.login
        try:
            for seq, payload in self._splitter.feed(data):
                if login is None:
                    raise ProtocolError("client spoke before the greeting")
                self._run(login.client_packet(seq, payload))
                if self.phase != LOGIN:
                    break
        except ProtocolError as e:
            self._protocol_error(e)
            return
        if self.phase == COMMAND:
            rest = self._splitter.take_rest()
            if rest:
                self.client_data(rest)

    def _run(self, actions: Sequence[Action]) -> None:
        for action in actions:
            if isinstance(action, SendClient):
                self.client.write(action.data)
            elif isinstance(action, SendBackend):
                assert self.bt is not None
                self.bt.write(action.data)
            elif isinstance(action, Route):
                self.user = action.user
                self._task = asyncio.get_running_loop().create_task(self._route())
            elif isinstance(action, Established):
                self._established(action)
            elif isinstance(action, Refused):
                self.close(action.reason, quiet=True)
            elif isinstance(action, StartClientTLS):
                raise ProtocolError("TLS requested but not offered")

    async def _route(self) -> None:
        assert self.login is not None
        router = self.server.router
        err_seq = 2 + self.login._seq_shift
        for backend in router.candidates():
            if self.phase == CLOSED:
                return
            try:
                leg, payload = await self._open_backend(backend)
                actions = self.login.backend_greeting_received(payload)
            except (OSError, TimeoutError, ProtocolError) as e:
                router.failed(backend, _reason(e))
                if "leg" in locals() and leg.transport is not None:
                    leg.transport.abort()
                continue
            assert self.login.backend_greeting is not None and leg.transport is not None
            router.succeeded(backend, self.login.backend_greeting)
            if self.phase == CLOSED:
                leg.transport.abort()
                return
            self._attach(backend, leg)
            self._run(actions)
            return
        self._refuse_no_backend(err_seq)

    def _attach(self, backend: Backend, leg: BackendLeg) -> None:
        self.backend = backend
        self.backend_leg = leg
        self.bt = leg.transport
        backend.connections += 1
        leg.attached = True
        rest = leg.splitter.take_rest()
        if rest:
            self.backend_data(rest)

    def _refuse_no_backend(self, seq: int) -> None:
        msg = "TiProxy: no backend is available, try again later"
        self._send_client(frame(build_err(ER_UNKNOWN_ERROR, "HY000", msg), seq))
        self.close("no backend available")

    def _login_backend_data(self, data: bytes) -> None:
        assert self.backend_leg is not None and self.login is not None
        try:
            for seq, payload in self.backend_leg.splitter.feed(data):
                self._run(self.login.backend_packet(seq, payload))
                if self.phase != LOGIN:
                    break
        except ProtocolError as e:
            self._protocol_error(e)
            return
        if self.phase == COMMAND:
            rest = self.backend_leg.splitter.take_rest()
            if rest:
                self.backend_data(rest)

    def _established(self, est: Established) -> None:
        assert self.backend is not None
        self.phase = COMMAND
        if self._login_timer is not None:
            self._login_timer.cancel()
        self.backend_connection_id = est.backend_connection_id
        deprecate_eof = bool(est.backend_capabilities & Capability.DEPRECATE_EOF)
        self.tracker = ResponseTracker(deprecate_eof, self._response_done, est.status)
        self._counts = self.backend.query_counts
        if est.client_capabilities & Capability.COMPRESS:
            self._decompress = Decompressor()
        self.client_caps = est.client_capabilities
        log.info("session %d: %s@%s logged in on %s",
                 self.id, self.user, self.peer, self.backend.addr)

    def _login_timed_out(self) -> None:
        if self.phase == LOGIN:
            self.close(f"login not finished within {LOGIN_TIMEOUT:.0f}s")

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
        if not self._cbuf and not self._held and not self._ccont and not tracker.local_infile:
            n = len(data)
            if n > 5:
                header = _unpack_u32(data, 0)[0]
                # One whole packet, sequence id 0: a command on its own.
                if header + 4 == n and n - 4 < MAX_PAYLOAD:
                    cmd = data[4]
                    kind = _FAST.get(cmd)
                    if kind is not None and (cmd != 3 or data[5] not in MAYBE_KILL_FIRST_BYTES):
                        self.bt.write(data)  # type: ignore[union-attr]
                        self._counts[_NAMES[cmd]] += 1
                        tracker.expect(kind, cmd)
                        return
        self._cbuf += data
        self._drain_client()

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
                    self.bt.write(packet)
                elif tracker.local_infile:
                    self.bt.write(packet)
                    if length == 0:
                        tracker.local_infile = False  # the file is sent; OK or ERR comes next
                elif tracker.phase == AUTH and seq != 0:
                    self.bt.write(packet)
                elif seq != 0:
                    raise ProtocolError(f"packet with sequence id {seq} where a command was due")
                elif length == 0:
                    raise ProtocolError("empty command packet")
                elif not self._command(packet, length):
                    pos -= len(packet)  # it waits, with what follows, until the backend is idle
                    self._held = True
                    self.pause_client_reading("held", True)
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
        self._ccont = length == MAX_PAYLOAD
        kind = EXPECT_BY_COMMAND.get(cmd)
        if cmd == Command.QUIT:
            self.close("client quit", quiet=True)
            return True
        needs_idle = (
            kind is None
            or cmd in _REFUSED
            or cmd == Command.PROCESS_KILL
            or (cmd == Command.QUERY and length > 1 and packet[5] in MAYBE_KILL_FIRST_BYTES)
        )
        if needs_idle and not tracker.idle:
            self._ccont = False
            return False
        if kind is None or cmd in _REFUSED:
            self._reply_err(ER_UNKNOWN_COM_ERROR, "08S01",
                            f"TiProxy does not relay command 0x{cmd:02x}")
            return True
        if cmd == Command.PROCESS_KILL:
            self._kill(parse_process_kill(packet[4:]), query_only=False, sql=None)
            return True
        if cmd == Command.QUERY and needs_idle:
            req = parse_kill_query(packet[5:])
            if req is not None:
                self._kill(req.connection_id, req.query_only, req.prefix)
                return True
        if cmd == Command.CHANGE_USER:
            change = rewrite_change_user(packet[4:], self.client_caps, FORCE_SWITCH_PLUGIN)
            self.user = change.user.decode("utf-8", "replace")
            packet = frame(change.rewritten, 0)
        self.bt.write(packet)
        self._counts[_NAMES[cmd]] += 1
        tracker.expect(kind, cmd)
        return True

    def _kill(self, target_id: int, query_only: bool, sql: bytes | None) -> None:
        tracker = self.tracker
        assert tracker is not None and self.bt is not None
        target = self.server.sessions.get(target_id)
        if target is None or target.backend is None or target.phase != COMMAND:
            self._reply_err(ER_NO_SUCH_THREAD, "HY000", f"Unknown thread id: {target_id}")
            return
        if target.backend is not self.backend:
            self._kill_elsewhere(target, query_only)
            return
        if sql is None:
            packet = frame(build_process_kill(target.backend_connection_id), 0)
            kind = Expect.SINGLE
            cmd = Command.PROCESS_KILL
        else:
            packet = frame(b"\x03" + sql + str(target.backend_connection_id).encode(), 0)
            kind = Expect.RESULT
            cmd = Command.QUERY
        log.info("session %d: KILL %s%d (backend id %d)", self.id, "QUERY " if query_only else "",
                 target_id, target.backend_connection_id)
        self.bt.write(packet)
        tracker.expect(kind, cmd)

    def _kill_elsewhere(self, target: Session, query_only: bool) -> None:
        """KILL a session on another backend, with the proxy's own account there.

        Allowed, as MySQL allows it, to the session's own user; other users would need the
        server's privilege check, which the proxy cannot run for them on another backend.
        """
        security = self.server.config().security
        if target.user != self.user:
            self._reply_err(ER_KILL_DENIED, "HY000", f"You are not owner of thread {target.id}")
            return
        if not security.auth_sync_user:
            self._reply_err(
                ER_UNKNOWN_ERROR, "HY000",
                f"TiProxy: connection {target.id} is on another backend; KILL there needs "
                "[security] auth-sync-user",
            )
            return
        assert target.backend is not None
        self._held = True
        self.pause_client_reading("held", True)
        sql = f"KILL {'QUERY' if query_only else 'CONNECTION'} {target.backend_connection_id}"
        backend = target.backend
        log.info("session %d: %s (session %d) on %s", self.id, sql, target.id, backend.addr)

        async def run() -> None:
            try:
                conn = await AdminConnection.open(backend.host, backend.port,
                                                  security.auth_sync_user,
                                                  security.auth_sync_password)
                try:
                    await conn.query(sql)
                finally:
                    conn.close()
            except SQLError as e:
                self._reply_err(e.code, e.sqlstate, e.message)
            except (OSError, TimeoutError, ProtocolError) as e:
                self._reply_err(ER_UNKNOWN_ERROR, "HY000",
                                f"TiProxy: KILL on the other backend failed: {_reason(e)}")
            else:
                assert self.tracker is not None
                self._send_client(frame(build_ok(self.tracker.status), 1))
            self._release_held()

        self._task = asyncio.get_running_loop().create_task(run())

    def _reply_err(self, code: int, state: str, message: str) -> None:
        self._send_client(frame(build_err(code, state, message), 1))

    # -- command phase: backend to client ---------------------------------------------------

    def backend_data(self, data: bytes) -> None:
        if self.phase != COMMAND:
            if self.phase == LOGIN:
                self._login_backend_data(data)
            return
        if self._decompress is None:
            self.client.write(data)
        else:
            self._send_client(data)
        try:
            self.tracker.feed(data)  # type: ignore[union-attr]
        except ProtocolError as e:
            self._protocol_error(e)

    def _response_done(self, cmd: int, status: int, failed: bool) -> None:
        if self._held and self.tracker is not None and self.tracker.idle:
            asyncio.get_running_loop().call_soon(self._release_held)

    def _release_held(self) -> None:
        if self.phase != COMMAND or not self._held:
            return
        self._held = False
        self.pause_client_reading("held", False)
        self._drain_client()

    def _send_client(self, data: bytes) -> None:
        if self._decompress is None:
            self.client.write(data)
            return
        frames, self._zseq = compress_frames(data, self._zseq)
        self.client.writelines(frames)

    # -- flow control and closing -----------------------------------------------------------

    def pause_backend_reading(self, pause: bool) -> None:
        if self.bt is None:
            return
        if pause:
            self.bt.pause_reading()
        else:
            self.bt.resume_reading()

    def pause_client_reading(self, reason: str, pause: bool) -> None:
        if pause:
            if not self._pause_reasons:
                self.client.pause_reading()
            self._pause_reasons.add(reason)
        elif reason in self._pause_reasons:
            self._pause_reasons.discard(reason)
            if not self._pause_reasons and not self.client.is_closing():
                self.client.resume_reading()

    def client_lost(self, exc: Exception | None) -> None:
        if self.phase != CLOSED:
            self.close("client disconnected" + (f": {exc}" if exc else ""), quiet=True)

    def backend_lost(self, exc: Exception | None) -> None:
        if self.phase == CLOSED:
            return
        # The client sees what a direct connection would: the socket closes, and a client
        # waiting for a response reports the connection lost during the query.
        addr = self.backend.addr if self.backend else "?"
        busy = self.tracker is not None and not self.tracker.idle
        self.close(f"backend {addr} closed the connection" + (" during a command" if busy else ""))

    def _protocol_error(self, e: ProtocolError) -> None:
        self.close(f"protocol error from {e.origin.value}: {e}")

    def close(self, reason: str, quiet: bool = False) -> None:
        if self.phase == CLOSED:
            return
        was_established = self.phase == COMMAND
        self.phase = CLOSED
        if self._login_timer is not None:
            self._login_timer.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.bt is not None:
            if was_established and self.tracker is not None and self.tracker.idle:
                self.bt.write(frame(b"\x01", 0))  # COM_QUIT: the backend logs a clean exit
            self.bt.close()
        if self.backend is not None:
            self.backend.connections -= 1
        self.client.close()
        self.server.session_closed(self)
        (log.info if quiet else log.warning)("session %d closed: %s", self.id, reason)


def _peer(transport: asyncio.Transport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _reason(e: BaseException) -> str:
    return str(e) or type(e).__name__

