"""Reading a session's two sockets straight from the event loop (net/_direct.c); whether the
compiled path (net/_hotpath.c) is on at all, and handing it what it reads.

Theory of operation
-------------------
A session that the compiled path has served for a while (every DIRECT_AFTER answers in a row
the backend's Feed asks `_direct_enter`) goes further when nothing else is going on: the
transports stop reading its two sockets, and the loop calls a `DirectLeg` for each instead,
which reads the socket itself and calls the compiled path with the chunk, without the stream
machinery; what that sends goes straight to the other socket when its transport holds nothing
back, else through the transport. A TLS leg's DirectLeg drives its TLS connection itself (and
the TCP transport under the TLS one is the one paused). A chunk the compiled path refuses, and
any end or error, comes back through `_direct_exit`, which gives the sockets back to the
transports first; and everything in the session that pauses a leg, detaches the backend leg,
hands the session over, loses a peer or closes calls `leave_direct` first, so nothing reads a
socket the session no longer has.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from tiproxy.net.login_phase import COMMAND
from tiproxy.net.loop import open_files_limit
from tiproxy.protocol import responses as tracker_phases
from tiproxy.protocol.responses import FIRST_STEP, Expect
from tiproxy.protocol.tracker import ResponseTracker
from tiproxy.session.state import PreparedStatement, SessionState
from tiproxy.session.statements import (
    COMPOUND_FIRST_BYTES,
    COMPOUND_START,
    LETTERS,
    STATE_FIRST_BYTES,
    STATE_PREFIXES,
)
from tiproxy.views.counters import BackendCounts, Histogram

try:
    from tiproxy.net import _hotpath
except ImportError:  # pragma: no cover - built by setup.py; the Python path does the same
    _hotpath = None  # type: ignore[assignment]


# Why the compiled path is off, or "" when it is on (cli/server.py logs it at start).
COMPILED_OFF = ("not built" if _hotpath is None else
                "TIPROXY_COMPILED_RELAY=0" if os.environ.get("TIPROXY_COMPILED_RELAY") == "0"
                else "")
# Why reading sockets directly (net/_direct.c) is off, or "" when it is on.
DIRECT_OFF = ("the compiled path is off" if COMPILED_OFF else
              "TIPROXY_DIRECT_RELAY=0" if os.environ.get("TIPROXY_DIRECT_RELAY") == "0" else "")

if TYPE_CHECKING:
    from tiproxy.client.leg import BackendLeg
    from tiproxy.net.handover import Departure
    from tiproxy.net.server import ProxyServer
    from tiproxy.net.session_capture import SessionCapture
    from tiproxy.protocol.compress import Decompressor
    from tiproxy.session.connid import ResultRewriter

log = logging.getLogger("tiproxy.session")

# Descriptors kept free of sessions' sockets for everything else (listeners, the API, pools,
# health checks, files), when deciding whether a session may read its sockets directly.
_SPARE_FDS = 256


class DirectReading:
    """Mixed into Session (net/relay.py), whose attributes it uses."""

    # Provided by Session and its other mixins.
    server: ProxyServer
    id: int
    phase: int
    client: asyncio.Transport
    client_raw: asyncio.Transport | None
    bt: asyncio.Transport | None
    backend_leg: BackendLeg | None
    tracker: ResponseTracker | None
    leaving: Departure | None
    _cbuf: bytearray
    _ccont: bool
    _held: set[str]
    _pause_reasons: set[str]
    _decompress: Decompressor | None
    _moving: bool
    _soon: asyncio.TimerHandle | None
    _capture: SessionCapture | None
    _intercept: bytearray | None
    _rewriter: ResultRewriter | None

    if TYPE_CHECKING:  # provided by Session: declared for the type checker only
        def client_data(self, data: bytes) -> None: ...
        def backend_data(self, data: bytes) -> None: ...
        def client_lost(self, exc: Exception | None) -> None: ...
        def close(self, reason: str, quiet: bool = False, kind: str = "") -> None: ...

    # While the loop reads the sockets through DirectLegs (net/_direct.c): (the loop, the
    # duplicates of the client's and the backend's descriptors, the transports paused: the
    # backend's, and the TCP ones under TLS ones).
    _direct: tuple[asyncio.AbstractEventLoop, int, int, tuple[asyncio.Transport, ...]] | None \
        = None


    def _direct_enter(self) -> None:
        """The backend's Feed offers it after DIRECT_AFTER answers in a row on the compiled
        path: have the loop call the compiled path straight from both sockets (net/_direct.c)
        if nothing else is going on."""
        if DIRECT_OFF or self._direct is not None:
            return
        client, bt, leg, tracker = self.client, self.bt, self.backend_leg, self.tracker
        attached: object = leg.session if leg is not None else None
        if bt is None or leg is None or attached is not self or leg.transport is not bt \
                or tracker is None or not tracker.idle or self.phase != COMMAND \
                or self._cbuf or self._held or self._ccont or self._pause_reasons \
                or self._decompress is not None \
                or self._moving or self._soon is not None or self.leaving is not None \
                or self._capture is not None or self._intercept is not None \
                or self._rewriter is not None \
                or client.is_closing() or bt.is_closing() \
                or not client.is_reading() or not bt.is_reading() \
                or client.get_write_buffer_size() or bt.get_write_buffer_size():
            return
        client_tls, backend_tls = _tls_parts(client, self.client_raw), _tls_parts(bt, leg.raw)
        if client_tls is False or backend_tls is False:
            return  # a TLS leg with something in flight (or one this cannot drive)
        # Two descriptors more: only while every session could have them and new ones still be
        # accepted (the soft limit is raised to the hard one at start, net/loop.py).
        if 4 * len(self.server.sessions) + _SPARE_FDS > open_files_limit():
            return
        client_socket = client.get_extra_info("socket")
        backend_socket = bt.get_extra_info("socket")
        if client_socket is None or backend_socket is None:
            return
        ctls, craw = client_tls or (None, None)
        btls, braw = backend_tls or (None, None)
        loop = asyncio.get_running_loop()
        client_fd = backend_fd = -1
        try:
            client_fd = os.dup(client_socket.fileno())
            backend_fd = os.dup(backend_socket.fileno())
            loop.add_reader(client_fd, _hotpath.DirectLeg(self, client_fd, False, backend_fd, bt,
                                                          ctls, btls, braw))
            loop.add_reader(backend_fd, _hotpath.DirectLeg(self, backend_fd, True, client_fd,
                                                           client, btls, ctls, craw))
        except OSError as e:  # (out of descriptors) the transports go on reading
            _stop_direct(loop, client_fd, backend_fd)
            log.debug("session %d: not read directly: %s", self.id, e)
            return
        paused = tuple(t for t in (bt, craw, braw) if t is not None)
        client.pause_reading()
        for transport in paused:
            transport.pause_reading()
        self._direct = (loop, client_fd, backend_fd, paused)

    def leave_direct(self) -> None:
        """Give the sockets back to the transports' reading, if DirectLegs read them: before
        anything but the compiled path acts on the session's sockets."""
        held = self._direct
        if held is None:
            return
        self._direct = None
        loop, client_fd, backend_fd, paused = held
        _stop_direct(loop, client_fd, backend_fd)
        for transport in paused:  # (a TLS transport then reads what its connection holds)
            if not transport.is_closing():
                transport.resume_reading()
        if not self.client.is_closing() and not self._pause_reasons:
            self.client.resume_reading()

    @property
    def reads_direct(self) -> bool:
        return self._direct is not None

    def _direct_exit(self, backend: bool, data: bytes | None, error: int | str) -> None:
        """A DirectLeg met what the compiled path does not take: a chunk (`data`); the end
        of the stream, or something the TLS connection has to say (neither: the transport
        meets it when it reads again); a socket error (`error`, which the DirectLeg's read
        consumed: the transport meets the end after it); or a TLS failure (`error`: OpenSSL's
        reason)."""
        self.leave_direct()
        if data is not None:
            if backend:
                self.backend_data(data)
            else:
                self.client_data(data)
        if isinstance(error, str):  # the connection is unusable: ended here, as the TLS
            transport = self.bt if backend else self.client  # transport would have
            if backend:
                log.warning("session %d: TLS failed on the backend connection: %s", self.id,
                            error)
            else:
                self.client_lost(ConnectionError(f"TLS failed on its connection: {error}"))
            if transport is not None:
                transport.abort()
        elif error:
            exc = OSError(error, os.strerror(error))
            if backend:  # (recovery needs only that it went, which the transport meets next)
                log.debug("session %d: backend socket error: %s", self.id, exc)
            else:
                self.client_lost(exc)  # as the transport would have: then it closes

    def _direct_error(self, exc: BaseException) -> None:
        """What the event loop does when a data_received raises: log it, end the session."""
        self.leave_direct()
        log.error("session %d: relaying failed", self.id, exc_info=exc)
        self.close(f"internal error: {str(exc) or type(exc).__name__}")


