"""Backend connections kept for the next login of the same user (`[proxy] backend-pool-size`,
ours): a client that connects, runs a query and disconnects costs the backend no new connection.

Theory of operation
-------------------
Keeping. A session that ends between commands (the client quit or hung up) hands its backend
connection here instead of closing it, when what COM_RESET_CONNECTION leaves is what a new
login would have, that is when all of these hold:
- the backend is MariaDB (MySQL's reset sets the character set to the server's, not the
  login's) without an init_connect (which a reset does not run) or a global
  max_user_connections (kept connections would count toward it), as the health checks read them
  (so `auth-sync-user` is required), and the account has no limits of its own, as the
  credential sync reads them: MAX_STATEMENT_TIME (a reset sets the global one),
  MAX_USER_CONNECTIONS (as above) or MAX_CONNECTIONS_PER_HOUR (a login on a kept connection is
  not counted);
- the session is still on the connection it logged in on, with its login's user and
  capabilities (COM_SET_OPTION changes them), in its login's database or one COM_INIT_DB can
  give back, and never ran what may change the current role (SET ROLE, a procedure, a compound
  statement: the reset keeps the role) nor turned profiling on (the reset keeps the profiles
  SHOW PROFILES lists), and no KILL named it (the KILL runs against its thread
  a moment later: net/kill.py);
- the proxy holds the SHA1(password) that login proved, and the server checked the account less
  than auth-sync-interval ago (a reused connection carries its first login's time: a connection
  never idle long enough to expire still goes back to the server for a new login);
- the leg is plaintext and carries no PROXY header (a header names the first client), and the
  backend is one the router still routes to.
The pool then sends COM_RESET_CONNECTION (the server rolls back, drops temporary tables, user
variables, prepared statements and locks, and sets session variables back to their global
values and the character set to the login's) and COM_INIT_DB with the login's database (a
dropped one, or one no longer granted, fails it), and keeps the connection once both are OK.

Taking. A login whose answer the proxy verifies against a stored hash, routed to a backend that
keeps a connection with the same key (user, database, the client's capabilities and character
set) and the same credential (so a password another account of that user name has, on another
host pattern, does not take it), takes that connection: the client gets the OK the backend gave
the first login, and no byte goes to the backend. Most recently kept first (its server thread
is the warmest).

What a reused connection shows that a new one would not: the server's connection id is the
kept one's (clients see the proxy's own id), its connect attributes are the first client's, and
an account locked, dropped or given a new password is seen at the next credential sync (the
proxy then no longer verifies it) or when the first login's auth-sync-interval is up.

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
from tiproxy.protocol.errors import ProtocolError
from tiproxy.protocol.packets import Greeting, frame, parse_err
from tiproxy.session.login_actions import PoolKey

if TYPE_CHECKING:
    from tiproxy.balance.router import Backend, Router

log = logging.getLogger("tiproxy.pool")

RESET_TIMEOUT = 10.0  # for the server to answer the pool's COM_RESET_CONNECTION
RESET_CONNECTION = frame(b"\x1f", 0)
INIT_DB = 0x02
KEPT, REUSED = "kept", "reused"  # tiproxy_session_backend_pool_total's events


@dataclass(frozen=True)
class PoolLogin:
    """What a session's login leaves for keeping its backend connection."""

    key: PoolKey
    leg: BackendLeg  # the connection it logged in on (not one a move or a rebuild made)
    greeting: Greeting  # the backend's, at that login (its connection id)
    ok: bytes  # the OK that ended the login, payload only: what the next client gets
    backend_caps: int  # what the backend leg negotiated
    authenticated: float  # time.monotonic() of the login the server checked


