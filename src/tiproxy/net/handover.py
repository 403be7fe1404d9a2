"""Handing live sessions to a new proxy process: the client's and the backend's sockets travel
with the session's state, so an upgrade drops no one (control/upgrade.py drives it).

Theory of operation
-------------------
The new process listens on an abstract Unix socket per data-plane process (`Receiver`; its name
names the process, and only a peer of the same user is heard). The old process hands each
session over at its next safe point: between commands, every answer relayed, no client byte
read and not yet handled, nothing of the session's own under way (a move, a checkpoint, a
replay). It stops reading both sockets, and sends, on a connection of its own, the session's
state (`SessionHandover`, pickled) with the two file descriptors (SCM_RIGHTS). The new process
answers one byte (ready); the old one then sends one byte (commit), closes its copies of the
descriptors, which leaves the connections open (the new process holds them), and forgets the
session. Only on the commit does the new process build the session around them (Session with
`adopted=`). No answer within HANDOVER_TIMEOUT: the old process hangs up without the commit,
keeps the session and reads again, as if nothing happened; the new one, seeing the hang-up,
closes its copies. So the old process alone decides, and at no moment do both use a session's
sockets, however late either side runs. (A sender older than the commit, which says so by
leaving `commits` false, is answered once the session is built, as it expects.)

What cannot travel stays: a TLS leg (its keys live in this process's OpenSSL state). Such a
session stays with the old process until it ends, or until graceful-close-conn-timeout closes
it at its next point between transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tiproxy.protocol.packets import HandshakeResponse
from tiproxy.session.dialects.mysql_restore import CapturedState
from tiproxy.session.state import SessionState
from tiproxy.session.txlog import TransactionLog

log = logging.getLogger("tiproxy.upgrade")

HANDOVER_TIMEOUT = 5.0
# A session's state, pickled: its prepared statements' texts are most of it. Bounded so that a
# receiver never reads without end (the sender is a process of our own user, but may be broken).
MAX_HANDOVER_BYTES = 64 << 20
_LENGTH = struct.Struct("<I")
_ACK = b"\x01"  # the receiver's "ready" (or, to a sender that does not commit, "taken")
_COMMIT = b"\x01"
# How long a receiver waits for the commit after it said ready. The sender commits as soon as it
# reads the ready byte, so only a sender stopped for this long is not heard; the session is then
# lost (its sockets closed by both), never served twice.
COMMIT_TIMEOUT = 60.0


@dataclass
class SessionHandover:
    """A session's state as it travels; everything else is built again on the other side."""

    id: int
    peer: str
    user: str
    namespace: str
    dialect: str
    backend_addr: str
    backend_connection_id: int
    backend_caps: int
    client_caps: int
    mariadb_caps: int
    login_response: HandshakeResponse | None
    credential: bytes | None  # SHA1(password): a secret; it crosses to a process of our own
    state: SessionState
    status: int  # the server status after the last answer
    compressed: bool
    origin: tuple[tuple[str, int], tuple[str, int]] | None  # PROXY protocol addresses
    started: float
    moves: int
    checkpoint: CapturedState | None
    replays: dict[bytes, bytes]
    stale: int
    replay_limit: int
    txlog: TransactionLog | None
    pending: bytes = b""  # client bytes read and not yet handled (a command that arrived)
    # Added later: a sender without them is older (its stale 2 meant "everything").
    stale_system: tuple[str, ...] | None = None  # system variables to read back by name
    client_salt: bytes | None = None  # the salt the client last answered (COM_CHANGE_USER)
    # The idle clock a move keeps (net/moves.py): the last answer (time.monotonic(), the same
    # clock in every process of the machine) and the wait_timeout counted from it, if pending.
    last_answer: float = 0.0
    idle_wait_timeout: float | None = None
    commits: bool = False  # the sender sends the commit byte after the ready one (see above)


@dataclass(frozen=True)
class Staying:
    """Sessions that stay with the old process (sent to the new one, without descriptors,
    so that its API lists them until the old process ends)."""

    pid: int  # the old process
    sessions: tuple[tuple[int, str, str, str, str], ...]  # (id, user, client, backend, why)


