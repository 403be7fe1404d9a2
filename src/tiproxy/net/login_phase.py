"""A session's login phase: from the greeting to the command phase (the driver of
session/login.py's state machine, and the backend's leg it routes the session to).

Theory of operation
-------------------
The proxy greets the client with its own salt and connection id, or, while clients are logging
in, with the salt of a backend connected before the greeting (`_connect_early`: the client's
answer is then valid for that backend as it is). Every packet of the login is read whole and
given to `Login`, whose actions (`SendClient`, `SendBackend`, `Route`, `StartClientTLS`,
`StartBackendTLS`, `Established`, `Refused`) are carried out here. `Route` picks the backends to
try, best first; the client's handshake response goes to the first that greets, after TLS if
the login chose it, and the backend's side of the authentication is relayed until OK or ERR.
Then the session enters the command phase (net/relay.py's hot path). The way to a backend, from
the early connection to the backend's OK, is net/login_route.py's. A login the proxy can verify
itself may be served on a backend connection kept from an earlier session instead (net/kept.py,
net/pool.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import time
from collections.abc import Sequence
from contextlib import closing
from typing import TYPE_CHECKING, Any

from tiproxy.client.leg import BackendLeg
from tiproxy.net.pool import PoolLogin
from tiproxy.protocol.compress import Decompressor
from tiproxy.protocol.constants import (
    ER_ACCESS_DENIED_ERROR,
    ER_CON_COUNT_ERROR,
    Capability,
)
from tiproxy.protocol.errors import Origin, ProtocolError
from tiproxy.protocol.framer import PacketSplitter
from tiproxy.protocol.packets import (
    Greeting,
    HandshakeResponse,
    build_err,
    frame,
)
from tiproxy.protocol.tracker import ResponseTracker
from tiproxy.session.login import Login
from tiproxy.session.login_actions import (
    Action,
    Established,
    Refused,
    Route,
    SendBackend,
    SendClient,
    StartClientTLS,
)
from tiproxy.session.state import SessionState
from tiproxy.tls import peer_cn_allowed
from tiproxy.tls.upgrade import start_server_tls
from tiproxy.views import counters

if TYPE_CHECKING:
    from tiproxy.balance.router import Backend
    from tiproxy.net.server import ProxyServer

log = logging.getLogger("tiproxy.session")

ER_UNKNOWN_ERROR = 1105
LOGIN_PACKET_LIMIT = 1 << 20  # a handshake response with connect attributes is a few KiB
LOGIN_TIMEOUT = 30.0  # a client that does not finish logging in by then is cut off
NO_CREDENTIAL = "no reusable credential"
PASSWORD_CHANGED = "the account's password changed since the session logged in"  # noqa: S105
EMPTY_PASSWORD = b""  # the credential of a user without a password (else SHA1(password))
LOGIN, COMMAND, CLOSED = 0, 1, 2
_monotonic = time.monotonic


class SessionLogin:
    """Mixed into Session (net/relay.py), whose attributes it uses."""

    # Provided by Session.
    server: ProxyServer
    client: asyncio.Transport
    id: int
    peer: str
    phase: int
    backend: Backend | None
    backend_leg: BackendLeg | None
    bt: asyncio.Transport | None
    backend_connection_id: int
    backend_caps: int
    client_caps: int
    mariadb_caps: int
    _multi: bool
    dialect: str
    user: str
    namespace: str
    login_response: HandshakeResponse | None
    credential: bytes | None
    state: SessionState
    tracker: ResponseTracker | None
    role_changed: bool
    _replaying: bool
    _move_task: asyncio.Task[None] | None
    _checkpoint_task: asyncio.Task[None] | None
    client_tls: bool
    client_raw: asyncio.Transport | None = None  # the TCP transport under the client's TLS one
    backend_tls: bool
    keepalive_unhealthy: bool
    _task: asyncio.Task[None] | None
    _decompress: Decompressor | None
    _pp: bytearray | None
    _opened: float

    if TYPE_CHECKING:  # provided by Session (net/relay.py): declared for the type checker only
        def close(self, reason: str, quiet: bool = False, kind: str = "") -> None: ...
        def send_client(self, data: bytes) -> None: ...
        def client_data(self, data: bytes) -> None: ...
        def _client_proxy_header(self, data: bytes) -> bytes: ...  # net/client_origin.py
        def recheck_move(self) -> None: ...  # net/moves.py
        def bound_writes(self, transport: asyncio.BaseTransport | None) -> None: ...
        def _response_done(self, token: Any, status: int, failed: bool) -> None: ...
        def _protocol_error(self, e: ProtocolError) -> None: ...
        def replay_configured(self, enabled: bool, limit: int) -> None: ...
        def follow_capture(self, sink: Any, fresh: bool = False) -> None: ...
        def _take_kept(self) -> bool: ...  # net/kept.py
        async def _make_room(self, backend: Backend) -> bool: ...
        async def _in_place_of_kept(self, backend: Backend, refusal: bytes) -> bytes: ...
        async def _connect_early(self) -> Greeting | None: ...  # net/login_route.py
        async def _route(self) -> None: ...

    def _login_fields(self) -> None:
        """What the login phase keeps, from its start."""
        self.login: Login | None = None
        self._splitter = PacketSplitter(LOGIN_PACKET_LIMIT, Origin.CLIENT)
        self._native_salt: bytes | None = None  # a native-password auth switch in progress
        self._native_exchange: tuple[bytes, bytes] | None = None  # (salt, client's scramble)
        # The native-password salt the client last answered: Connector/C answers a
        # COM_CHANGE_USER's auth switch with it whatever salt the switch carries.
        self.client_salt: bytes | None = None
        # COM_CHANGE_USER on a backend whose salt the client never saw (after a move): the
        # backend's salt and the user, while the client answers client_salt instead.
        self._switch_salt: tuple[bytes, str] | None = None
        self._changing_to: str | None = None  # the user a COM_CHANGE_USER in flight names
        self._tls_early: bytearray | None = None  # client bytes while its TLS is set up
        self._tls_refusal = ""  # why the client's certificate is not accepted
        # A backend connected before the greeting: (backend, leg, its greeting)
        self._early: tuple[Backend, BackendLeg, Greeting] | None = None
        # With [proxy] backend-pool-size: what keeping the backend connection when the session
        # ends needs of the login (net/pool.py); None once it no longer holds
        self._pool_login: PoolLogin | None = None
        self._verified: bytes | None = None  # SHA1(password), as _take_kept recovered it
        self._authenticated = 0.0  # when the server last checked the account on this leg

    def _refuse_at_once(self, kind: str, message: str) -> None:
        """Before the greeting (max-connections, memory): MySQL's 1040, as a server full."""
        log.warning("session %d from %s refused: %s", self.id, self.peer, message)
        self.server.rejected[kind] += 1
        self.send_client(frame(build_err(ER_CON_COUNT_ERROR, "08004", message), 0))
        self.close(message, quiet=True)

    # -- login ------------------------------------------------------------------------------

    def _greet_now(self) -> bool:
        """Greet at once with the proxy's own salt, when no early backend connection is worth
        making (`_greet`): False leaves the greeting to `_greet`."""
        server = self.server
        # A kept connection (net/pool.py) serves only a login that answered the proxy's salt.
        if server.router.template is None or (server.logins_recently() and not server.pool.idle):
            return False
        self._send_greeting(server.router.template, early=False)
        return True

    async def _greet(self) -> None:
        server = self.server
        router = server.router
        template = await self._connect_early() if server.logins_recently() else None
        if template is None and router.template is None:
            await self.server.probe_template()
            if router.template is None:
                self.server.got_backend(_monotonic() - self._opened, False)
                self._refuse_no_backend(0)
                return
        if self.phase == CLOSED:
            return  # close() dropped the early backend connection, if there was one
        greeting = template or router.template
        assert greeting is not None  # the probe found one, or the client was refused
        self._send_greeting(greeting, early=template is not None)

    def _send_greeting(self, template: Greeting, early: bool) -> None:
        tls = self.server.tls
        self.login = Login(template, self.id,
                           tls_available=tls.server is not None, sql_tls=tls.sql is not None,
                           require_backend_tls=tls.require_backend_tls, early_salt=early)
        self.client.write(self.login.start())

    def _login_client_data(self, data: bytes) -> None:
        if self._pp is not None:
            data = self._client_proxy_header(data)
            if not data:
                return
        if self._tls_early is not None:  # decrypted before start_tls returned: keep it
            self._tls_early += data
            return
        login = self.login
        try:
            with closing(self._splitter.feed(data)) as packets:
                for seq, payload in packets:
                    if login is None:
                        raise ProtocolError("client spoke before the greeting")
                    if self._native_salt is not None:
                        self._native_exchange = (self._native_salt, payload)
                        self._native_salt = None
                    self._run(login.client_packet(seq, payload))
                    if self.phase != LOGIN or self._tls_early is not None:
                        break
        except ProtocolError as e:
            self._protocol_error(e)
            return
        if self._tls_early is not None:
            # Whatever followed the SSLRequest is the start of the TLS handshake.
            self._start_client_tls(self._splitter.take_rest())
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
                assert self.backend_leg is not None
                self.backend_leg.write(action.data)
            elif isinstance(action, Route):
                self.user = action.user
                if not self.client_tls and self.server.tls.client_certificate_required:
                    self._tls_refusal = ("this proxy requires TLS with a client certificate "
                                         "(security.server-tls.ca)")
                if self._tls_refusal:
                    assert self.login is not None
                    self._refuse(self.login.client_reply_seq, f"TiProxy: {self._tls_refusal}",
                                 self._tls_refusal, ER_ACCESS_DENIED_ERROR, "28000",
                                 kind=counters.CLIENT_HANDSHAKE)
                    return
                if not self._take_kept():
                    self._task = asyncio.get_running_loop().create_task(self._route())
            elif isinstance(action, Established):
                self._established(action)
            elif isinstance(action, Refused):
                self.close(action.reason, quiet=True, kind=counters.AUTH_FAIL)
            elif isinstance(action, StartClientTLS):
                self._tls_early = bytearray()
                self.client.pause_reading()

    def _start_client_tls(self, early: bytes) -> None:
        """The client asked for TLS: upgrade its transport; `early` is what followed its
        SSLRequest in the same read (the start of its TLS handshake)."""
        ctx = self.server.tls.server
        if ctx is None:  # turned off by a reload since the greeting offered it
            self.close("TLS was turned off while the client logged in", kind=counters.PROXY_ERROR)
            return
        self._task = asyncio.get_running_loop().create_task(self._client_tls(ctx, early))

    async def _client_tls(self, ctx: ssl.SSLContext, early: bytes) -> None:
        raw = self.client
        try:
            self.client = await start_server_tls(raw, ctx, early, LOGIN_TIMEOUT)
            self.bound_writes(self.client)
        except (OSError, ssl.SSLError, TimeoutError) as e:
            self.close(f"TLS handshake with the client failed: {reason_of(e)}", quiet=True,
                       kind=counters.CLIENT_HANDSHAKE)
            return
        self.client_tls = True
        self.client_raw = raw
        refusal = peer_cn_allowed(self.server.tls.server_config,
                                  self.client.get_extra_info("peercert"))
        if refusal is not None:
            log.warning("session %d from %s refused: %s", self.id, self.peer, refusal)
            self._tls_refusal = refusal
        early_data, self._tls_early = self._tls_early, None
        if early_data:
            self._login_client_data(bytes(early_data))

    def _refuse_no_backend(self, seq: int) -> None:
        self._refuse(seq, "TiProxy: no backend is available, try again later",
                     "no backend available", kind=counters.NO_BACKEND)

    def _refuse(self, seq: int, message: str, reason: str,
                code: int = ER_UNKNOWN_ERROR, sqlstate: str = "HY000", *, kind: str) -> None:
        self.send_client(frame(build_err(code, sqlstate, message), seq))
        self.close(reason, kind=kind)

    def _established(self, est: Established) -> None:
        assert self.backend is not None and self.backend_leg is not None and self.login
        self.phase = COMMAND
        self.server.logging_in.pop(self, None)  # (Session is hashed by identity)
        self.backend_connection_id = est.backend_connection_id
        self.backend_caps = est.backend_capabilities
        self.client_caps = est.client_capabilities
        self.mariadb_caps = est.mariadb_capabilities
        self._multi = bool(est.client_capabilities & Capability.MULTI_STATEMENTS)
        self.login_response = self.login.response
        resp = self.login.response
        if resp is not None:
            with_db = bool(resp.capabilities & Capability.CONNECT_WITH_DB) and resp.database
            self.state.use(resp.database if with_db else None)
        deprecate_eof = bool(est.backend_capabilities & Capability.DEPRECATE_EOF)
        self.tracker = ResponseTracker(deprecate_eof, self._response_done, est.status)
        self.count_on(self.backend)
        self._traffic.handshakes.observe(_monotonic() - self._opened)
        if est.client_capabilities & Capability.COMPRESS:
            self._decompress = Decompressor()
        self._take_credential()
        proxy = self.server.config().proxy
        if proxy.backend_pool_size and self.login.backend_greeting is not None:
            self._pool_login = PoolLogin(self.login.pool_key(), self.backend_leg,
                                         self.login.backend_greeting, est.ok,
                                         est.backend_capabilities,
                                         self._authenticated or _monotonic())
        self.replay_configured(proxy.transaction_replay, proxy.transaction_replay_max_size)
        self.bt = self.backend_leg.transport
        self.bound_writes(self.bt)
        self.backend_leg.attach(self)  # type: ignore[arg-type]  # Session is the Owner
        self.server.logged_in()
        if self.server.capture is not None:
            self.follow_capture(self.server.capture, fresh=True)
        log.debug("session %d: %s@%s logged in on %s",
                  self.id, self.user, self.peer, self.backend.addr)

    def count_on(self, backend: Backend) -> None:
        """From now on the commands and traffic count on `backend` (a login, a move)."""
        self._traffic = self.server.metrics.backend(backend.addr)
        self._cross = self.server.router.cross_location(backend)
        self._ages = self.server.metrics.since_creation

    def _take_credential(self) -> None:
        """Keep SHA1(password) if this login proved it against a stored hash."""
        exchange, self._native_exchange = self._native_exchange, None
        self.credential = None
        self.client_salt = exchange[0] if exchange is not None else None
        if self.dialect == "tidb":
            self.state.no_credential = ""  # TiDB moves with a session token
            return
        if exchange is not None and not exchange[1]:
            # An empty answer to mysql_native_password that the backend accepted: the user has
            # no password, and an empty answer logs in anywhere the account is the same.
            self.credential = EMPTY_PASSWORD
        elif exchange is not None:
            verified, self._verified = self._verified, None
            self.credential = verified or self.server.credentials.recover(self.user, *exchange)
        self.state.no_credential = "" if self.credential is not None else NO_CREDENTIAL
        if self.credential is None and exchange is not None:
            self.server.refresh_credential(self, exchange)  # type: ignore[arg-type]  # stale?

    def credential_recovered(self, credential: bytes) -> None:
        """A refresh of the stored hashes verified this session's login after all."""
        self.credential = credential
        self.state.no_credential = ""
        self.recheck_move()

    def own_password_set(self, password: bytes) -> None:
        """The session set its own password in clear text (SET PASSWORD): a login elsewhere
        answers with it from now on, if its login was a mysql_native_password one (the account
        keeps its plugin)."""
        if self.dialect == "tidb" or self.client_salt is None:
            return
        self.credential = hashlib.sha1(password).digest() if password else EMPTY_PASSWORD  # noqa: S324
        self.state.no_credential = ""
        self.recheck_move()

    def credential_outdated(self) -> None:
        """The account's stored hash no longer matches this session's password: it was changed
        since the login (ALTER USER, SET PASSWORD). A login elsewhere would be refused, so the
        session stays where it is, and says why."""
        self.credential = None
        self.state.no_credential = PASSWORD_CHANGED
        log.info("session %d: the password of %s changed since it logged in: it cannot move",
                 self.id, self.user)
        self.recheck_move()

    def login_timed_out(self) -> None:
        """LOGIN_TIMEOUT after it connected (server.py's maintenance finds it)."""
        if self.phase == LOGIN:
            self.close(f"login not finished within {LOGIN_TIMEOUT:.0f}s",
                       kind=counters.CLIENT_HANDSHAKE)


def reason_of(e: BaseException) -> str:
    """An exception as a log line says it: its message, else its type."""
    return str(e) or type(e).__name__