class Kept:
    """One kept connection: the owner of its leg while the pool resets it, and while it waits
    (nothing is due from the server then)."""

    __slots__ = ("_buf", "_due", "_pool", "backend", "credential", "leg", "login", "ready",
                 "since")

    def __init__(self, pool: BackendPool, backend: Backend, login: PoolLogin,
                 credential: bytes) -> None:
        self._pool = pool
        self.backend = backend
        self.login = login
        self.leg = login.leg
        self.credential = credential  # SHA1(password): secret, never logged
        self.since = time.monotonic()
        self.ready = False  # the reset (and COM_INIT_DB) were answered with OK
        self._due = 0  # answers still to come
        self._buf = b""

    def reset(self) -> bytes:
        """COM_RESET_CONNECTION, then COM_INIT_DB with the login's database if it named one."""
        database = self.login.key.database
        self._due = 1 + (database is not None)
        if database is None:
            return RESET_CONNECTION
        return RESET_CONNECTION + frame(bytes((INIT_DB,)) + database, 0)

    # The leg's Owner (client/leg.py).
    def backend_data(self, data: bytes) -> None:
        buf = self._buf + data
        while len(buf) >= 4:
            end = 4 + int.from_bytes(buf[:3], "little")
            if len(buf) < end:
                break
            payload = buf[4:end]
            buf = buf[end:]
            if not self._answer(payload):
                return
        self._buf = buf

    def _answer(self, payload: bytes) -> bool:
        """One packet of the server's answers to the reset; False once dropped."""
        if self.ready or not payload:
            why = "the backend spoke while the connection was kept"
        elif payload[0] == 0x00:
            self._due -= 1
            if not self._due:
                self._pool.ready(self)
            return True
        elif payload[0] == 0xFF:
            try:
                err = parse_err(payload)
                why = f"the server refused the reset: {err.code} {err.message}"
            except ProtocolError:
                why = "the server refused the reset"
        else:
            why = "an unexpected answer to COM_RESET_CONNECTION"
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
        self._per_backend: dict[str, int] = {}  # kept or being reset, by address
        self._resetting: set[Kept] = set()  # reset sent, not yet answered
        self.size = 0  # [proxy] backend-pool-size: at most this many per backend; 0: off
        self.idle_seconds = 0.0
        self.idle = 0  # kept and ready
        self.events = events  # KEPT, REUSED: counted in the data plane's counters

    def configure(self, size: int, idle_seconds: float) -> None:
        self.size, self.idle_seconds = size, idle_seconds

    def keep(self, backend: Backend, login: PoolLogin, credential: bytes) -> bool:
        """Take a session's leg (attached to the session, between responses) and reset it for
        the next login with the same key and credential; False (the caller closes the leg)
        when the backend has its share already or the leg is closing."""
        addr, leg = backend.addr, login.leg
        count = self._per_backend.get(addr, 0)
        if count >= self.size or leg.closed or leg.transport is None:
            return False
        kept = Kept(self, backend, login, credential)
        leg.session = kept
        try:
            leg.write(kept.reset())
        except ConnectionError:
            leg.session = None
            return False
        leg.transport.resume_reading()  # a slow client may have paused it
        self._per_backend[addr] = count + 1
        self._resetting.add(kept)
        return True

    def ready(self, kept: Kept) -> None:
        self._resetting.discard(kept)
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
            if not kept.leg.closed and kept.backend is backend and backend.keep_unfit == "":
                self.events[REUSED] += 1
                return kept
            kept.leg.abort()  # closing, kept for a backend object the router replaced, or the
            # backend has an init_connect or a max_user_connections since
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
            self._resetting.discard(kept)
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
                        or backend.draining or backend.health or backend.keep_unfit != "" \
                        or router.backends.get(backend.addr) is not backend:
                    self._close(kept)
        for addr, count in list(self._per_backend.items()):
            if count > self.size:
                ready = sorted((k for queue in self._idle.values() for k in queue
                                if k.backend.addr == addr), key=lambda k: k.since)
                for kept in ready[:count - self.size]:
                    self._close(kept)
        for kept in [k for k in self._resetting if now - k.since >= RESET_TIMEOUT]:
            self.drop(kept, f"COM_RESET_CONNECTION not answered within {RESET_TIMEOUT:g}s")

    def holds(self, backend: Backend) -> bool:
        """Whether a connection is kept for `backend`, ready for the next login."""
        return any(k.backend is backend for queue in self._idle.values() for k in queue)

    def make_room(self, backend: Backend) -> bool:
        """Close the longest idle connection kept for `backend`, if there is one: the server
        refused a new connection as too many (its max_connections), and kept connections must
        not be why a login fails."""
        ready = [k for queue in self._idle.values() for k in queue if k.backend is backend]
        if not ready:
            return False
        kept = min(ready, key=lambda k: k.since)
        log.info("kept connection to %s closed: the server has too many connections",
                 backend.addr)
        self._close(kept)
        return True

    def stop(self) -> None:
        """Keep nothing more, and close what is kept (the proxy stops or hands over)."""
        self.configure(0, 0.0)
        for queue in list(self._idle.values()):
            for kept in list(queue):
                self._close(kept)
        for kept in list(self._resetting):
            self.drop(kept, "")

    def _close(self, kept: Kept) -> None:
        self._forget(kept)
        kept.leg.session = None
        kept.leg.close(quit_first=True)  # COM_QUIT: the server logs a clean exit
