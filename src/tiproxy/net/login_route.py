"""The login's way to a backend: the backends to try, best first, and on the first that greets
the client's answer, then the backend's side of the authentication relayed until OK or ERR.

A backend connected before the greeting (`_connect_early`) is tried first while it is still a
choice for the user's namespace; its salt is the one the client answered, so the response goes
to it as it is. Any other backend greets a new connection, and the login (session/login.py)
says what to answer it: the response as it came, one rewritten for the backend's salt after an
auth switch, or TLS first. A backend that fails is counted against (server.dial_failed) and the
next one tried; one that refuses a connection as one too many while this worker keeps idle
connections there gets one of them closed and is tried again (net/kept.py). One that refuses it
as one too many otherwise is full, not down: the next one is tried, the backend stays a choice
for the next login, and if no backend takes this one the client gets the server's own 1040.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tiproxy.client.leg import CONNECT_TIMEOUT, BackendLeg
from tiproxy.net.keepalive import apply_keepalive
from tiproxy.net.kept import too_many
from tiproxy.net.login_phase import CLOSED, LOGIN, LOGIN_TIMEOUT, reason_of
from tiproxy.protocol.constants import ER_CON_COUNT_ERROR, Capability
from tiproxy.protocol.errors import BackendRefusedError, Origin, ProtocolError
from tiproxy.protocol.packets import Greeting, parse_auth_switch, parse_greeting
from tiproxy.session.login_actions import Action, BackendUnfit, SendBackend, StartBackendTLS
from tiproxy.views import counters

if TYPE_CHECKING:
    from tiproxy.balance.router import Backend
    from tiproxy.net.server import ProxyServer
    from tiproxy.session.login import Login

log = logging.getLogger("tiproxy.session")

# Early backend connections (before the greeting) waiting for their clients at once, at most:
# a burst of connections that never log in cannot take more of the backends' connections.
EARLY_LEGS_MAX = 64
SALT_LENGTH = 20  # the greeting's salt the proxy can hand on (8 + 12 bytes)
_monotonic = time.monotonic


class LoginRoute:
    """Mixed into Session (net/relay.py), whose attributes it uses."""

    # Provided by Session and its other mixins.
    server: ProxyServer
    id: int
    phase: int
    user: str
    namespace: str
    dialect: str
    login: Login | None
    backend: Backend | None
    backend_leg: BackendLeg | None
    backend_tls: bool
    keepalive_unhealthy: bool
    _early: tuple[Backend, BackendLeg, Greeting] | None
    _early_seconds: float
    _native_salt: bytes | None
    _native_exchange: tuple[bytes, bytes] | None

    if TYPE_CHECKING:  # provided by Session and its other mixins: for the type checker only
        def close(self, reason: str, quiet: bool = False, kind: str = "") -> None: ...
        def backend_header(self) -> bytes | None: ...
        def _run(self, actions: Sequence[Action]) -> None: ...
        def _protocol_error(self, e: ProtocolError) -> None: ...
        def _refuse(self, seq: int, message: str, reason: str, code: int = ...,
                    sqlstate: str = ..., *, kind: str) -> None: ...
        def _refuse_no_backend(self, seq: int) -> None: ...
        async def _make_room(self, backend: Backend) -> bool: ...
        async def _in_place_of_kept(self, backend: Backend, refusal: bytes) -> bytes: ...

    async def _connect_early(self) -> Greeting | None:
        """Connect to the backend this session will most likely use before greeting the client,
        and greet with that backend's salt (session/login.py: the auth switch round trip is
        saved). Only where the backend does not depend on the user (no user namespaces), and
        only while clients are logging in (server.logins_recently): a proxy probed by a load
        balancer's TCP checks and nothing else opens no backend connections for them."""
        server, router = self.server, self.server.router
        if router.user_namespaces or server.early_legs >= EARLY_LEGS_MAX \
                or server.config().proxy.proxy_protocol:  # its header needs the client's own
            return None
        for backend in router.candidates()[:1]:
            leg: BackendLeg | None = None
            server.early_legs += 1
            started = _monotonic()
            try:
                leg = await BackendLeg.open(backend.host, backend.port)
                _, payload = await leg.read_packet(CONNECT_TIMEOUT)
                greeting = parse_greeting(payload) if payload[:1] != b"\xff" else None
            except (OSError, TimeoutError, ProtocolError) as e:
                server.dial_failed(backend, reason_of(e))
                return None
            else:
                if greeting is None or not greeting.capabilities & Capability.PLUGIN_AUTH \
                        or len(greeting.salt) != SALT_LENGTH:
                    return None  # the usual path, with a greeting of the proxy's own
                router.succeeded(backend, greeting)
                self._early = (backend, leg, greeting)
                self._early_seconds = _monotonic() - started
                backend.connections += 1  # counted now, so that a burst spreads
                return greeting
            finally:
                if self._early is None:
                    server.early_legs -= 1
                    if leg is not None:
                        leg.abort()
        return None

    def _candidates(self) -> tuple[list[Backend], tuple[Backend, BackendLeg, Greeting] | None]:
        """The backends to try for this login, best first: the early one first while it is
        still a choice for the user's namespace (else its connection is dropped)."""
        candidates = self.server.router.candidates(namespace=self.namespace)
        early = self._take_early()
        if early is not None and early[0] in candidates:
            return [early[0], *(b for b in candidates if b is not early[0])], early
        if early is not None:
            early[1].abort()
        return candidates, None

    def _take_early(self) -> tuple[Backend, BackendLeg, Greeting] | None:
        """The early backend connection, for the route to use or drop; nobody else's."""
        early, self._early = self._early, None
        if early is not None:
            self.server.early_legs -= 1
            early[0].connections -= 1  # counted again if the login goes through on it
        return early

    async def _route(self) -> None:
        assert self.login is not None
        login = self.login
        self.namespace = self.server.router.namespace_of_user(self.user)
        started = _monotonic()
        unfit = ""
        full: BackendRefusedError | None = None  # a backend's 1040: full right now, not down
        candidates, early = self._candidates()
        while candidates:
            backend = candidates.pop(0)
            if self.phase == CLOSED:
                if early is not None:
                    early[1].abort()
                return
            leg: BackendLeg | None = None
            try:
                mine = early if early is not None and backend is early[0] else None
                early = None if mine is not None else early
                if mine is not None:  # the login waited for it before the greeting
                    started -= self._early_seconds
                leg, actions = await self._backend_greeting(backend, mine)
                self.set_backend_keepalive(leg, bool(backend.health))
                if isinstance(actions[0], BackendUnfit):
                    unfit = f"{actions[0].reason} ({backend.addr})"
                    leg.abort()
                    continue
                await self._backend_handshake(leg, backend, actions)
            except (OSError, TimeoutError, ProtocolError, ssl.SSLError) as e:
                login.backend_failed()
                if leg is not None:
                    leg.abort()
                if too_many(e) and await self._make_room(backend):
                    candidates.insert(0, backend)
                elif too_many(e):
                    # At max_connections now, and may take the next login: no back-off for
                    # everyone's logins, the next backend for this one, else its own 1040.
                    full = e
                    self.server.dial_refused(backend)
                else:
                    self.server.dial_failed(backend, reason_of(e))
                continue
            except BaseException:  # cancelled: the session is closing
                for other in (leg, early[1] if early is not None else None):
                    if other is not None:
                        other.abort()
                raise
            if self.phase == CLOSED:
                leg.abort()
                return
            self.server.got_backend(_monotonic() - started, True)
            await self._attached(backend, leg)
            return
        self.server.got_backend(_monotonic() - started, False)
        self._no_backend_took_it(login.client_reply_seq, unfit, full)

    def _no_backend_took_it(self, seq: int, unfit: str, full: BackendRefusedError | None) -> None:
        """The client's answer when no backend took the login: a full backend's own 1040 (what
        a client of that server would get), why none fits the login, or that none is up."""
        if full is not None:
            self._refuse(seq, full.message, str(full), code=ER_CON_COUNT_ERROR,
                         sqlstate=full.sqlstate, kind=counters.NO_BACKEND)
        elif unfit:
            log.warning("session %d: %s", self.id, unfit)
            self._refuse(seq, f"TiProxy: {unfit}", "no backend fits",
                         kind=counters.BACKEND_HANDSHAKE)
        else:
            self._refuse_no_backend(seq)

    async def _attached(self, backend: Backend, leg: BackendLeg) -> None:
        """The login goes on with `backend`, which has answered the client's response."""
        login = self.login
        assert login is not None
        self.backend = backend
        self.backend_leg = leg
        self.backend_tls = login.backend_tls
        backend.connections += 1
        greeting = login.backend_greeting
        if greeting is not None and "TiDB" in greeting.server_version:
            self.dialect = "tidb"
        await self._relay_login(leg, backend)

    async def _backend_greeting(self, backend: Backend,
                                early: tuple[Backend, BackendLeg, Greeting] | None
                                ) -> tuple[BackendLeg, list[Action]]:
        """A leg to `backend` that has greeted, and what the login answers its greeting."""
        login = self.login
        assert login is not None
        if early is not None and (early[1].closed or not early[1].clean):
            early[1].abort()  # the backend hung up while the client was answering: a new leg
            early = None
        leg = early[1] if early is not None else \
            await BackendLeg.open(backend.host, backend.port, header=self.backend_header())
        try:
            if early is not None:
                actions = login.backend_greeted(early[2], early=True)
                resp = login.response
                if resp is not None and resp.auth_plugin == "mysql_native_password":
                    # The client answered the backend's own salt: the exchange to recover the
                    # credential from, unless the backend switches plugins after all.
                    self._native_exchange = (login.greeting.salt, resp.auth_data)
                return leg, actions
            _, payload = await leg.read_packet(CONNECT_TIMEOUT)
            actions = login.backend_greeting_received(payload)
        except BaseException:
            leg.abort()
            raise
        self.server.router.succeeded(backend, login.backend_greeting)
        return leg, actions

    def set_backend_keepalive(self, leg: BackendLeg | None, unhealthy: bool) -> None:
        """The backend socket's keep-alive, by the health of its backend."""
        proxy = self.server.config().proxy
        cfg = proxy.backend_unhealthy_keepalive if unhealthy else proxy.backend_healthy_keepalive
        apply_keepalive(leg.transport if leg is not None else None, cfg)
        self.keepalive_unhealthy = unhealthy

    async def _backend_handshake(self, leg: BackendLeg, backend: Backend,
                                 actions: Sequence[Action]) -> None:
        """Send the client's response to the backend, after TLS if the login chose it."""
        for action in actions:
            if isinstance(action, StartBackendTLS):
                ctx = self.server.tls.sql
                if ctx is None:  # sql-tls turned off by a reload during this login
                    raise ProtocolError("sql-tls was turned off during the login", Origin.PROXY)
                await leg.start_tls(ctx, backend.host)
            elif isinstance(action, SendBackend):
                leg.write(action.data)

    async def _relay_login(self, leg: BackendLeg, backend: Backend) -> None:
        """Relay the backend's side of the authentication until OK or ERR."""
        assert self.login is not None
        try:
            while self.phase == LOGIN:
                seq, payload = await leg.read_packet(LOGIN_TIMEOUT)
                if payload[:1] == b"\xfe":
                    self._native_exchange = None
                    switch = parse_auth_switch(payload)
                    native = switch.plugin == "mysql_native_password"
                    self._native_salt = switch.data[:20] if native else None
                elif payload[:1] == b"\xff" and self.server.pool.holds(backend):
                    payload = await self._in_place_of_kept(backend, payload)
                self._run(self.login.backend_packet(seq, payload))
        except ProtocolError as e:
            self._protocol_error(e)
        except (OSError, TimeoutError) as e:
            self.close(f"backend failed during login: {reason_of(e)}",
                       kind=counters.BACKEND_HANDSHAKE)