def receiver_name(pid: int, index: int) -> str:
    """The abstract socket address of data-plane process `index` of proxy process `pid`."""
    return f"\0tiproxy-handover-{pid}-{index}"


def send_session(name: str, handover: SessionHandover | Staying, fds: list[int]) -> bool:
    """Blocking (run it in a thread): hand the session to the receiver `name` (or, with no
    descriptors, tell it which sessions stay); True once the receiver took it: then this process
    must let go of the session. False: the receiver will not use it."""
    payload = pickle.dumps(handover, protocol=pickle.HIGHEST_PROTOCOL)
    message = _LENGTH.pack(len(payload)) + payload
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(HANDOVER_TIMEOUT)
        try:
            sock.connect(name)
            sent = socket.send_fds(sock, [message], fds)
            if sent < len(message):  # (an empty send to a receiver done already fails: EPIPE)
                sock.sendall(message[sent:])
            if sock.recv(1) != _ACK:
                return False  # the receiver hung up: it refused the session
        except OSError as e:
            what = f"session {handover.id}" if isinstance(handover, SessionHandover) \
                else "the list of sessions that stay"
            log.warning("%s: the new process did not take it: %s", what, e)
            return False
        if isinstance(handover, SessionHandover):
            # Ready: the decision is made here. The receiver waits for this byte; should it fail
            # to arrive (the receiver died), the session is lost, not kept by two processes.
            with contextlib.suppress(OSError):
                sock.sendall(_COMMIT)
        return True


class Receiver:
    """The new process's side: takes sessions handed over and gives each to `adopt`, on the
    event loop, which answers whether it took it."""

    def __init__(self, name: str,
                 adopt: Callable[[SessionHandover, list[socket.socket]], Any],
                 staying: Callable[[Staying], None]) -> None:
        self.name = name
        self._adopt = adopt
        self._staying = staying
        self._loop = asyncio.get_running_loop()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(name)
        self._sock.listen(128)
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="handover", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(HANDOVER_TIMEOUT)
                try:
                    self._one(conn)
                except (OSError, ValueError, TypeError, pickle.UnpicklingError, EOFError) as e:
                    log.warning("a session handed over could not be read: %s", e)

    def _one(self, conn: socket.socket) -> None:
        _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid != os.getuid():
            raise ValueError(f"refused a handover from user id {uid}")
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 2)
        socks = [socket.socket(fileno=fd) for fd in fds]
        try:
            if len(data) < _LENGTH.size or len(socks) not in (0, 2):
                raise ValueError("a handover without its length or its two sockets")
            length = _LENGTH.unpack_from(data)[0]
            if length > MAX_HANDOVER_BYTES:
                raise ValueError(f"a handover of {length} bytes")
            buf = bytearray(data[_LENGTH.size:])
            while len(buf) < length:
                chunk = conn.recv(min(1 << 20, length - len(buf)))
                if not chunk:
                    raise EOFError("the old process hung up mid-handover")
                buf += chunk
            handover = pickle.loads(bytes(buf))  # noqa: S301 - from a process of our own user
            if isinstance(handover, Staying) and not socks:
                self._loop.call_soon_threadsafe(self._staying, handover)
                conn.sendall(_ACK)
                return
            if not isinstance(handover, SessionHandover) or not socks:
                raise TypeError("not a session with its sockets")
            if self._closed:
                return  # shutting down: the sender keeps the session
            if handover.commits:
                conn.sendall(_ACK)
                conn.settimeout(COMMIT_TIMEOUT)
                if conn.recv(1) != _COMMIT:  # the sender gave up (it keeps the session)
                    log.info("session %d: the previous process kept it", handover.id)
                    return
            future = asyncio.run_coroutine_threadsafe(self._adopt_async(handover, socks),
                                                      self._loop)
            if handover.commits:
                # Committed: the sender has let go. Wait as long as adopting takes: the
                # sockets are the session's from now on, whether it gets built or not.
                if future.result():
                    socks = []
                else:
                    log.warning("session %d lost: handed over, but not taken up here",
                                handover.id)
                return
            if future.result(HANDOVER_TIMEOUT):
                socks = []  # the session owns them now
                conn.sendall(_ACK)
        finally:
            for sock in socks:
                sock.close()

    async def _adopt_async(self, handover: SessionHandover, socks: list[socket.socket]) -> bool:
        result = self._adopt(handover, socks)
        if asyncio.iscoroutine(result):
            result = await result
        return bool(result)


