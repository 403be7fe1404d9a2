"""The connection phase as transcripts: the proxy's greeting, the client's response, the forced auth
switch, the relay of auth rounds with their sequence ids, and how it ends (OK or ERR).

Each transcript is fed through a PacketSplitter per leg, whole and byte at a time, and must give
the same actions. Reference: https://mariadb.com/kb/en/connection/
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any

import pytest

from tiproxy.protocol.codec import lenenc_bytes
from tiproxy.protocol.constants import Capability, MariaDBCapability, ServerStatus
from tiproxy.protocol.errors import Origin, ProtocolError
from tiproxy.protocol.framer import PacketSplitter
from tiproxy.protocol.packets import (
    Greeting,
    HandshakeResponse,
    build_auth_switch,
    build_err,
    build_greeting,
    build_handshake_response,
    build_ok,
    frame,
    parse_err,
    parse_greeting,
    parse_handshake_response,
)
from tiproxy.session.login import (
    FORCE_SWITCH_PLUGIN,
    Login,
    LoginState,
    _with_capabilities,
    make_salt,
)
from tiproxy.session.login_actions import (
    Action,
    BackendUnfit,
    Established,
    Refused,
    Route,
    SendBackend,
    SendClient,
    StartClientTLS,
)

C = Capability
AUTOCOMMIT = int(ServerStatus.AUTOCOMMIT)

SERVER_CAPS = (
    C.FOUND_ROWS | C.LONG_FLAG | C.CONNECT_WITH_DB | C.NO_SCHEMA | C.COMPRESS | C.ODBC
    | C.LOCAL_FILES | C.IGNORE_SPACE | C.PROTOCOL_41 | C.INTERACTIVE | C.SSL | C.IGNORE_SIGPIPE
    | C.TRANSACTIONS | C.RESERVED | C.SECURE_CONNECTION | C.MULTI_STATEMENTS | C.MULTI_RESULTS
    | C.PS_MULTI_RESULTS | C.PLUGIN_AUTH | C.CONNECT_ATTRS | C.PLUGIN_AUTH_LENENC_CLIENT_DATA
    | C.CAN_HANDLE_EXPIRED_PASSWORDS | C.SESSION_TRACK | C.DEPRECATE_EOF
    | C.OPTIONAL_RESULTSET_METADATA | C.ZSTD_COMPRESSION | C.QUERY_ATTRIBUTES
    | C.MULTI_FACTOR_AUTH | C.CAPABILITY_EXTENSION | C.SSL_VERIFY_SERVER_CERT | C.REMEMBER_OPTIONS
)  # fmt: skip

# A backend's greeting, used as the template of the proxy's own.
M = MariaDBCapability

TEMPLATE = Greeting(
    server_version="5.5.5-10.11.6-MariaDB",
    connection_id=77,
    salt=b"TEMPLATESALTTEMPLATE",
    capabilities=SERVER_CAPS,  # LONG_PASSWORD (CLIENT_MYSQL) clear: MariaDB extensions follow
    charset=45,
    status=AUTOCOMMIT,
    auth_plugin="mysql_native_password",
    mariadb_capabilities=0x1F,
)
BACKEND = replace(TEMPLATE, connection_id=555, salt=b"backendsalt-01234567")

CLIENT_CAPS = (
    C.LONG_PASSWORD | C.FOUND_ROWS | C.LONG_FLAG | C.CONNECT_WITH_DB | C.LOCAL_FILES
    | C.PROTOCOL_41 | C.TRANSACTIONS | C.SECURE_CONNECTION | C.MULTI_STATEMENTS
    | C.MULTI_RESULTS | C.PS_MULTI_RESULTS | C.PLUGIN_AUTH | C.CONNECT_ATTRS
    | C.PLUGIN_AUTH_LENENC_CLIENT_DATA | C.SESSION_TRACK | C.DEPRECATE_EOF | C.COMPRESS
    | C.QUERY_ATTRIBUTES | C.ZSTD_COMPRESSION  # asked for, never offered
)  # fmt: skip
ATTRS = lenenc_bytes(lenenc_bytes(b"_client_name") + lenenc_bytes(b"libmariadb"))
RESPONSE = HandshakeResponse(
    capabilities=CLIENT_CAPS,
    max_packet=1 << 24,
    charset=224,
    user=b"app",
    auth_data=bytes(range(1, 21)),
    database=b"shop",
    auth_plugin="mysql_native_password",
    attrs=ATTRS,
)
SWITCH = build_auth_switch("mysql_native_password", b"fresh-backend-salt!!\0")
SCRAMBLE = bytes(range(100, 120))
OK = build_ok(AUTOCOMMIT)
DENIED = build_err(1045, "28000", "Access denied for user 'app'@'10.0.0.1' (using password: YES)")

# What the client may negotiate through the proxy, and the backend leg.
CLIENT_LEG = int(CLIENT_CAPS & ~(C.QUERY_ATTRIBUTES | C.ZSTD_COMPRESSION))
BACKEND_LEG = CLIENT_LEG & ~C.COMPRESS


def greeting_of(login: Login) -> tuple[int, Greeting]:
    [(seq, payload)] = list(PacketSplitter().feed(login.start()))
    return seq, parse_greeting(payload)


# -- the proxy's greeting ----------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True])
def test_greeting_is_the_proxys_own(tls: bool) -> None:
    seq, g = greeting_of(Login(TEMPLATE, 1234, tls_available=tls))
    assert seq == 0
    assert g.connection_id == 1234
    assert g.server_version == TEMPLATE.server_version
    assert g.charset == TEMPLATE.charset
    assert g.auth_plugin == "mysql_native_password"
    assert len(g.salt) == 20
    assert b"\0" not in g.salt
    assert all(0x21 <= b <= 0x7E for b in g.salt)
    assert g.salt != TEMPLATE.salt
    for masked in (C.ZSTD_COMPRESSION, C.QUERY_ATTRIBUTES, C.OPTIONAL_RESULTSET_METADATA,
                   C.MULTI_FACTOR_AUTH, C.CAPABILITY_EXTENSION):  # fmt: skip
        assert not g.capabilities & masked, masked
    for kept in (C.PROTOCOL_41, C.SECURE_CONNECTION, C.PLUGIN_AUTH, C.DEPRECATE_EOF, C.COMPRESS,
                 C.MULTI_STATEMENTS, C.CONNECT_ATTRS):  # fmt: skip
        assert g.capabilities & kept, kept
    assert bool(g.capabilities & C.SSL) is tls
    # Of a MariaDB backend's extensions (0x1F) all pass but COM_MULTI, which MariaDB never
    # shipped. CLIENT_MYSQL stays clear.
    assert g.mariadb_capabilities == 0x1F & ~M.COM_MULTI
    assert not g.capabilities & C.LONG_PASSWORD


def test_a_backend_without_mariadb_extensions_is_greeted_for_as_mysql() -> None:
    mysql_like = replace(TEMPLATE, capabilities=SERVER_CAPS | C.LONG_PASSWORD,
                         mariadb_capabilities=0)
    _, g = greeting_of(Login(mysql_like, 1, tls_available=False))
    assert g.capabilities & C.LONG_PASSWORD
    assert g.mariadb_capabilities == 0


def test_mariadb_extensions_are_negotiated_alike_on_both_legs() -> None:
    login = Login(TEMPLATE, 1, tls_available=False)
    maria = replace(RESPONSE, capabilities=CLIENT_CAPS & ~C.LONG_PASSWORD,
                    mariadb_capabilities=0x1F)
    login.client_packet(1, build_handshake_response(maria))
    [action] = login.backend_greeting_received(build_greeting(BACKEND))
    assert isinstance(action, SendBackend)
    [(_, payload)] = list(PacketSplitter().feed(action.data))
    sent = parse_handshake_response(payload)
    assert sent.mariadb_capabilities == 0x1F & ~M.COM_MULTI
    assert not sent.capabilities & C.LONG_PASSWORD
    # A backend without them cannot serve this client: the driver tries another.
    login = Login(TEMPLATE, 1, tls_available=False)
    login.client_packet(1, build_handshake_response(maria))
    poorer = replace(BACKEND, mariadb_capabilities=M.STMT_BULK_OPERATIONS)
    [unfit] = login.backend_greeting_received(build_greeting(poorer))
    assert isinstance(unfit, BackendUnfit)
    assert "0x19" in unfit.reason  # progress, extended metadata, cached metadata


def test_each_login_has_its_own_salt() -> None:
    salts = {greeting_of(Login(TEMPLATE, i, False))[1].salt for i in range(50)}
    assert len(salts) == 50


def test_make_salt() -> None:
    salts = [make_salt() for _ in range(1000)]  # more than one batch of random bytes
    for salt in salts:
        assert type(salt) is bytes and len(salt) == 20
        assert all(0x21 <= b <= 0x7E and b != 0x24 for b in salt)
    assert len(set(salts)) == len(salts)


def test_a_forked_child_never_hands_out_its_parents_salts() -> None:
    make_salt()  # the batch is filled
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next salts, to the parent
        os.close(read)
        os.write(write, b"".join(make_salt() for _ in range(5)))
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read()
    os.waitpid(pid, 0)
    mine = b"".join(make_salt() for _ in range(5))
    assert len(child) == 100 and child != mine


# -- transcripts -------------------------------------------------------------------------------

Step = tuple[str, int, bytes, list[Action]]  # leg, sequence id, payload, actions it must give


def run(login: Login, steps: list[Step], bytewise: bool) -> None:
    legs = {"client": PacketSplitter(), "backend": PacketSplitter()}
    for leg, seq, payload, want in steps:
        got: list[Action] = []
        if leg == "greeting":
            got = login.backend_greeting_received(payload)
        else:
            data = frame(payload, seq)
            chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
            handle = login.client_packet if leg == "client" else login.backend_packet
            for chunk in chunks:
                for got_seq, got_payload in legs[leg].feed(chunk):
                    got += handle(got_seq, got_payload)
        assert got == want, (leg, seq, payload)


def forwarded_response(login: Login) -> SendBackend:
    """What the proxy sends the backend for RESPONSE (checked on its own below)."""
    resp = replace(
        RESPONSE,
        capabilities=BACKEND_LEG,
        auth_data=b"",
        auth_plugin=FORCE_SWITCH_PLUGIN,
    )
    return SendBackend(frame(build_handshake_response(resp), 1))


def established(status: int = AUTOCOMMIT) -> Established:
    return Established(CLIENT_LEG, BACKEND_LEG, status, 555, "app")


def native_login(login: Login) -> list[Step]:
    return [
        ("client", 1, build_handshake_response(RESPONSE), [Route("app", "shop")]),
        ("greeting", 0, build_greeting(BACKEND), [forwarded_response(login)]),
        ("backend", 2, SWITCH, [SendClient(frame(SWITCH, 2))]),
        ("client", 3, SCRAMBLE, [SendBackend(frame(SCRAMBLE, 3))]),
        ("backend", 4, OK, [SendClient(frame(OK, 4)), established()]),
    ]


def sha2_full_auth(login: Login) -> list[Step]:
    switch = build_auth_switch("caching_sha2_password", b"sha2-backend-salt!!!\0")
    pem = b"\x01-----BEGIN PUBLIC KEY-----\n" + b"K" * 400 + b"\n-----END PUBLIC KEY-----\n"
    ok = build_ok(AUTOCOMMIT | ServerStatus.SESSION_STATE_CHANGED) + b"\x00"
    return [
        ("client", 1, build_handshake_response(RESPONSE), [Route("app", "shop")]),
        ("greeting", 0, build_greeting(BACKEND), [forwarded_response(login)]),
        ("backend", 2, switch, [SendClient(frame(switch, 2))]),
        ("client", 3, SCRAMBLE, [SendBackend(frame(SCRAMBLE, 3))]),
        ("backend", 4, b"\x01\x04", [SendClient(frame(b"\x01\x04", 4))]),  # full auth
        ("client", 5, b"\x02", [SendBackend(frame(b"\x02", 5))]),  # asks for the public key
        ("backend", 6, pem, [SendClient(frame(pem, 6))]),
        ("client", 7, b"E" * 256, [SendBackend(frame(b"E" * 256, 7))]),
        ("backend", 8, ok, [SendClient(frame(ok, 8)),
                            established(AUTOCOMMIT | ServerStatus.SESSION_STATE_CHANGED)]),
    ]  # fmt: skip


def tls_login(login: Login) -> list[Step]:
    """After an SSLRequest the client leg is one packet ahead of the backend leg."""
    ssl_request = build_handshake_response(
        HandshakeResponse(CLIENT_CAPS | C.SSL, 1 << 24, 224, ssl_request_only=True)
    )
    response = build_handshake_response(replace(RESPONSE, capabilities=CLIENT_CAPS | C.SSL))
    return [
        ("client", 1, ssl_request, [StartClientTLS()]),
        ("client", 2, response, [Route("app", "shop")]),
        ("greeting", 0, build_greeting(BACKEND), [forwarded_response(login)]),
        ("backend", 2, SWITCH, [SendClient(frame(SWITCH, 3))]),
        ("client", 4, SCRAMBLE, [SendBackend(frame(SCRAMBLE, 3))]),
        ("backend", 4, OK, [SendClient(frame(OK, 5)),
                            Established(CLIENT_LEG | C.SSL, BACKEND_LEG, AUTOCOMMIT, 555, "app")]),
    ]  # fmt: skip


def refused_after_auth(login: Login) -> list[Step]:
    refused = Refused("backend refused login: 1045 " + DENIED[9:].decode())
    return [
        ("client", 1, build_handshake_response(RESPONSE), [Route("app", "shop")]),
        ("greeting", 0, build_greeting(BACKEND), [forwarded_response(login)]),
        ("backend", 2, SWITCH, [SendClient(frame(SWITCH, 2))]),
        ("client", 3, SCRAMBLE, [SendBackend(frame(SCRAMBLE, 3))]),
        ("backend", 4, DENIED, [SendClient(frame(DENIED, 4)), refused]),  # the ERR, unchanged
    ]


def refused_at_once(login: Login) -> list[Step]:
    err = build_err(1044, "42000", "Access denied for user 'app' to database 'shop'")
    return [
        ("client", 1, build_handshake_response(RESPONSE), [Route("app", "shop")]),
        ("greeting", 0, build_greeting(BACKEND), [forwarded_response(login)]),
        ("backend", 2, err, [SendClient(frame(err, 2)), Refused("backend refused login: 1044 "
                                                                + err[9:].decode())]),
    ]  # fmt: skip


TRANSCRIPTS: dict[str, tuple[bool, Callable[[Login], list[Step]], LoginState]] = {
    "mysql_native_password": (False, native_login, LoginState.DONE),
    "caching_sha2_password full auth": (False, sha2_full_auth, LoginState.DONE),
    "TLS": (True, tls_login, LoginState.DONE),
    "refused after the auth switch": (False, refused_after_auth, LoginState.FAILED),
    "refused at once": (False, refused_at_once, LoginState.FAILED),
}


@pytest.mark.parametrize("name", sorted(TRANSCRIPTS))
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "byte_at_a_time"])
def test_transcript(name: str, bytewise: bool) -> None:
    tls, steps, final = TRANSCRIPTS[name]
    login = Login(TEMPLATE, 1234, tls_available=tls)
    run(login, steps(login), bytewise)
    assert login.state is final
    # Nothing more is due from either side once the login has ended.
    with pytest.raises(ProtocolError):
        login.client_packet(0, b"\x03select 1")
    with pytest.raises(ProtocolError):
        login.backend_packet(5, OK)


def test_forwarded_response() -> None:
    """The backend gets the client's user, database, character set and attributes, but no auth
    data, an auth plugin it does not know (so it switches to the user's own), and none of the
    capabilities that belong to the client leg's transport."""
    login = Login(TEMPLATE, 1234, tls_available=False)
    login.client_packet(1, build_handshake_response(RESPONSE))
    [action] = login.backend_greeting_received(build_greeting(BACKEND))
    assert isinstance(action, SendBackend)
    [(seq, payload)] = list(PacketSplitter().feed(action.data))
    assert seq == 1
    sent = parse_handshake_response(payload)
    assert sent.auth_plugin == FORCE_SWITCH_PLUGIN == "tiproxy_pass_through"
    assert sent.auth_data == b""
    assert not sent.capabilities & C.COMPRESS
    assert not sent.capabilities & C.SSL
    assert not sent.capabilities & (C.QUERY_ATTRIBUTES | C.ZSTD_COMPRESSION)
    assert sent.capabilities & C.DEPRECATE_EOF  # the legs agree on the result set framing
    assert sent.capabilities & C.PLUGIN_AUTH
    assert (sent.user, sent.database, sent.charset, sent.attrs) == (b"app", b"shop", 224, ATTRS)
    assert sent.max_packet == RESPONSE.max_packet
    assert sent.mariadb_capabilities == 0
    assert login.backend_greeting == BACKEND


def test_a_backend_connected_before_the_greeting_gets_the_clients_answer_as_it_is() -> None:
    """Greeted with the early backend's salt, the client answered that backend: its scramble and
    plugin go on unchanged (no auth switch), and only the early backend's greeting says so."""
    login = Login(BACKEND, 1234, tls_available=False, early_salt=True)
    _, g = greeting_of(login)
    assert g.salt == BACKEND.salt
    login.client_packet(1, build_handshake_response(RESPONSE))
    [action] = login.backend_greeted(BACKEND, early=True)
    assert isinstance(action, SendBackend)
    [(_, payload)] = list(PacketSplitter().feed(action.data))
    sent = parse_handshake_response(payload)
    assert (sent.auth_plugin, sent.auth_data) == ("mysql_native_password", RESPONSE.auth_data)
    assert login.backend_greeting == BACKEND
    # Another backend (the early one failed meanwhile) never saw that salt: it switches.
    login = Login(BACKEND, 1234, tls_available=False, early_salt=True)
    login.client_packet(1, build_handshake_response(RESPONSE))
    [action] = login.backend_greeting_received(build_greeting(BACKEND))
    assert isinstance(action, SendBackend)
    [(_, payload)] = list(PacketSplitter().feed(action.data))
    sent = parse_handshake_response(payload)
    assert (sent.auth_plugin, sent.auth_data) == (FORCE_SWITCH_PLUGIN, b"")


def test_route_without_database() -> None:
    login = Login(TEMPLATE, 1, tls_available=False)
    resp = replace(RESPONSE, capabilities=CLIENT_CAPS & ~C.CONNECT_WITH_DB, database=None)
    assert login.client_packet(1, build_handshake_response(resp)) == [Route("app", None)]


# -- a kept backend connection (net/pool.py) ---------------------------------------------------


def test_a_kept_connection_answers_with_its_own_logins_ok() -> None:
    """A login served by a kept connection: the client gets the OK that connection's first
    login ended with, at the sequence id its handshake response calls for, and the session
    has the backend leg's capabilities as a backend greeting would have given them."""
    first = Login(TEMPLATE, 1, tls_available=False)
    first.client_packet(1, build_handshake_response(RESPONSE))
    first.backend_greeting_received(build_greeting(BACKEND))
    [_, established] = first.backend_packet(4, OK)
    assert isinstance(established, Established) and established.ok == OK
    login = Login(TEMPLATE, 2, tls_available=False)
    login.client_packet(1, build_handshake_response(RESPONSE))
    assert login.pool_key() == first.pool_key()
    reply, est = login.pooled(BACKEND, OK)
    assert reply == SendClient(frame(OK, 2))
    assert est == established  # the same capabilities, status and backend connection id
    assert est.backend_connection_id == BACKEND.connection_id
    with pytest.raises(ProtocolError):
        login.pooled(BACKEND, OK)  # once


def test_a_kept_connection_answers_a_tls_client_one_packet_later() -> None:
    """After an SSLRequest (sequence id 1) and the response (2), the OK is packet 3."""
    login = Login(TEMPLATE, 2, tls_available=True)
    ssl_request = HandshakeResponse(CLIENT_CAPS | C.SSL, 1 << 24, 224, ssl_request_only=True)
    assert login.client_packet(1, build_handshake_response(ssl_request)) == [StartClientTLS()]
    login.client_packet(2, build_handshake_response(replace(RESPONSE,
                                                            capabilities=CLIENT_CAPS | C.SSL)))
    reply, est = login.pooled(BACKEND, OK)
    assert reply == SendClient(frame(OK, 3))
    assert isinstance(est, Established) and not est.backend_capabilities & C.SSL


@pytest.mark.parametrize("change", [
    {"user": b"other"},
    {"database": b"other"},
    {"database": None, "capabilities": CLIENT_CAPS & ~C.CONNECT_WITH_DB},
    {"charset": 8},
    {"capabilities": CLIENT_CAPS & ~C.FOUND_ROWS},
    {"capabilities": CLIENT_CAPS & ~C.DEPRECATE_EOF},
])
def test_what_a_kept_connection_must_share_with_a_login(change: dict[str, Any]) -> None:
    """The server fixed these at the kept connection's login (or the reset keeps them): a login
    that differs in one of them needs a connection of its own."""
    login, other = at_routing(), Login(TEMPLATE, 2, tls_available=False)
    other.client_packet(1, build_handshake_response(replace(RESPONSE, **change)))
    assert login.pool_key() != other.pool_key()


def test_compression_is_the_client_legs_own() -> None:
    login, other = at_routing(), Login(TEMPLATE, 2, tls_available=False)
    resp = replace(RESPONSE, capabilities=CLIENT_CAPS & ~C.COMPRESS)
    other.client_packet(1, build_handshake_response(resp))
    assert login.pool_key() == other.pool_key()


# -- out of turn -------------------------------------------------------------------------------


def at_routing() -> Login:
    login = Login(TEMPLATE, 1, tls_available=False)
    login.client_packet(1, build_handshake_response(RESPONSE))
    return login


def at_auth() -> Login:
    login = at_routing()
    login.backend_greeting_received(build_greeting(BACKEND))
    return login


def test_backend_packet_before_routing() -> None:
    with pytest.raises(ProtocolError):
        Login(TEMPLATE, 1, False).backend_packet(2, SWITCH)


def test_backend_greeting_before_the_client_answered() -> None:
    with pytest.raises(ProtocolError):
        Login(TEMPLATE, 1, False).backend_greeting_received(build_greeting(BACKEND))


def test_client_packet_while_routing() -> None:
    with pytest.raises(ProtocolError):
        at_routing().client_packet(2, SCRAMBLE)


def test_second_backend_greeting() -> None:
    with pytest.raises(ProtocolError):
        at_auth().backend_greeting_received(build_greeting(BACKEND))


def test_empty_backend_packet() -> None:
    with pytest.raises(ProtocolError) as info:
        at_auth().backend_packet(2, b"")
    assert info.value.origin is Origin.BACKEND


def test_ssl_request_when_tls_is_not_offered() -> None:
    ssl_request = build_handshake_response(
        HandshakeResponse(CLIENT_CAPS | C.SSL, 1 << 24, 224, ssl_request_only=True)
    )
    with pytest.raises(ProtocolError):
        Login(TEMPLATE, 1, tls_available=False).client_packet(1, ssl_request)


def test_second_ssl_request() -> None:
    ssl_request = build_handshake_response(
        HandshakeResponse(CLIENT_CAPS | C.SSL, 1 << 24, 224, ssl_request_only=True)
    )
    login = Login(TEMPLATE, 1, tls_available=True)
    assert login.client_packet(1, ssl_request) == [StartClientTLS()]
    with pytest.raises(ProtocolError):
        login.client_packet(2, ssl_request)


@pytest.mark.parametrize("seq", [0, 2, 255])
def test_handshake_response_with_wrong_sequence_id(seq: int) -> None:
    with pytest.raises(ProtocolError):
        Login(TEMPLATE, 1, False).client_packet(seq, build_handshake_response(RESPONSE))


OLD_CLIENT = replace(RESPONSE, capabilities=CLIENT_CAPS & ~(C.PLUGIN_AUTH | C.CONNECT_ATTRS
                                                             | C.PLUGIN_AUTH_LENENC_CLIENT_DATA),
                     auth_plugin=None, attrs=None)  # mysqljs: no CLIENT_PLUGIN_AUTH


def _sent(action: Action) -> HandshakeResponse:
    assert isinstance(action, SendBackend)
    [(_, payload)] = list(PacketSplitter().feed(action.data))
    return parse_handshake_response(payload)


def test_a_client_without_plugin_auth_logs_in_with_its_native_scramble() -> None:
    """Its answer is a mysql_native_password scramble: to the backend whose salt it answered
    as it is, plugin named; to another, by the switch, which it answers as such clients do."""
    login = Login(BACKEND, 1, tls_available=False, early_salt=True)
    assert login.client_packet(1, build_handshake_response(OLD_CLIENT)) == [Route("app", "shop")]
    [action] = login.backend_greeted(BACKEND, early=True)
    sent = _sent(action)
    assert (sent.auth_plugin, sent.auth_data) == ("mysql_native_password", OLD_CLIENT.auth_data)
    assert sent.capabilities & C.PLUGIN_AUTH  # the backend leg's own
    login = Login(TEMPLATE, 1, tls_available=False)
    login.client_packet(1, build_handshake_response(OLD_CLIENT))
    [action] = login.backend_greeting_received(build_greeting(BACKEND))
    assert (_sent(action).auth_plugin, _sent(action).auth_data) == (FORCE_SWITCH_PLUGIN, b"")
    assert login.backend_packet(2, SWITCH) == [SendClient(frame(SWITCH, 2))]
    assert login.client_packet(3, SCRAMBLE) == [SendBackend(frame(SCRAMBLE, 3))]
    [reply, done] = login.backend_packet(4, OK)
    assert reply == SendClient(frame(OK, 4)) and isinstance(done, Established)
    assert not done.client_capabilities & C.PLUGIN_AUTH


def test_a_client_without_plugin_auth_gets_the_servers_refusal_of_another_plugin() -> None:
    login = Login(TEMPLATE, 1, tls_available=False)
    login.client_packet(1, build_handshake_response(OLD_CLIENT))
    login.backend_greeting_received(build_greeting(BACKEND))
    [reply, refused] = login.backend_packet(2, build_auth_switch("client_ed25519", b"x" * 32))
    assert isinstance(reply, SendClient) and isinstance(refused, Refused)
    [(seq, payload)] = list(PacketSplitter().feed(reply.data))
    assert (seq, parse_err(payload).code, parse_err(payload).sqlstate) == (2, 1251, "08004")
    assert login.state is LoginState.FAILED
    # The pre-4.1 password hash (no CLIENT_SECURE_CONNECTION): refused at once, as a server does.
    login = Login(TEMPLATE, 1, tls_available=False)
    ancient = replace(OLD_CLIENT, capabilities=OLD_CLIENT.capabilities & ~C.SECURE_CONNECTION,
                      auth_data=b"12345678")
    [reply, refused] = login.client_packet(1, build_handshake_response(ancient))
    assert isinstance(refused, Refused)
    [(_, payload)] = list(PacketSplitter().feed(reply.data))
    assert parse_err(payload).code == 1251


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x01\x02\x03",
        build_handshake_response(RESPONSE)[:20],
        build_handshake_response(replace(RESPONSE, capabilities=CLIENT_CAPS & ~C.PROTOCOL_41)),
    ],
)
def test_malformed_handshake_response(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        Login(TEMPLATE, 1, False).client_packet(1, payload)
    assert info.value.origin is Origin.CLIENT


@pytest.mark.parametrize(
    "payload",
    [
        build_err(1040, "08004", "Too many connections"),
        b"\xff\x10",  # a truncated ERR
        b"\x0a5.5.5-10.11.6-MariaDB\0\x01\x00",  # a truncated greeting
        b"\x09",  # another protocol version
        build_greeting(replace(BACKEND, capabilities=SERVER_CAPS & ~C.PLUGIN_AUTH)),
    ],
)
def test_bad_backend_greeting_is_the_backends_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        at_routing().backend_greeting_received(payload)
    assert info.value.origin is Origin.BACKEND


@pytest.mark.parametrize("payload", [b"\x00", b"\x00\x00\x00", b"\x00\xff", b"\xff\x15"])
def test_malformed_ok_or_err_is_the_backends_error(payload: bytes) -> None:
    login = at_auth()
    with pytest.raises(ProtocolError) as info:
        login.backend_packet(2, payload)
    assert info.value.origin is Origin.BACKEND
    assert login.state is LoginState.AUTH  # not established on a packet that did not parse


def test_the_clients_response_is_kept_whole_but_for_capabilities() -> None:
    """Login copies the response field by field (cheaper than dataclasses.replace): every field
    a response has must survive the copy."""
    full = replace(RESPONSE, extra=b"tail", ssl_request_only=False, mariadb_capabilities=0x1F)
    copied = _with_capabilities(full, 7, 3)
    assert copied == replace(full, capabilities=7, mariadb_capabilities=3)
    # A field added to HandshakeResponse must be added to the copy too (then here).
    assert [f.name for f in fields(HandshakeResponse)] == [
        "capabilities", "max_packet", "charset", "user", "auth_data", "database", "auth_plugin",
        "attrs", "mariadb_capabilities", "ssl_request_only", "extra"]
