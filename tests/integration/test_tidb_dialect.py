"""The TiDB dialect end to end: a real client, the real proxy, scripted TiDB servers.

No TiDB server can be installed here (DESIGN section 5), so the backends are
`support.tidb_backend.ScriptedTiDB`: they speak exactly the packets a move uses and record every
packet they receive. The tests assert the bytes of a move as TiProxy sends them:
- the old backend gets `SHOW SESSION_STATES`, then COM_QUIT once the session has moved;
- the new backend gets a HandshakeResponse41 with plugin `tidb_session_token` and the old
  backend's token as auth data, and no password exchange at all;
- then exactly `SET SESSION_STATES '<json>'`, with backslashes and quotes escaped by a backslash.
The packets are decoded here from the raw bytes, not with the proxy's codec.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import pymysql
import pytest

from support.proxy import ProxyFactory, ProxyProcess
from support.tidb_backend import (
    PASSWORD,
    SERVER_VERSION,
    TOKEN_PLUGIN,
    USER,
    ScriptedTiDB,
    SigningKey,
    native_scramble,
)

pytestmark = pytest.mark.integration

# A user variable whose value needs every escape: quotes, a backslash, JSON's own escapes.
TRICKY = "it's a \\ path, \"quoted\", caf\u00e9"
DATABASE = "test"

# Capability bits, from the protocol documentation (not from the proxy's constants).
CLIENT_LONG_PASSWORD = 1
CLIENT_CONNECT_WITH_DB = 1 << 3
CLIENT_PROTOCOL_41 = 1 << 9
CLIENT_TRANSACTIONS = 1 << 13
CLIENT_SECURE_CONNECTION = 1 << 15
CLIENT_MULTI_RESULTS = 1 << 17
CLIENT_PLUGIN_AUTH = 1 << 19
CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA = 1 << 21
CLIENT_DEPRECATE_EOF = 1 << 24
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


def sql_string(value: str) -> str:
    """A SQL string literal, escaped the way TiDB's own tests and TiProxy escape session states."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# -- clients ------------------------------------------------------------------------------------


class Client(Protocol):
    id: int  # the connection id the proxy greeted with: the session's id in the API

    def query(self, sql: str) -> list[tuple[str | None, ...]]: ...

    def close(self) -> None: ...


