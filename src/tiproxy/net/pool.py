"""Backend connections kept for the next login of the same user (`[proxy] backend-pool-size`,
ours): a client that connects, runs a query and disconnects costs the backend no new connection.

Theory of operation
-------------------
Keeping. A session that ends between commands (the client quit or hung up) hands its backend
connection here instead of closing it, when all of these hold: the proxy holds the SHA1(password)
the login proved (a reusable credential, session/credentials.py); the session is still on the
connection it logged in on, with its login's user and capabilities (COM_SET_OPTION changes
them); it never ran what may change the current role (SET ROLE, a procedure, a compound
statement: the server keeps the role through COM_CHANGE_USER); the leg is plaintext and carries
no PROXY header (a header names the first client); and the backend is one the router still
routes to. The pool then logs the connection in again as that login, with COM_CHANGE_USER (the
login's user, database, character set and connect attributes) answered from the credential:
the server checks the account (a dropped database, a locked account or a new password now fail
it), rolls back, drops temporary tables, user variables, prepared statements and locks, sets
the session variables back to their global values and the account's own limits, and runs
init_connect, as for a new connection. The connection is kept once the server says OK.

Taking. A login whose answer the proxy verifies against a stored hash, routed to a backend that
keeps a connection with the same key (user, database, the client's capabilities and character
set) and the same credential (so a password another account of that user name has, on another
host pattern, or an old one in users-file, does not take it), takes that connection: the client
gets the OK the backend gave the first login, and no byte goes to the backend. Most recently
kept first (its server thread is the warmest).

What a reused connection shows that a new one would not: the server's connection id is the
kept one's (clients see the proxy's own id), its connect attributes are the first client's, and
what changed on the server since the connection was kept (at most backend-pool-idle ago) is
seen at the next keep.

Kept connections are closed after `backend-pool-idle` seconds, when their backend is drained,
unhealthy or gone, when the server closes them, and when the proxy stops or hands over.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tiproxy.client.leg import BackendLeg
from tiproxy.protocol.auth import NATIVE_PLUGIN, native_answer
from tiproxy.protocol.errors import ProtocolError
from tiproxy.protocol.packets import (
    Greeting,
    HandshakeResponse,
    frame,
    parse_auth_switch,
    parse_err,
)
from tiproxy.session.commands import build_change_user
from tiproxy.session.login import FORCE_SWITCH_PLUGIN, PoolKey

if TYPE_CHECKING:
    from tiproxy.balance.router import Backend, Router

log = logging.getLogger("tiproxy.pool")

LOGIN_TIMEOUT = 10.0  # for the server to answer the pool's COM_CHANGE_USER
KEPT, REUSED = "kept", "reused"  # tiproxy_session_backend_pool_total's events


@dataclass(frozen=True)
class PoolLogin:
    """What a session's login leaves for keeping its backend connection."""

    key: PoolKey
    leg: BackendLeg  # the connection it logged in on (not one a move or a rebuild made)
    greeting: Greeting  # the backend's, at that login (its connection id)
    ok: bytes  # the OK that ended the login, payload only: what the next client gets
    backend_caps: int  # what the backend leg negotiated
    response: HandshakeResponse  # the client's, as the backend got it (user, database...)


class Kept:
    """One kept connection: the owner of its leg while the pool logs it in again, and while it
    waits (nothing is due from the server then)."""

    __slots__ = ("_buf", "_pool", "_switched", "backend", "credential", "leg", "login", "ready",
                 "since")

    def __init__(self, pool: BackendPool, backend: Backend, login: PoolLogin,
                 credential: bytes) -> None:
        self._pool = pool
        self.backend = backend
        self.login = login
        self.leg = login.leg
        self.credential = credential  # SHA1(password): secret, never logged
        self.since = time.monotonic()
        self.ready = False  # logged in again: COM_CHANGE_USER was answered with OK
        self._switched = False
        self._buf = b""

    def change_user(self) -> bytes:
        resp = self.login.response
        return frame(build_change_user(resp.user, resp.database, resp.charset, resp.attrs,
                                       capabilities=self.login.backend_caps,
                                       plugin=FORCE_SWITCH_PLUGIN), 0)

    # The leg's Owner (client/leg.py).
    def backend_data(self, data: bytes) -> None:
        buf = self._buf + data
        while len(buf) >= 4:
            end = 4 + int.from_bytes(buf[:3], "little")
            if len(buf) < end:
                break
            seq, payload = buf[3], buf[4:end]
            buf = buf[end:]
            if not self._answer(seq, payload):
                return
        self._buf = buf

    def _answer(self, seq: int, payload: bytes) -> bool:
        """One packet of the server's answer to COM_CHANGE_USER; False once dropped."""
        why = ""
        if self.ready or not payload:
            why = "the backend spoke while the connection was kept"
        elif payload[0] == 0x00:
            self._pool.ready(self)
            return True
        elif payload[0] == 0xFE and not self._switched:
            try:
                switch = parse_auth_switch(payload)
            except ProtocolError as e:
                why = f"malformed auth switch: {e}"
            else:
                if switch.plugin == NATIVE_PLUGIN:
                    self._switched = True
                    self.leg.write(frame(native_answer(self.credential, switch.data[:20]),
                                         seq + 1))
                    return True
                why = f"the server asks for {switch.plugin}"
        elif payload[0] == 0xFF:
            try:
                err = parse_err(payload)
                why = f"the server refused to log it in again: {err.code} {err.message}"
            except ProtocolError:
                why = "the server refused to log it in again"
        else:
            why = "an unexpected answer to COM_CHANGE_USER"
        self._pool.drop(self, why)
        return False

    def backend_lost(self, exc: Exception | None) -> None:
        self._pool.drop(self, "")

    def pause_client_reading(self, reason: str, pause: bool) -> None:
        pass


