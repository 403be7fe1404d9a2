"""The session's side of the backend connections kept for the next login (net/pool.py): taking
one at login, handing its own over at the end, and making room among them when a server finds
a new connection one too many.

Making room. Kept connections count toward the server's max_connections. MariaDB refuses the
connection after the first one too many before its greeting, and greets that one, for want of
CONNECTION ADMIN refusing its login after the password. Either way, if this worker keeps
connections there, it closes the one kept longest and tries again a moment later (the server
frees the place once it has read the COM_QUIT), closing another only if that is refused too,
at most ROOM_TRIES for one login: before the greeting, _route simply connects again; after the
password, the proxy answers the new connection's salt for the client with the SHA1(password)
the client's answer proved, and the new connection's OK is the client's. If that fails, the
client gets the server's refusal.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeGuard

from tiproxy.client.leg import CONNECT_TIMEOUT, BackendLeg
from tiproxy.protocol.auth import native_answer
from tiproxy.protocol.constants import ER_CON_COUNT_ERROR
from tiproxy.protocol.errors import BackendRefusedError, Origin, ProtocolError
from tiproxy.protocol.packets import frame, parse_auth_switch, parse_err, parse_greeting

if TYPE_CHECKING:
    from tiproxy.balance.router import Backend
    from tiproxy.net.pool import PoolLogin
    from tiproxy.net.server import ProxyServer
    from tiproxy.protocol.packets import Greeting
    from tiproxy.session.login import Login
    from tiproxy.session.login_actions import Action
    from tiproxy.session.state import SessionState

# A backend that answers "too many connections" while this worker keeps idle connections to it
# gets one of them closed and is tried again after ROOM_WAIT, at most ROOM_TRIES times, waiting
# ROOM_WAIT longer each time.
ROOM_TRIES = 3
ROOM_WAIT = 0.05
_monotonic = time.monotonic


class KeptConnections:
    """Mixed into Session (net/relay.py), whose attributes it uses."""

    # Provided by Session and its other mixins.
    server: ProxyServer
    user: str
    namespace: str
    dialect: str
    backend: Backend | None
    backend_leg: BackendLeg | None
    backend_tls: bool
    backend_caps: int
    credential: bytes | None
    keepalive_unhealthy: bool
    role_changed: bool
    state: SessionState
    login: Login | None
    _early: tuple[Backend, BackendLeg, Greeting] | None
    _origin: tuple[tuple[str, int], tuple[str, int]] | None
    _native_exchange: tuple[bytes, bytes] | None
    _verified: bytes | None
    _authenticated: float
    _pool_login: PoolLogin | None
    _replaying: bool
    _task: asyncio.Task[None] | None
    _move_task: asyncio.Task[None] | None
    _checkpoint_task: asyncio.Task[None] | None
    _rooms_made = 0  # kept connections this login closed to make room (net/pool.py)

    if TYPE_CHECKING:  # provided by Session and its other mixins: for the type checker only
        def _run(self, actions: Sequence[Action]) -> None: ...
        def backend_header(self) -> bytes | None: ...
        def set_backend_keepalive(self, leg: BackendLeg | None, unhealthy: bool) -> None: ...

    def _take_kept(self) -> bool:
        """Log in on a kept backend connection (net/pool.py) when the proxy verifies the
        client's answer itself and the router's choice has one with this login's key."""
        login, server = self.login, self.server
        assert login is not None
        resp = login.response
        if not server.pool.idle or self._early is not None or resp is None \
                or resp.auth_plugin != "mysql_native_password" or not resp.auth_data \
                or self._origin is not None:
            return False
        started = _monotonic()
        self.namespace = server.router.namespace_of_user(self.user)
        tls = server.tls
        if tls.require_backend_tls or (login.client_tls and tls.sql is not None):
            return False  # the backend leg would be TLS: kept connections are plaintext
        candidates = server.router.candidates(namespace=self.namespace)
        if not candidates:
            return False
        salt = login.greeting.salt
        credential = server.credentials.recover(self.user, salt, resp.auth_data)
        if credential is None:
            return False  # a backend judges it (the password may be new, or wrong)
        kept = server.pool.take(candidates[0], login.pool_key(), credential)
        if kept is None:
            return False  # (or one the server verified with another password: its account's)
        backend = kept.backend
        server.got_backend(_monotonic() - started, True)
        self._native_exchange = (salt, resp.auth_data)
        self._verified = credential  # _take_credential need not recover it again
        self._authenticated = kept.login.authenticated
        self.backend, self.backend_leg, self.backend_tls = backend, kept.leg, False
        self.keepalive_unhealthy = False  # kept only while the backend is healthy
        backend.connections += 1
        self._run(login.pooled(kept.login.greeting, kept.login.ok))
        return True

    async def _make_room(self, backend: Backend) -> bool:
        """`backend` refused a connection as one too many: close a connection this worker
        keeps there (net/pool.py), if there is one and this login has not closed ROOM_TRIES
        already, and give the server a moment, longer each time, to free its place (it does
        once it has read the COM_QUIT). False: try no more."""
        if self._rooms_made >= ROOM_TRIES or not self.server.pool.make_room(backend):
            return False
        self._rooms_made += 1
        await asyncio.sleep(ROOM_WAIT * self._rooms_made)
        return True

    async def _in_place_of_kept(self, backend: Backend, refusal: bytes) -> bytes:
        """The backend refused the login (`refusal`, an ERR) after the password. If as one
        connection too many (MariaDB greets one beyond max_connections and refuses it then,
        for want of CONNECTION ADMIN), and the proxy can answer for the client (it verified
        its mysql_native_password answer), close a connection kept there (net/pool.py) and log
        in again on a new one: what comes back, OK or ERR, is the client's answer."""
        login = self.login
        assert login is not None
        exchange = self._native_exchange
        if parse_err(refusal).code != ER_CON_COUNT_ERROR or exchange is None or login.backend_tls:
            return refusal
        credential = self.server.credentials.recover(self.user, *exchange)
        if credential is None:
            return refusal
        while await self._make_room(backend):
            leg: BackendLeg | None = None
            try:
                leg = await BackendLeg.open(backend.host, backend.port,
                                            header=self.backend_header())
                answer = await self._log_in_again(leg, credential)
            except (OSError, TimeoutError, ProtocolError):  # the client gets the refusal
                if leg is not None:
                    leg.abort()
                return refusal
            except BaseException:
                if leg is not None:
                    leg.abort()
                raise
            if answer[:1] == b"\x00":
                assert self.backend_leg is not None
                self.backend_leg.abort()
                self.backend_leg = leg
                self.set_backend_keepalive(leg, bool(backend.health))
                return answer
            leg.abort()
            if answer[:1] != b"\xff":
                break  # (not an answer the client's login could end with: the refusal is)
            refusal = answer
            if parse_err(answer).code != ER_CON_COUNT_ERROR:
                break
        return refusal

    async def _log_in_again(self, leg: BackendLeg, credential: bytes) -> bytes:
        """Log in on a new connection with the session's login, answering for the client;
        returns the backend's last packet (OK, or the ERR it refused the connection with)."""
        login = self.login
        assert login is not None
        _, payload = await leg.read_packet(CONNECT_TIMEOUT)
        if payload[:1] == b"\xff":
            return payload
        greeting = parse_greeting(payload)
        native = greeting.auth_plugin == "mysql_native_password"
        leg.write(login.native_response(greeting, native_answer(credential, greeting.salt)
                                        if native else None))
        while True:
            seq, payload = await leg.read_packet(CONNECT_TIMEOUT)
            if payload[:1] != b"\xfe":
                return payload
            switch = parse_auth_switch(payload)
            if switch.plugin != "mysql_native_password":
                raise ProtocolError(f"backend asks for {switch.plugin}", Origin.BACKEND)
            leg.write(frame(native_answer(credential, switch.data[:20]), seq + 1))

    def named_by_kill(self) -> None:
        """A KILL (in this worker or another) named this session: its backend connection is
        not kept when it ends (net/pool.py), so the thread id that KILL runs against never
        serves another client, however long the KILL takes to get there."""
        self._pool_login = None

    def keep_backend(self) -> bool:
        """The session ends between commands: hand its backend connection to the pool
        (net/pool.py) if it may serve the next login with the same key. False: close it."""
        login, backend, leg = self._pool_login, self.backend, self.backend_leg
        attached: object = leg.session if leg is not None else None
        credential = self.credential
        if login is None or backend is None or leg is None or leg is not login.leg \
                or attached is not self or not credential:  # (EMPTY_PASSWORD: no password)
            return False
        busy = any(task is not None and not task.done()
                   for task in (self._task, self._move_task, self._checkpoint_task))
        if busy or self._replaying or self.backend_tls or self._origin is not None \
                or self.dialect == "tidb" or self.user != login.key.user or self.role_changed \
                or self.state.profiling or self.backend_caps != login.backend_caps \
                or backend.draining or backend.health:
            return False  # COM_SET_OPTION, SET ROLE, profiles, a task on the leg, a backend leaving
        security = self.server.config().security
        state = self.state
        if "MariaDB" not in login.greeting.server_version or backend.keep_unfit != "" \
                or self.server.credentials.own_limits(self.user) \
                or _monotonic() - login.authenticated >= (security.auth_sync_interval or 60.0) \
                or (login.key.database is None
                    and (not state.database_known or state.database is not None)):
            return False  # what a reset would not give back, or the server's check is due
        return self.server.pool.keep(backend, login, credential)


def too_many(e: BaseException) -> TypeGuard[BackendRefusedError]:
    """Whether a backend refused a new connection as one too many (its max_connections)."""
    return isinstance(e, BackendRefusedError) and e.code == ER_CON_COUNT_ERROR
