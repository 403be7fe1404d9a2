"""The connection phase of one session, from the proxy's greeting to the backend's OK or ERR.

Theory of operation
-------------------
The proxy greets the client with its own connection id and salt, in the image of a backend's
greeting (server version, character set), with only the capabilities the proxy can frame. The
client answers with a HandshakeResponse41 (after an SSLRequest and TLS, if it wants TLS). The
proxy then routes: the driver connects to a backend and hands over that backend's greeting. The
proxy forwards the client's response with an authentication plugin no server knows and no auth
data, so the backend answers with an AuthSwitchRequest carrying its own salt and the user's real
plugin. From there the proxy relays every packet both ways, renumbering the client's leg by one
if TLS added a packet, until the backend says OK (the session is established) or ERR (the client
gets the server's own error). Any plugin works this way (mysql_native_password, ed25519,
caching_sha2_password); the proxy never sees a password. A client without CLIENT_PLUGIN_AUTH
(mysqljs, old connectors) answers with a mysql_native_password scramble and can follow only a
switch to that plugin: the backend leg names the plugin for it, and a switch to another gets
the refusal MariaDB gives such a client itself (1251).

An early backend: when the driver connected to a backend before greeting the client, the proxy
greets with that backend's own salt and plugin (`early_salt`), so the client's answer is valid
for it as it is: that backend gets the client's response with its auth data untouched, and the
auth switch round trip on both legs is saved. Any other backend (the early one turned out unfit)
gets the forced switch as above, since the client's answer is bound to a salt it never issued.

TLS adds a packet on its leg: the client's SSLRequest (sequence id 1) before its response, and
the proxy's own SSLRequest to a backend when that leg uses TLS. TiProxy's three rules decide:
with `require-backend-tls` the leg is always TLS (a backend without TLS, or no `sql-tls`, is
refused); otherwise it is TLS when the client used TLS, `sql-tls` is configured and the backend
offers it; otherwise plaintext. Each leg numbers its packets on its own; `seq_shift` is how
far the client leg runs ahead of the backend leg (+1, 0 or -1).

    state      input                          next       actions
    GREETED    client SSLRequest              TLS        StartClientTLS
    GREETED    client HandshakeResponse       ROUTING    Route
    TLS        client HandshakeResponse       ROUTING    Route
    ROUTING    backend greeting               AUTH       SendBackend(response)
    ROUTING    backend greeting, TLS chosen   AUTH       SendBackend(SSLRequest),
                                                         StartBackendTLS, SendBackend(response)
    ROUTING    backend greeting, unfit        ROUTING    BackendUnfit (the driver tries another)
                 (no TLS where required, MariaDB capabilities missing)
    AUTH       backend 0xFE / 0x01 packet     AUTH       SendClient
    AUTH       client packet                  AUTH       SendBackend
    AUTH       backend OK                     DONE       SendClient, Established
    AUTH       backend ERR                    FAILED     SendClient, Refused
Anything else is a protocol error.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from tiproxy.protocol.auth import NATIVE_PLUGIN
from tiproxy.protocol.constants import (
    ER_NOT_SUPPORTED_AUTH_MODE,
    PER_LEG_CAPABILITIES,
    PROXY_CAPABILITIES,
    PROXY_MARIADB_CAPABILITIES,
    Capability,
)
from tiproxy.protocol.errors import BackendRefusedError, Origin, ProtocolError
from tiproxy.protocol.packets import (
    Greeting,
    HandshakeResponse,
    build_err,
    build_greeting,
    build_handshake_response,
    frame,
    parse_auth_switch,
    parse_err,
    parse_greeting,
    parse_handshake_response,
)
from tiproxy.protocol.responses import ok_status
from tiproxy.session.login_actions import (
    Action,
    BackendUnfit,
    Established,
    PoolKey,
    Refused,
    Route,
    SendBackend,
    SendClient,
    StartBackendTLS,
    StartClientTLS,
)

# Sent to the backend in place of the client's plugin: no server has it, so every server answers
# with an AuthSwitchRequest for the user's real plugin and a salt of its own.
FORCE_SWITCH_PLUGIN = "tiproxy_pass_through"


class LoginState(enum.Enum):
    GREETED = "greeted"
    TLS = "tls"
    ROUTING = "routing"
    AUTH = "auth"
    DONE = "done"
    FAILED = "failed"


# Any byte to a printable one that is not '$' (0x21-0x7D, '$' to '%'), as servers make salts.
_SALT_BYTES = bytes(0x21 + b % 0x5D if 0x21 + b % 0x5D != 0x24 else 0x25 for b in range(256))


def _with_capabilities(resp: HandshakeResponse, caps: int, ext: int) -> HandshakeResponse:
    return HandshakeResponse(
        capabilities=caps, max_packet=resp.max_packet, charset=resp.charset, user=resp.user,
        auth_data=resp.auth_data, database=resp.database, auth_plugin=resp.auth_plugin,
        attrs=resp.attrs, mariadb_capabilities=ext, ssl_request_only=resp.ssl_request_only,
        extra=resp.extra)


# os.urandom's bytes, fetched 4 KiB at a time: a getrandom call per login cost more than the
# rest of the salt. (Emptied in a forked child, which must not reuse the parent's.)
_RANDOM_BATCH = 4096
_random = bytearray()
os.register_at_fork(after_in_child=_random.clear)


def make_salt() -> bytes:
    """20 random printable bytes, never NUL or '$', as servers make them."""
    if len(_random) < 20:
        _random[:] = os.urandom(_RANDOM_BATCH)
    salt = _random[-20:].translate(_SALT_BYTES)
    del _random[-20:]
    return bytes(salt)


@contextmanager
def _backend_bytes() -> Iterator[None]:
    """Parsing what the backend sent: a protocol error in it is the backend's, not the client's."""
    try:
        yield
    except ProtocolError as e:
        e.origin = Origin.BACKEND
        raise


class Login:
    """See the module docstring. Feed packets in; carry out the actions that come back."""

    def __init__(self, template: Greeting, connection_id: int, tls_available: bool, *,
                 sql_tls: bool = False, require_backend_tls: bool = False,
                 early_salt: bool = False) -> None:
        caps = template.capabilities & PROXY_CAPABILITIES | Capability.PLUGIN_AUTH
        caps |= Capability.COMPRESS | Capability.LONG_PASSWORD  # compression is the proxy's own
        if tls_available:
            caps |= Capability.SSL
        else:
            caps &= ~Capability.SSL
        # A MariaDB backend clears CLIENT_MYSQL (bit 0) and offers extended capabilities: the
        # proxy offers those it can frame, the same way.
        ext = template.mariadb_capabilities & PROXY_MARIADB_CAPABILITIES
        if ext:
            caps &= ~Capability.LONG_PASSWORD
        self.early_salt = early_salt  # the template is the greeting of the early backend
        self.greeting = Greeting(  # (built whole: dataclasses.replace costs a login more)
            server_version=template.server_version,
            connection_id=connection_id,
            salt=template.salt if early_salt else make_salt(),
            capabilities=caps,
            charset=template.charset,
            status=template.status,
            auth_plugin=template.auth_plugin or "mysql_native_password",
            mariadb_capabilities=ext,
        )
        self.state = LoginState.GREETED
        self.response: HandshakeResponse | None = None
        self.backend_greeting: Greeting | None = None
        self._sql_tls = sql_tls  # the proxy can speak TLS to backends (`sql-tls`)
        self._require_backend_tls = require_backend_tls
        self.client_tls = False  # the client sent an SSLRequest
        self.backend_tls = False  # the proxy sent one to the backend
        self._backend_caps = 0
        self._backend_ext = 0
        self.plugin_auth = True  # the client speaks CLIENT_PLUGIN_AUTH (auth switches)

    @property
    def seq_shift(self) -> int:
        """How far the client leg's sequence ids run ahead of the backend's."""
        return self.client_tls - self.backend_tls

    @property
    def client_reply_seq(self) -> int:
        """The sequence id of the proxy's answer to the client's handshake response."""
        return 2 + self.client_tls

    def start(self) -> bytes:
        return frame(build_greeting(self.greeting), 0)

    @property
    def client_capabilities(self) -> int:
        return self.response.capabilities if self.response else 0

    def client_packet(self, seq: int, payload: bytes) -> list[Action]:
        state = self.state
        if state in (LoginState.GREETED, LoginState.TLS):
            return self._client_response(seq, payload)
        if state is LoginState.AUTH:
            return [SendBackend(frame(payload, seq - self.seq_shift))]
        raise ProtocolError(f"client sent a packet during the {state.value} step of login")

    def _client_response(self, seq: int, payload: bytes) -> list[Action]:
        resp = parse_handshake_response(payload)
        # Bit 0 is the client's own statement (CLIENT_MYSQL: no MariaDB extensions): kept.
        offered = self.greeting.capabilities | Capability.LONG_PASSWORD
        resp = _with_capabilities(resp, resp.capabilities & offered,
                                  resp.mariadb_capabilities & self.greeting.mariadb_capabilities)
        if resp.ssl_request_only:
            if self.state is LoginState.TLS or not resp.capabilities & Capability.SSL:
                raise ProtocolError("SSLRequest where a handshake response was due")
            self.state = LoginState.TLS
            self.client_tls = True
            return [StartClientTLS()]
        if seq != 1 + self.client_tls:
            raise ProtocolError(f"handshake response with sequence id {seq}")
        if not resp.capabilities & Capability.PLUGIN_AUTH:
            # From before pluggable authentication (mysqljs, old connectors): the answer is a
            # mysql_native_password scramble. The backend leg names the plugin.
            if not resp.capabilities & Capability.SECURE_CONNECTION:
                return self._not_supported("the client answers with the pre-4.1 password hash")
            resp = replace(resp, auth_plugin=NATIVE_PLUGIN)
            self.plugin_auth = False
        self.response = resp
        self.state = LoginState.ROUTING
        db = resp.database.decode("utf-8", "replace") if resp.database else None
        return [Route(resp.user.decode("utf-8", "replace"), db)]

    def backend_greeting_received(self, payload: bytes) -> list[Action]:
        """The driver connected to a backend; this is its first packet."""
        with _backend_bytes():
            if payload[:1] == b"\xff":
                err = parse_err(payload)
                raise BackendRefusedError(err.code, err.message, err.sqlstate)
            greeting = parse_greeting(payload)
        return self.backend_greeted(greeting)

    def backend_greeted(self, greeting: Greeting, early: bool = False) -> list[Action]:
        """The backend's greeting, parsed. `early`: the backend whose salt the client's
        greeting carried (the driver parsed its greeting before the client's)."""
        if self.state is not LoginState.ROUTING or self.response is None:
            raise ProtocolError("backend greeting out of turn", Origin.PROXY)
        if not greeting.capabilities & Capability.PLUGIN_AUTH:
            raise ProtocolError("backend does not support pluggable authentication", Origin.BACKEND)
        self.backend_greeting = greeting
        missing = self.response.mariadb_capabilities & ~greeting.mariadb_capabilities
        if missing:
            return [BackendUnfit(f"the backend lacks MariaDB capabilities 0x{missing:x} that the "
                                 "client negotiated")]
        offers_tls = bool(greeting.capabilities & Capability.SSL)
        if self._require_backend_tls and not (offers_tls and self._sql_tls):
            why = ("sql-tls is not configured" if not self._sql_tls
                   else "the backend does not offer TLS")
            return [BackendUnfit(f"require-backend-tls is set, but {why}")]
        tls = offers_tls and self._sql_tls and (self._require_backend_tls or self.client_tls)
        forwarded = self._forwarded(tls, early and self.early_salt)
        self._backend_caps = forwarded.capabilities
        self._backend_ext = forwarded.mariadb_capabilities
        self.backend_tls = tls
        self.state = LoginState.AUTH
        response = SendBackend(frame(build_handshake_response(forwarded), 1 + tls))
        if not tls:
            return [response]
        ssl_request = replace(forwarded, ssl_request_only=True)
        return [SendBackend(frame(build_handshake_response(ssl_request), 1)),
                StartBackendTLS(), response]

    def pool_key(self) -> PoolKey:
        """What a kept backend connection must share with this login to serve it (net/pool.py):
        the backend leg's capabilities follow from the client's and the backend's own."""
        resp = self.response
        assert resp is not None
        return PoolKey(resp.user.decode("utf-8", "replace"),
                       resp.database if resp.capabilities & Capability.CONNECT_WITH_DB
                       and resp.database else None,
                       resp.capabilities & ~PER_LEG_CAPABILITIES, resp.mariadb_capabilities,
                       resp.charset)

    def pooled(self, greeting: Greeting, ok: bytes) -> list[Action]:
        """Routed to a kept connection (net/pool.py) whose first login had this login's key
        and ended with `ok`, the backend's greeting then `greeting`: the client gets that OK."""
        if self.state is not LoginState.ROUTING or self.response is None:
            raise ProtocolError("kept connection out of turn", Origin.PROXY)
        self.backend_greeting = greeting
        caps, ext = self._backend_leg(tls=False)
        self.state = LoginState.DONE
        return [
            SendClient(frame(ok, self.client_reply_seq)),
            Established(
                client_capabilities=self.response.capabilities,
                mariadb_capabilities=ext,
                backend_capabilities=caps,
                status=ok_status(ok, 0, len(ok)),
                backend_connection_id=greeting.connection_id,
                user=self.response.user.decode("utf-8", "replace"),
                ok=ok,
            ),
        ]

    def native_response(self, greeting: Greeting, auth: bytes | None) -> bytes:
        """The response for a new plaintext connection to the backend this login is on, which
        greeted with `greeting`, the proxy answering its salt with `auth` (mysql_native_password)
        in the client's place, or (None: the greeting named another plugin) asking for the
        switch to the user's own: its login refused as one too many, the session's is tried
        again (net/kept.py). Its OK is then the client's."""
        if self.state is not LoginState.AUTH or self.backend_tls:
            raise ProtocolError("a login again out of turn", Origin.PROXY)
        self.backend_greeting = greeting
        forwarded = self._forwarded(tls=False)  # the forced switch: no auth data
        if auth is not None:
            forwarded = replace(forwarded, auth_data=auth, auth_plugin=NATIVE_PLUGIN)
        return frame(build_handshake_response(forwarded), 1)

    def backend_failed(self) -> None:
        """The backend leg broke before its answer (its TLS handshake): try another."""
        if self.state is LoginState.AUTH:
            self.state = LoginState.ROUTING
            self.backend_tls = False

    def _backend_leg(self, tls: bool) -> tuple[int, int]:
        """The capabilities and MariaDB capabilities the backend leg negotiates."""
        resp, greeting = self.response, self.backend_greeting
        assert resp is not None and greeting is not None
        caps = resp.capabilities & ~PER_LEG_CAPABILITIES & greeting.capabilities
        caps |= Capability.PLUGIN_AUTH | Capability.LONG_PASSWORD
        ext = resp.mariadb_capabilities & greeting.mariadb_capabilities
        if ext:
            caps &= ~Capability.LONG_PASSWORD  # CLIENT_MYSQL clear: the extension is read
        if tls:
            caps |= Capability.SSL
        return caps, ext

    def _forwarded(self, tls: bool, same_salt: bool = False) -> HandshakeResponse:
        resp = self.response
        assert resp is not None
        caps, ext = self._backend_leg(tls)
        return replace(
            resp,
            capabilities=caps,
            auth_data=resp.auth_data if same_salt else b"",
            auth_plugin=resp.auth_plugin if same_salt else FORCE_SWITCH_PLUGIN,
            mariadb_capabilities=ext,
            ssl_request_only=False,
        )

    def backend_packet(self, seq: int, payload: bytes) -> list[Action]:
        if self.state is not LoginState.AUTH or not payload:
            raise ProtocolError("backend sent a packet out of turn during login", Origin.BACKEND)
        out = frame(payload, seq + self.seq_shift)
        first = payload[0]
        if first == 0x00:
            with _backend_bytes():
                status = ok_status(payload, 0, len(payload))
            self.state = LoginState.DONE
            assert self.response is not None and self.backend_greeting is not None
            return [
                SendClient(out),
                Established(
                    client_capabilities=self.response.capabilities,
                    mariadb_capabilities=self._backend_ext,
                    backend_capabilities=self._backend_caps,
                    status=status,
                    backend_connection_id=self.backend_greeting.connection_id,
                    user=self.response.user.decode("utf-8", "replace"),
                    ok=payload,
                ),
            ]
        if first == 0xFF:
            with _backend_bytes():
                err = parse_err(payload)
            self.state = LoginState.FAILED
            return [SendClient(out), Refused(f"backend refused login: {err.code} {err.message}")]
        if first == 0xFE and not self.plugin_auth:
            with _backend_bytes():
                plugin = parse_auth_switch(payload).plugin
            if plugin != NATIVE_PLUGIN:  # what the server tells such a client itself
                return self._not_supported(f"the account uses {plugin}")
        return [SendClient(out)]

    def _not_supported(self, why: str) -> list[Action]:
        """MariaDB's answer to a client that cannot speak the account's authentication."""
        self.state = LoginState.FAILED
        err = build_err(ER_NOT_SUPPORTED_AUTH_MODE, "08004",
                        "Client does not support authentication protocol requested by server; "
                        "consider upgrading MariaDB client")
        return [SendClient(frame(err, self.client_reply_seq)),
                Refused(f"client without pluggable authentication: {why}")]