class PyMySQLClient:
    """PyMySQL, which does not set CLIENT_DEPRECATE_EOF: result sets end with EOF packets."""

    def __init__(self, port: int) -> None:
        self.conn = pymysql.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD,
                                    database=DATABASE, autocommit=True, connect_timeout=5,
                                    read_timeout=10)
        self.id = int(self.conn.thread_id())

    def query(self, sql: str) -> list[tuple[str | None, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(sql)
            return [tuple(None if v is None else str(v) for v in row) for row in cur.fetchall()]

    def close(self) -> None:
        self.conn.close()


class DeprecateEOFClient:
    """A minimal client that sets CLIENT_DEPRECATE_EOF (neither PyMySQL nor libmariadb does):
    no EOF after the column definitions, and an OK with header 0xFE at the end of the rows."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        _, greeting = self._read()
        self.id, salt = _greeting_id_and_salt(greeting)
        caps = (CLIENT_LONG_PASSWORD | CLIENT_CONNECT_WITH_DB | CLIENT_PROTOCOL_41
                | CLIENT_TRANSACTIONS | CLIENT_SECURE_CONNECTION | CLIENT_MULTI_RESULTS
                | CLIENT_PLUGIN_AUTH | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | CLIENT_DEPRECATE_EOF)
        scramble = native_scramble(PASSWORD.encode(), salt)
        self._send(b"".join((
            _U32.pack(caps), _U32.pack(1 << 24), b"\x2d", b"\0" * 23, USER.encode() + b"\0",
            bytes((len(scramble),)), scramble, DATABASE.encode() + b"\0",
            b"mysql_native_password\0",
        )), 1)
        while True:
            seq, payload = self._read()
            if payload[0] == 0x00:
                return
            if payload[0] == 0xFF:
                raise AssertionError(f"login refused: {payload[9:].decode()}")
            assert payload[0] == 0xFE, payload  # AuthSwitchRequest: plugin NUL salt NUL
            plugin, _, rest = payload[1:].partition(b"\0")
            assert plugin == b"mysql_native_password"
            self._send(native_scramble(PASSWORD.encode(), rest[:20]), seq + 1)

    def _recv(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("the proxy closed the connection")
            data += chunk
        return data

    def _read(self) -> tuple[int, bytes]:
        header = _U32.unpack(self._recv(4))[0]
        return header >> 24, self._recv(header & 0xFFFFFF)

    def _send(self, payload: bytes, seq: int) -> None:
        self.sock.sendall(_U32.pack(len(payload) | seq << 24) + payload)

    def query(self, sql: str) -> list[tuple[str | None, ...]]:
        self._send(b"\x03" + sql.encode(), 0)
        _, first = self._read()
        if first[0] == 0x00:
            return []
        if first[0] == 0xFF:
            raise AssertionError(f"{sql}: {first[9:].decode()}")
        columns = first[0]
        for _ in range(columns):
            _, definition = self._read()
            assert definition[:4] == b"\x03def", "a column definition was due"
        rows: list[tuple[str | None, ...]] = []
        while True:
            _, packet = self._read()
            if packet[0] == 0xFE and len(packet) < 0xFFFFFF:
                # CLIENT_DEPRECATE_EOF: an OK packet with the EOF header, not a 5-byte EOF.
                assert len(packet) >= 7, f"an EOF where an OK (0xFE) was due: {packet!r}"
                return rows
            rows.append(_text_row(packet, columns))

    def close(self) -> None:
        try:
            self._send(b"\x01", 0)
        finally:
            self.sock.close()


def _greeting_id_and_salt(payload: bytes) -> tuple[int, bytes]:
    pos = payload.index(b"\0", 1) + 1
    conn_id = _U32.unpack_from(payload, pos)[0]
    salt1 = payload[pos + 4 : pos + 12]
    salt2_at = pos + 12 + 1 + 2 + 1 + 2 + 2 + 1 + 10
    return conn_id, salt1 + payload[salt2_at : salt2_at + 12]


def _text_row(packet: bytes, columns: int) -> tuple[str | None, ...]:
    values: list[str | None] = []
    pos = 0
    for _ in range(columns):
        if packet[pos] == 0xFB:
            values.append(None)
            pos += 1
            continue
        size = packet[pos]
        assert size < 0xFB, "the tests' values are short"
        values.append(packet[pos + 1 : pos + 1 + size].decode())
        pos += 1 + size
    return tuple(values)


CLIENTS: dict[str, Callable[[int], Client]] = {
    "pymysql": PyMySQLClient, "deprecate_eof": DeprecateEOFClient}


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    """Clients a test opens; closed when it ends, pass or fail."""
    opened: list[Client] = []
    yield opened
    for client in opened:
        with contextlib.suppress(OSError):  # the test may have broken it on purpose
            client.close()


# -- backends and the proxy's API -----------------------------------------------------------------


@pytest.fixture
def cluster() -> Iterator[tuple[ScriptedTiDB, ScriptedTiDB]]:
    """Two scripted TiDB servers sharing a signing key: each accepts the other's tokens."""
    key = SigningKey()
    with ScriptedTiDB("tidb-0", key) as a, ScriptedTiDB("tidb-1", key) as b:
        yield a, b
    assert not a.errors + b.errors, "".join(a.errors + b.errors)


@pytest.fixture
def strangers() -> Iterator[tuple[ScriptedTiDB, ScriptedTiDB]]:
    """Two scripted TiDB servers with different signing keys: each refuses the other's tokens."""
    with ScriptedTiDB("tidb-0", SigningKey()) as a, ScriptedTiDB("tidb-1", SigningKey()) as b:
        yield a, b
    assert not a.errors + b.errors, "".join(a.errors + b.errors)


def wait_session(proxy: ProxyProcess, conn_id: int, done: Callable[[dict[str, Any]], bool],
                 what: str, timeout: float = 5) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = proxy.session(conn_id)
        if done(s):
            return s
        time.sleep(0.01)
    raise AssertionError(f"session {conn_id} {what}: {proxy.session(conn_id)}\n{proxy.log()}")


def move(proxy: ProxyProcess, conn_id: int) -> None:
    old = proxy.session(conn_id)["backend"]
    proxy.redirect()
    wait_session(proxy, conn_id, lambda s: s["backend"] != old and not s["moving"],
                 "did not move")


def backend_named(name: str, pair: tuple[ScriptedTiDB, ScriptedTiDB]) -> tuple[ScriptedTiDB,
                                                                               ScriptedTiDB]:
    """(the backend called `name`, the other one)."""
    return (pair[0], pair[1]) if pair[0].name == name else (pair[1], pair[0])


# -- what a move must look like on the wire -------------------------------------------------------


def assert_token_login(payload: bytes, token: bytes) -> None:
    """HandshakeResponse41: caps, max packet, charset, 23 zero bytes, user NUL, auth data, db NUL,
    plugin NUL. TiDB's tokens are longer than 250 bytes: the auth data must then be
    length-encoded (0xFC + 2 bytes) and CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA set, as TiProxy's
    MakeHandshakeResponse does, since TiDB does not advertise that flag itself."""
    caps = _U32.unpack_from(payload, 0)[0]
    assert caps & CLIENT_PROTOCOL_41 and caps & CLIENT_PLUGIN_AUTH
    assert payload[9:32] == b"\0" * 23
    pos = 32 + len(USER) + 1
    assert payload[32:pos] == USER.encode() + b"\0"
    assert len(token) > 250
    assert caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    assert payload[pos : pos + 3] == b"\xfc" + _U16.pack(len(token))
    pos += 3
    assert payload[pos : pos + len(token)] == token
    pos += len(token)
    if caps & CLIENT_CONNECT_WITH_DB:
        assert payload[pos : pos + len(DATABASE) + 1] == DATABASE.encode() + b"\0"
        pos += len(DATABASE) + 1
    plugin = TOKEN_PLUGIN.encode() + b"\0"
    assert payload[pos : pos + len(plugin)] == plugin


def assert_moved_on_the_wire(old: ScriptedTiDB, new: ScriptedTiDB, deprecate_eof: bool) -> None:
    """The last move went from `old` to `new` exactly as TiProxy moves a TiDB session."""
    source = old.sessions()[-1]
    assert source.closed.wait(5), "the old backend connection was not closed"
    assert source.commands[-2:] == [b"\x03SHOW SESSION_STATES", b"\x01"]
    assert source.quit
    states, token = source.states_sent[-1], source.issued_tokens[-1]

    target = new.sessions()[-1]
    assert target.logged_in_with == "token" and target.token_issuer == old.name
    login_seq, login = target.received[0]
    assert login_seq == 1
    assert_token_login(login, token)
    # No AuthSwitchRequest was answered: the next packet is already a command.
    restore_seq, restore = target.received[1]
    assert restore_seq == 0
    escaped = states.replace(b"\\", b"\\\\").replace(b"'", b"\\'")
    assert restore == b"\x03SET SESSION_STATES '" + escaped + b"'"
    assert target.states_loaded[-1] == states
    assert target.deprecate_eof is source.deprecate_eof is deprecate_eof


# -- tests ------------------------------------------------------------------------------------------


def test_scripted_backend_is_faithful_to_clients(cluster: tuple[ScriptedTiDB, ScriptedTiDB]) -> None:
    """The stand-in itself, with no proxy: real clients log in and its tokens work as TiDB's."""
    a, b = cluster
    direct = PyMySQLClient(a.port)
    try:
        direct.query(f"SET @s = {sql_string(TRICKY)}, @n = 42")
        assert direct.query("SELECT @@hostname, @@version, @s, @n, DATABASE()") == [
            ("tidb-0", SERVER_VERSION, TRICKY, "42", DATABASE)]
        ((states, token),) = direct.query("SHOW SESSION_STATES")
        assert states is not None and token is not None
        assert json.loads(states)["user-var-values"] == {"s": TRICKY, "n": 42}
        assert "'" in states and "\\" in states
    finally:
        direct.close()
    with pytest.raises(pymysql.err.OperationalError, match="Access denied"):
        pymysql.connect(host="127.0.0.1", port=b.port, user=USER, password="wrong",
                        connect_timeout=5)
    eof_client = DeprecateEOFClient(b.port)
    try:
        assert eof_client.query("SELECT @@hostname, @nothing") == [("tidb-1", None)]
    finally:
        eof_client.close()
    assert b.sessions()[-1].deprecate_eof and not a.sessions()[-1].deprecate_eof


@pytest.mark.parametrize("kind", CLIENTS)
def test_session_moves_with_its_token_and_states(
    kind: str, cluster: tuple[ScriptedTiDB, ScriptedTiDB], proxy_factory: ProxyFactory,
    clients: list[Client],
) -> None:
    proxy = proxy_factory([b.addr for b in cluster])
    client = CLIENTS[kind](proxy.port)
    clients.append(client)
    ((first,),) = client.query("SELECT @@hostname")
    home, other = backend_named(str(first), cluster)
    client.query(f"SET @s = {sql_string(TRICKY)}, @n = 42")

    move(proxy, client.id)
    assert client.query("SELECT @@hostname, @s, @n") == [(other.name, TRICKY, "42")]
    assert_moved_on_the_wire(home, other, deprecate_eof=kind == "deprecate_eof")
    states = home.sessions()[-1].states_sent[-1]
    assert b"'" in states and b"\\" in states  # the escaping was exercised

    # And back, with a token the other backend issued.
    client.query("SET @n = 43")
    move(proxy, client.id)
    assert client.query("SELECT @@hostname, @s, @n, DATABASE()") == [
        (home.name, TRICKY, "43", DATABASE)]
    assert_moved_on_the_wire(other, home, deprecate_eof=kind == "deprecate_eof")

    assert [c.logged_in_with for c in home.sessions() + other.sessions()].count("password") == 1
    _, metrics = proxy.api("/metrics")
    assert b'migrate_res="succeed"' in metrics


def test_refused_token_leaves_the_session_on_its_backend(
    strangers: tuple[ScriptedTiDB, ScriptedTiDB], proxy_factory: ProxyFactory,
    clients: list[Client],
) -> None:
    """The target does not share the signing key: it answers the token with ERR 1045."""
    proxy = proxy_factory([b.addr for b in strangers])
    client = PyMySQLClient(proxy.port)
    clients.append(client)
    ((first,),) = client.query("SELECT @@hostname")
    home, other = backend_named(str(first), strangers)
    client.query(f"SET @s = {sql_string(TRICKY)}")

    proxy.redirect()
    s = wait_session(proxy, client.id, lambda s: "failed" in s["waiting"], "did not fail")
    assert s["backend"] == home.addr
    assert client.query("SELECT @@hostname, @s") == [(home.name, TRICKY)]

    source = home.sessions()[-1]
    assert b"\x03SHOW SESSION_STATES" in source.commands
    assert not source.quit and not source.closed.is_set()
    refused = [c for c in other.connections if c.login and c.login.plugin == TOKEN_PLUGIN]
    assert refused, "the target never saw the token"
    for attempt in refused:
        assert "signature" in attempt.refused and not attempt.logged_in_with
        assert attempt.closed.wait(5), "the proxy left the refused connection open"
        assert [seq for seq, _ in attempt.received] == [1]  # nothing after the refusal
    assert not other.sessions()

    _, metrics = proxy.api("/metrics")
    assert b'migrate_res="fail"' in metrics
    log = proxy.log()
    assert "failed" in log
    for token in source.issued_tokens:  # a token logs in as the user for a minute: a secret
        assert token.decode() not in log