class BackendPool:
    """The kept connections of one data plane, by backend address, key and credential."""

    def __init__(self, events: Counter[str]) -> None:
        self._idle: dict[tuple[str, PoolKey, bytes], deque[Kept]] = {}
        self._per_backend: dict[str, int] = {}  # kept or logging in again, by address
        self._changing: set[Kept] = set()  # COM_CHANGE_USER sent, not yet answered
        self.size = 0  # [proxy] backend-pool-size: at most this many per backend; 0: off
        self.idle_seconds = 0.0
        self.idle = 0  # kept and ready
        self.events = events  # KEPT, REUSED: counted in the data plane's counters

    def configure(self, size: int, idle_seconds: float) -> None:
        self.size, self.idle_seconds = size, idle_seconds

    def keep(self, backend: Backend, login: PoolLogin, credential: bytes) -> bool:
        """Take a session's leg (attached to the session, between responses) and log it in
        again for the next login with the same key and credential; False (the caller closes
        the leg) when the backend has its share already or the leg is closing."""
        addr, leg = backend.addr, login.leg
        count = self._per_backend.get(addr, 0)
        if count >= self.size or leg.closed or leg.transport is None:
            return False
        kept = Kept(self, backend, login, credential)
        leg.session = kept
        try:
            leg.write(kept.change_user())
        except ConnectionError:
            leg.session = None
            return False
        leg.transport.resume_reading()  # a slow client may have paused it
        self._per_backend[addr] = count + 1
        self._changing.add(kept)
        return True

    def ready(self, kept: Kept) -> None:
        self._changing.discard(kept)
        kept.ready = True
        kept.since = time.monotonic()
        slot = (kept.backend.addr, kept.login.key, kept.credential)
        queue = self._idle.get(slot)
        if queue is None:
            queue = self._idle[slot] = deque()
        queue.append(kept)
        self.idle += 1
        self.events[KEPT] += 1

    def take(self, backend: Backend, key: PoolKey, credential: bytes) -> Kept | None:
        """A kept connection to `backend` for a login with `key` whose password proved
        `credential`, detached, or None."""
        slot = (backend.addr, key, credential)
        queue = self._idle.get(slot)
        while queue:
            kept = queue.pop()
            if not queue:
                del self._idle[slot]
            kept.ready = False  # out of the queue already: _forget has only the counts left
            self.idle -= 1
            self._forget(kept)
            kept.leg.session = None
            if not kept.leg.closed and kept.backend is backend:
                self.events[REUSED] += 1
                return kept
            kept.leg.abort()  # closing, or kept for a backend object the router replaced
        return None

    def drop(self, kept: Kept, why: str) -> None:
        """Close a kept connection (the server closed it, or said what it should not)."""
        if why:
            log.info("kept connection to %s closed: %s", kept.backend.addr, why)
        self._forget(kept)
        kept.leg.session = None
        kept.leg.abort()

    def _forget(self, kept: Kept) -> None:
        if kept.ready:
            self.idle -= 1
            slot = (kept.backend.addr, kept.login.key, kept.credential)
            queue = self._idle.get(slot)
            if queue is not None:
                queue.remove(kept)
                if not queue:
                    del self._idle[slot]
        else:
            self._changing.discard(kept)
        kept.ready = False
        addr = kept.backend.addr
        left = self._per_backend.get(addr, 0) - 1
        if left > 0:
            self._per_backend[addr] = left
        else:
            self._per_backend.pop(addr, None)

    def sweep(self, router: Router, now: float) -> None:
        """Close what expired, and what is kept for a backend the router no longer routes to
        (drained, unhealthy, removed); everything when the pool is off, and the oldest beyond
        backend-pool-size after a reload made it smaller."""
        for queue in list(self._idle.values()):
            for kept in list(queue):
                backend = kept.backend
                if self.size == 0 or now - kept.since >= self.idle_seconds \
                        or backend.draining or backend.health \
                        or router.backends.get(backend.addr) is not backend:
                    self._close(kept)
        for addr, count in list(self._per_backend.items()):
            if count > self.size:
                ready = sorted((k for queue in self._idle.values() for k in queue
                                if k.backend.addr == addr), key=lambda k: k.since)
                for kept in ready[:count - self.size]:
                    self._close(kept)
        for kept in [k for k in self._changing if now - k.since >= LOGIN_TIMEOUT]:
            self.drop(kept, f"COM_CHANGE_USER not answered within {LOGIN_TIMEOUT:g}s")

    def close_all(self) -> None:
        for queue in list(self._idle.values()):
            for kept in list(queue):
                self._close(kept)
        for kept in list(self._changing):
            self.drop(kept, "")

    def _close(self, kept: Kept) -> None:
        self._forget(kept)
        kept.leg.session = None
        kept.leg.close(quit_first=True)  # COM_QUIT: the server logs a clean exit
