"""Backend connections kept for the next login of the same user (`[proxy] backend-pool-size`,
ours): a client that connects, runs a query and disconnects costs the backend no new connection.

Theory of operation
-------------------
Keeping. A session that ends between commands (the client quit or hung up) hands its backend
connection here instead of closing it, when all of these hold: the proxy verified the login
itself against a stored hash (a reusable credential, session/credentials.py), the session is
still on the connection it logged in on, with the user and database of that login, the leg is
plaintext and carries no PROXY header (a header names the first client), and the backend is
one the router still routes to. The pool sends COM_RESET_CONNECTION (the server rolls back,
drops temporary tables, user variables, prepared statements and locks, and resets session
variables to their global values and the character set to the login's) and keeps the
connection once the server answers OK.

Taking. A login whose answer the proxy verifies against the stored hash, routed to a backend
that has a kept connection with the same key (user, database, the capabilities and character
set the backend negotiated), takes that connection: the client gets the OK the backend gave the
first login, and no byte goes to the backend. Most recently kept first (its server thread is the
warmest).

What a reused connection shows that a new one would not: the server's connection id is the
kept one's (clients see the proxy's own id), connect attributes are the first client's, and an
account dropped, locked or given a new password since the last auth-sync is noticed only at the
next sync (auth-sync-interval) or when the kept connections expire.

Kept connections are closed after `backend-pool-idle` seconds, when their backend is drained,
unhealthy or gone, when the server closes them, and when the proxy stops or hands over.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from typing import TYPE_CHECKING

from tiproxy.client.leg import BackendLeg
from tiproxy.protocol.packets import Greeting
from tiproxy.session.login import PoolKey

if TYPE_CHECKING:
    from tiproxy.balance.router import Backend, Router

log = logging.getLogger("tiproxy.pool")

RESET_CONNECTION = b"\x01\x00\x00\x00\x1f"  # COM_RESET_CONNECTION, sequence id 0
RESET_TIMEOUT = 10.0
KEPT, REUSED = "kept", "reused"  # tiproxy_session_backend_pool_total's events


class Kept:
    """One kept connection: its login's facts, and the owner of its leg while it waits (the
    leg hands it the answer to COM_RESET_CONNECTION, and nothing else is due)."""

    __slots__ = ("_buf", "_pool", "backend", "greeting", "key", "leg", "ok", "ready", "since")

    def __init__(self, pool: BackendPool, backend: Backend, key: PoolKey, leg: BackendLeg, *,
                 greeting: Greeting, ok: bytes) -> None:
        self._pool = pool
        self.backend = backend
        self.key = key
        self.leg = leg
        self.greeting = greeting  # the backend's greeting at the first login (connection id)
        self.ok = ok  # the OK that ended the first login, payload only
        self.since = 0.0
        self.ready = False  # the reset was answered with OK
        self._buf = b""

    # The leg's Owner (client/leg.py).
    def backend_data(self, data: bytes) -> None:
        if self.ready:
            self._pool.drop(self, "the backend spoke while the connection was kept")
            return
        buf = self._buf + data
        if len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:3], "little"):
            self._buf = buf
            return
        if len(buf) == 4 + int.from_bytes(buf[:3], "little") and buf[4:5] == b"\x00":
            self._buf = b""
            self._pool.ready(self)
        else:
            self._pool.drop(self, "COM_RESET_CONNECTION was not answered with OK")

    def backend_lost(self, exc: Exception | None) -> None:
        self._pool.drop(self, "")

    def pause_client_reading(self, reason: str, pause: bool) -> None:
        pass


class BackendPool:
    """The kept connections of one data plane, by backend address and key."""

    def __init__(self, events: Counter[str]) -> None:
        self._idle: dict[tuple[str, PoolKey], deque[Kept]] = {}
        self._per_backend: dict[str, int] = {}  # kept or being reset, by address
        self._resetting: set[Kept] = set()  # COM_RESET_CONNECTION sent, not yet answered
        self.size = 0  # [proxy] backend-pool-size: at most this many per backend; 0: off
        self.idle_seconds = 0.0
        self.idle = 0  # kept and ready
        self.events = events  # KEPT, REUSED: counted in the data plane's counters

    def configure(self, size: int, idle_seconds: float) -> None:
        self.size, self.idle_seconds = size, idle_seconds

    def keep(self, backend: Backend, key: PoolKey, leg: BackendLeg, greeting: Greeting,
             ok: bytes) -> bool:
        """Take a session's leg (attached to the session, between responses) and reset it for
        the next login with `key`; False (the caller closes the leg) when the backend has its
        share already or the leg is closing."""
        addr = backend.addr
        count = self._per_backend.get(addr, 0)
        if count >= self.size or leg.closed:
            return False
        kept = Kept(self, backend, key, leg, greeting=greeting, ok=ok)
        leg.session = kept
        try:
            leg.write(RESET_CONNECTION)
        except ConnectionError:
            leg.session = None
            return False
        self._per_backend[addr] = count + 1
        kept.since = time.monotonic()
        self._resetting.add(kept)
        return True

    def ready(self, kept: Kept) -> None:
        self._resetting.discard(kept)
        kept.ready = True
        kept.since = time.monotonic()
        slot = (kept.backend.addr, kept.key)
        queue = self._idle.get(slot)
        if queue is None:
            queue = self._idle[slot] = deque()
        queue.append(kept)
        self.idle += 1
        self.events[KEPT] += 1

    def take(self, backend: Backend, key: PoolKey) -> Kept | None:
        """A kept connection to `backend` for a login with `key`, detached, or None."""
        slot = (backend.addr, key)
        queue = self._idle.get(slot)
        while queue:
            kept = queue.pop()
            if not queue:
                del self._idle[slot]
            kept.ready = False  # out of the queue already: _forget has only the counts left
            self.idle -= 1
            self._forget(kept)
            kept.leg.session = None
            if not kept.leg.closed:
                self.events[REUSED] += 1
                return kept
            kept.leg.abort()
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
            queue = self._idle.get((kept.backend.addr, kept.key))
            if queue is not None:
                queue.remove(kept)
                if not queue:
                    del self._idle[(kept.backend.addr, kept.key)]
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
                        or backend.draining or backend.health \
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

    def close_all(self) -> None:
        for queue in list(self._idle.values()):
            for kept in list(queue):
                self._close(kept)
        for kept in list(self._resetting):
            self.drop(kept, "")

    def _close(self, kept: Kept) -> None:
        self._forget(kept)
        kept.leg.session = None
        kept.leg.close(quit_first=True)  # COM_QUIT: the server logs a clean exit