def _tls_parts(transport: asyncio.Transport, raw: asyncio.Transport | None
               ) -> tuple[object, asyncio.Transport] | Literal[False] | None:
    """For a DirectLeg: None for a plain leg; for a TLS one, its connection (ssl.SSLObject's
    _sslobj) and the TCP transport under it, if neither holds anything back in either
    direction; else False."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    sslobj = getattr(ssl_object, "_sslobj", None)
    if sslobj is None or raw is None or raw.is_closing() or not raw.is_reading() \
            or raw.get_write_buffer_size() or not _hotpath.tls_quiet(sslobj):
        return False
    return sslobj, raw


def _stop_direct(loop: asyncio.AbstractEventLoop, *fds: int) -> None:
    """Stop watching the duplicate descriptors, then close them (in that order: the loop
    forgets a descriptor it watches as it stops, by its number)."""
    for fd in fds:
        if fd >= 0:
            if not loop.is_closed():
                loop.remove_reader(fd)
            os.close(fd)


def configure_compiled_path(session: type, fast: dict[int, Expect]) -> tuple[
        Callable[[Any, bytes], bool], Callable[[Any, bytes], bool]] | None:
    """Hand net/_hotpath.c what it reads: `session` is net/relay.py's Session, `fast` the
    commands it may send untouched, with what each expects back. Its entry points for a client
    chunk and a backend chunk, or None where the compiled path is off (COMPILED_OFF)."""
    if _hotpath is None or COMPILED_OFF:
        return None
    # It reads these from the objects' own dicts, which a descriptor would have overridden.
    classes = {"Session": session, "SessionState": SessionState,
               "PreparedStatement": PreparedStatement}
    described = [f"{name}.{field}" for name, fields in _hotpath.DICT_FIELDS.items()
                 for field in fields
                 if hasattr(type(inspect.getattr_static(classes[name], field, None)), "__set__")]
    if described:
        raise RuntimeError(f"net/_hotpath.c reads attributes that are descriptors: "
                           f"{', '.join(described)}")
    if _hotpath.TRACKER_PHASES != (tracker_phases.IDLE, tracker_phases.FIRST,
                                   tracker_phases.SINGLE):
        raise RuntimeError("net/_hotpath.c's tracker phases are not protocol/responses.py's")
    _hotpath.configure(
        COMMAND,
        {cmd: (kind, *FIRST_STEP[kind]) for cmd, kind in fast.items()
         if kind is not Expect.NOTHING},
        STATE_FIRST_BYTES, LETTERS, STATE_PREFIXES, COMPOUND_FIRST_BYTES, COMPOUND_START.match,
        ResponseTracker, BackendCounts, Histogram,
    )
    return _hotpath.command, _hotpath.response