class Leaver(Protocol):
    """What the old data plane's sessions offer a handover (net/relay.py's Session)."""

    id: int

    def at_handover_point(self) -> str: ...
    def handover_state(self) -> SessionHandover: ...
    def handover_sockets(self) -> list[int]: ...
    def hold_for_handover(self, hold: bool) -> None: ...
    def handed_over(self) -> None: ...
    def staying_view(self) -> tuple[int, str, str, str, str]: ...  # (id, user, client, ...)


class Departure:
    """The old data plane's side: every session that can travel goes to the receivers at its
    next safe point: when its next command arrives (`now`, from the session: the command goes
    along, unread), or when a look finds it quiet; `done` is set when none that can travel is
    left (those that cannot are the caller's to close gracefully)."""

    POLL = 0.02  # seconds between looks at the sessions still here
    RETRY = 1.0  # seconds before a session the new process did not take is sent again

    def __init__(self, receivers: list[str], sessions: Callable[[], list[Leaver]]) -> None:
        self._receivers = receivers
        self._sessions = sessions
        self._staying: set[int] = set()  # ids already logged as staying
        self._sending: set[int] = set()
        self._not_before: dict[int, float] = {}  # id -> when it may be sent again
        self._tasks: set[asyncio.Task[bool]] = set()
        self.done = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def close(self) -> None:
        self._task.cancel()
        for task in self._tasks:
            task.cancel()

    async def _tell_staying(self, sessions: list[Leaver]) -> None:
        """The new process lists the sessions that stay here, until this process ends."""
        by_receiver: dict[str, list[tuple[int, str, str, str, str]]] = {}
        for session in sessions:
            receiver = self._receivers[(session.id - 1) % len(self._receivers)]
            by_receiver.setdefault(receiver, []).append(session.staying_view())
        for receiver, views in by_receiver.items():
            await asyncio.to_thread(send_session, receiver,
                                    Staying(os.getpid(), tuple(views)), [])

    def now(self, session: Leaver) -> bool:
        """A session at a safe point (its next command arrived): send it; False if it may not
        go yet (a failed try a moment ago)."""
        loop = asyncio.get_running_loop()
        if session.id in self._sending or loop.time() < self._not_before.get(session.id, 0):
            return False
        self._sending.add(session.id)
        session.hold_for_handover(True)
        task = loop.create_task(self._send(session))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _run(self) -> None:
        while True:
            waiting = bool(self._sending)
            for session in self._sessions():
                why = session.at_handover_point()
                if why == "busy" or session.id in self._sending:
                    waiting = True
                elif why:
                    if session.id not in self._staying:
                        self._staying.add(session.id)
                        log.info("session %d stays with the old process: %s", session.id, why)
                else:
                    waiting = True
                    self.now(session)
            if not waiting:
                staying = [s for s in self._sessions() if s.id in self._staying]
                if staying:
                    await self._tell_staying(staying)
                self.done.set()
                return
            await asyncio.sleep(self.POLL)

    async def _send(self, session: Leaver) -> bool:
        """Hand one session over; False if it stays (the new process did not take it)."""
        receiver = self._receivers[(session.id - 1) % len(self._receivers)]
        try:
            taken = await asyncio.to_thread(send_session, receiver, session.handover_state(),
                                            session.handover_sockets())
        finally:
            self._sending.discard(session.id)
        if taken:
            session.handed_over()
        else:
            self._not_before[session.id] = asyncio.get_running_loop().time() + self.RETRY
            session.hold_for_handover(False)
        return taken
