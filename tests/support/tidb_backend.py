"""A scripted TiDB server: exactly the packets the TiDB dialect's connection migration uses.

No TiDB server can be installed where the tests run, so the TiDB dialect (DESIGN section 5) is
verified against this stand-in. It speaks the MySQL protocol over TCP, one thread per connection,
and knows only what a move touches:

- the greeting of a TiDB v7.5 server (version `8.0.11-TiDB-v7.5.0`, TiDB's default capabilities:
  PROTOCOL_41, SECURE_CONNECTION, PLUGIN_AUTH, DEPRECATE_EOF... but not
  PLUGIN_AUTH_LENENC_CLIENT_DATA, which TiDB does not advertise), default plugin
  mysql_native_password;
- a login with mysql_native_password, directly or after an AuthSwitchRequest (sent with a fresh
  salt when the client names any other plugin), checked with the real SHA1 arithmetic against one
  fixed user and password;
- a login with plugin `tidb_session_token`, accepted only for a token that a backend sharing the
  same `SigningKey` issued, for the same user, within its one-minute lifetime (as TiDB's
  `ValidateSessionToken` does); the token is JSON with a 256-byte signature, as long as TiDB's
  with an RSA-2048 signing certificate;
- COM_QUERY: `SELECT` of `@@hostname` (the backend's name), `@@port`, `@var`, `CONNECTION_ID()`,
  `DATABASE()` and literals; `SET @var = literal, ...`; `SHOW SESSION_STATES` (the session's
  user variables and current database as JSON, and a fresh token); `SET SESSION_STATES '...'`;
  `USE db`; other `SET` statements are accepted and ignored;
- COM_PING, COM_INIT_DB, COM_QUIT.

Every packet a connection receives is recorded, with its sequence id, so a test can assert the
exact bytes of a move. Nothing here imports the proxy: packets are built and decoded
independently of `tiproxy.protocol`, so a mistake there cannot hide itself.

References: https://dev.mysql.com/doc/dev/mysql-server/latest/page_protocol_connection_phase.html
and TiDB's pkg/server/server.go (defaultCapability), pkg/sessionctx/sessionstates.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import re
import secrets
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

SERVER_VERSION = "8.0.11-TiDB-v7.5.0"
USER = "app"
PASSWORD = "tidb-pass"  # a test account
NATIVE = "mysql_native_password"
TOKEN_PLUGIN = "tidb_session_token"
TOKEN_LIFETIME = timedelta(minutes=1)  # TiDB's tokenLifetime
MAX_PACKET = 1 << 20  # the tests send small packets; a bigger one is a bug, not data to buffer

# Capability flags (https://dev.mysql.com/doc/dev/mysql-server/latest/group__group__cs__capabilities__flags.html)
LONG_PASSWORD = 1
FOUND_ROWS = 1 << 1
LONG_FLAG = 1 << 2
CONNECT_WITH_DB = 1 << 3
COMPRESS = 1 << 5
LOCAL_FILES = 1 << 7
PROTOCOL_41 = 1 << 9
INTERACTIVE = 1 << 10
TRANSACTIONS = 1 << 13
SECURE_CONNECTION = 1 << 15
MULTI_STATEMENTS = 1 << 16
MULTI_RESULTS = 1 << 17
PLUGIN_AUTH = 1 << 19
CONNECT_ATTRS = 1 << 20
PLUGIN_AUTH_LENENC_CLIENT_DATA = 1 << 21
DEPRECATE_EOF = 1 << 24
ZSTD_COMPRESSION = 1 << 26
# TiDB's defaultCapability (pkg/server/server.go); SSL only with a certificate, which has none.
TIDB_CAPABILITIES = (
    LONG_PASSWORD | LONG_FLAG | CONNECT_WITH_DB | PROTOCOL_41 | TRANSACTIONS | SECURE_CONNECTION
    | FOUND_ROWS | MULTI_STATEMENTS | MULTI_RESULTS | LOCAL_FILES | CONNECT_ATTRS | PLUGIN_AUTH
    | INTERACTIVE | DEPRECATE_EOF | COMPRESS | ZSTD_COMPRESSION
)

STATUS_AUTOCOMMIT = 0x0002
COM_QUIT, COM_INIT_DB, COM_QUERY, COM_PING = 0x01, 0x02, 0x03, 0x0E
TYPE_LONGLONG, TYPE_NULL, TYPE_JSON, TYPE_VAR_STRING = 0x08, 0x06, 0xF5, 0xFD
UTF8MB4_BIN, BINARY = 46, 63
ER_ACCESS_DENIED, ER_UNKNOWN, ER_UNKNOWN_COM = 1045, 1105, 1047

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


# -- wire encoding ------------------------------------------------------------------------------


def lenenc_int(value: int) -> bytes:
    if value < 0xFB:
        return bytes((value,))
    if value < 1 << 16:
        return b"\xfc" + _U16.pack(value)
    if value < 1 << 24:
        return b"\xfd" + _U32.pack(value)[:3]
    return b"\xfe" + struct.pack("<Q", value)


def lenenc_str(value: bytes) -> bytes:
    return lenenc_int(len(value)) + value


def read_lenenc_int(buf: bytes, pos: int) -> tuple[int, int]:
    first = buf[pos]
    if first < 0xFB:
        return first, pos + 1
    size = {0xFC: 2, 0xFD: 3, 0xFE: 8}[first]
    return int.from_bytes(buf[pos + 1 : pos + 1 + size], "little"), pos + 1 + size


def ok_packet(status: int = STATUS_AUTOCOMMIT, header: int = 0x00) -> bytes:
    return bytes((header,)) + lenenc_int(0) + lenenc_int(0) + _U16.pack(status) + _U16.pack(0)


def err_packet(code: int, sqlstate: str, message: str) -> bytes:
    return b"\xff" + _U16.pack(code) + b"#" + sqlstate.encode() + message.encode()


def eof_packet(status: int = STATUS_AUTOCOMMIT) -> bytes:
    return b"\xfe" + _U16.pack(0) + _U16.pack(status)


def native_scramble(password: bytes, salt: bytes) -> bytes:
    """SHA1(password) XOR SHA1(salt + SHA1(SHA1(password)))."""
    stage1 = hashlib.sha1(password).digest()
    stage2 = hashlib.sha1(stage1).digest()
    mix = hashlib.sha1(salt + stage2).digest()
    return bytes(a ^ b for a, b in zip(stage1, mix, strict=True))


def make_salt() -> bytes:
    """20 printable bytes, never NUL, as servers make them."""
    return bytes(0x21 + b % 0x5E for b in secrets.token_bytes(20))


@dataclass(frozen=True)
class LoginRequest:
    """A HandshakeResponse41 as this server decodes it."""

    capabilities: int
    user: str
    auth_data: bytes
    database: str | None
    plugin: str | None


def decode_handshake_response(payload: bytes) -> LoginRequest:
    """HandshakeResponse41: caps, max packet, charset, 23 filler bytes, then the strings.
    The auth data's length is read the way the response's own flags say (TiDB does the same,
    whether or not it advertised PLUGIN_AUTH_LENENC_CLIENT_DATA)."""
    caps = _U32.unpack_from(payload, 0)[0]
    pos = 32
    end = payload.index(b"\0", pos)
    user = payload[pos:end].decode()
    pos = end + 1
    if caps & PLUGIN_AUTH_LENENC_CLIENT_DATA:
        size, pos = read_lenenc_int(payload, pos)
    elif caps & SECURE_CONNECTION:
        size, pos = payload[pos], pos + 1
    else:
        size = payload.index(b"\0", pos) - pos
    auth = payload[pos : pos + size]
    pos += size + (0 if caps & (SECURE_CONNECTION | PLUGIN_AUTH_LENENC_CLIENT_DATA) else 1)
    database = None
    if caps & CONNECT_WITH_DB and pos < len(payload):
        end = payload.index(b"\0", pos)
        database, pos = payload[pos:end].decode(), end + 1
    plugin = None
    if caps & PLUGIN_AUTH and pos < len(payload):
        end = payload.index(b"\0", pos)
        plugin = payload[pos:end].decode()
    return LoginRequest(caps, user, auth, database, plugin)


# -- SQL, just enough ----------------------------------------------------------------------------

_ESCAPES = {"0": "\0", "b": "\b", "n": "\n", "r": "\r", "t": "\t", "Z": "\x1a"}
_STRING = r"'(?:[^'\\]|\\.|'')*'"
_TOKEN = re.compile(
    rf"\s*(?:(?P<str>{_STRING})|(?P<sys>@@[\w.]+)|(?P<var>@\w+)|(?P<num>-?\d+)"
    r"|(?P<null>NULL\b)|(?P<func>\w+\(\s*\)))\s*(?:,|$)",
    re.IGNORECASE | re.DOTALL,
)
_ASSIGN = re.compile(rf"\s*@(\w+)\s*=\s*({_STRING}|-?\d+|NULL)\s*(?:,|$)", re.IGNORECASE | re.DOTALL)
_SET_STATES = re.compile(rf"SET\s+SESSION_STATES\s+({_STRING})\s*$", re.IGNORECASE | re.DOTALL)


def unquote(literal: str) -> str:
    """A single-quoted SQL string literal's value, with MySQL's backslash escapes."""
    body = literal[1:-1]
    out: list[str] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            # \% and \_ keep their backslash (they matter only to LIKE).
            out.append(_ESCAPES.get(nxt, "\\" + nxt if nxt in "%_" else nxt))
            i += 2
        elif c == "'" and body[i + 1 : i + 2] == "'":
            out.append("'")
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _literal(text: str) -> Any:
    if text.upper() == "NULL":
        return None
    if text.startswith("'"):
        return unquote(text)
    return int(text)


def _split(pattern: re.Pattern[str], text: str) -> list[re.Match[str]] | None:
    """The whole of `text` as repeated matches of `pattern`, or None."""
    matches = []
    pos = 0
    while pos < len(text):
        m = pattern.match(text, pos)
        if m is None or m.end() == pos:
            return None
        matches.append(m)
        pos = m.end()
    return matches


# -- session tokens -------------------------------------------------------------------------------


class SigningKey:
    """The session-token signing certificate that a TiDB cluster's servers share
    (`security.session-token-signing-cert/key`). Backends with the same key accept each other's
    tokens; it also remembers which backend issued each token."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self.issued: dict[bytes, str] = {}  # token -> name of the backend that issued it

    def _signature(self, content: bytes) -> bytes:
        # 256 bytes, the size of an RSA-2048 signature, so the token is as long as TiDB's.
        return b"".join(hmac.new(self._key, bytes((i,)) + content, "sha256").digest()
                        for i in range(8))

    def issue(self, user: str, issuer: str) -> bytes:
        now = datetime.now(UTC)
        claims = {"username": user, "sign-time": now.isoformat(),
                  "expire-time": (now + TOKEN_LIFETIME).isoformat()}
        content = json.dumps(claims).encode()
        claims["signature"] = base64.b64encode(self._signature(content)).decode()
        token = json.dumps(claims).encode()
        with self._lock:
            self.issued[token] = issuer
        return token

    def verify(self, token: bytes, user: str) -> str:
        """The issuing backend's name; raises ValueError with TiDB's reason if invalid."""
        try:
            claims = json.loads(token)
            signature = base64.b64decode(claims.pop("signature"))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"malformed token: {e}") from e
        if not hmac.compare_digest(signature, self._signature(json.dumps(claims).encode())):
            raise ValueError("signature verification failure")
        if datetime.fromisoformat(claims["expire-time"]) < datetime.now(UTC):
            raise ValueError("token expired")
        if claims["username"].lower() != user.lower():
            raise ValueError("username does not match")
        with self._lock:
            return self.issued[token]


# -- connections ----------------------------------------------------------------------------------


@dataclass
class ConnectionLog:
    """What one connection to a scripted backend received and did."""

    connection_id: int
    received: list[tuple[int, bytes]] = field(default_factory=list)  # (sequence id, payload)
    login: LoginRequest | None = None
    logged_in_with: str = ""  # "password" or "token" once logged in
    token_issuer: str | None = None  # the backend whose token logged this connection in
    refused: str = ""  # why a login was refused
    issued_tokens: list[bytes] = field(default_factory=list)
    states_sent: list[bytes] = field(default_factory=list)  # SHOW SESSION_STATES' JSON
    states_loaded: list[bytes] = field(default_factory=list)  # SET SESSION_STATES' JSON
    user_vars: dict[str, Any] = field(default_factory=dict)
    database: str | None = None
    quit: bool = False  # a COM_QUIT ended it
    closed: threading.Event = field(default_factory=threading.Event)

    @property
    def commands(self) -> list[bytes]:
        """The payloads of the command phase (sequence id 0), in order."""
        return [p for seq, p in self.received if seq == 0]

    @property
    def deprecate_eof(self) -> bool:
        return self.login is not None and bool(self.login.capabilities & DEPRECATE_EOF)


class _PeerClosedError(Exception):
    """The peer closed the connection (or sent a packet too big to be one of ours)."""


class ScriptedTiDB:
    """One scripted TiDB server on a free loopback port; see the module docstring.

    Use as a context manager, or call start() and stop(); stop() closes every connection and
    joins every thread, and is safe to call twice.
    """

    _next_base = 1000

    def __init__(self, name: str, key: SigningKey, user: str = USER,
                 password: str = PASSWORD) -> None:
        self.name = name
        self.key = key
        self.user = user
        self.password = password.encode()
        self.port = 0
        self._listener: socket.socket | None = None
        self._accepter: threading.Thread | None = None
        self.errors: list[str] = []  # exceptions in connection threads: a bug here or a bad peer
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._logs: list[ConnectionLog] = []
        ScriptedTiDB._next_base += 1000
        self._next_id = ScriptedTiDB._next_base

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def connections(self) -> list[ConnectionLog]:
        with self._lock:
            return list(self._logs)

    def sessions(self, logged_in_with: str | None = None) -> list[ConnectionLog]:
        """Connections that logged in (with a password or a token, if given)."""
        return [c for c in self.connections if c.logged_in_with
                and logged_in_with in (None, c.logged_in_with)]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: condition not met within {timeout}s")
            time.sleep(0.01)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> ScriptedTiDB:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.05)  # accept() wakes up to notice stop()
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accepter = threading.Thread(target=self._accept_loop, args=(listener,),
                                          daemon=True, name=f"{self.name}-accept")
        self._accepter.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._accepter is not None:
            self._accepter.join(timeout=5)  # no connection comes in after this
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):  # already closed by the peer
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recv()
        for thread in threads:
            thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> ScriptedTiDB:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True,
                                  name=f"{self.name}-{target.__name__}")
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._next_id += 1
                log = ConnectionLog(self._next_id)
                self._logs.append(log)
                self._sockets.append(sock)
            self._spawn(self._serve, sock, log)

    # -- one connection -----------------------------------------------------------------------

    def _serve(self, sock: socket.socket, log: ConnectionLog) -> None:
        conn = _Connection(self, sock, log)
        try:
            if conn.handshake():
                conn.command_loop()
        except (_PeerClosedError, OSError):
            pass
        except Exception:  # kept for the test to report, not printed and lost
            self.errors.append(traceback.format_exc())
        finally:
            sock.close()
            log.closed.set()


class _Connection:
    def __init__(self, server: ScriptedTiDB, sock: socket.socket, log: ConnectionLog) -> None:
        self.server = server
        self.sock = sock
        self.log = log
        self.seq = 0

    # -- packets ------------------------------------------------------------------------------

    def _recv_exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise _PeerClosedError
            data += chunk
        return data

    def read(self) -> bytes:
        header = _U32.unpack(self._recv_exactly(4))[0]
        length, seq = header & 0xFFFFFF, header >> 24
        if length > MAX_PACKET:
            raise _PeerClosedError
        payload = self._recv_exactly(length)
        self.log.received.append((seq, payload))
        self.seq = seq + 1
        return payload

    def send(self, *payloads: bytes) -> None:
        out = b""
        for payload in payloads:
            out += _U32.pack(len(payload) | (self.seq & 0xFF) << 24) + payload
            self.seq += 1
        self.sock.sendall(out)

    # -- connection phase ---------------------------------------------------------------------

    def handshake(self) -> bool:
        salt = make_salt()
        caps = TIDB_CAPABILITIES
        greeting = b"".join((
            b"\x0a", SERVER_VERSION.encode(), b"\0", _U32.pack(self.log.connection_id),
            salt[:8], b"\0", _U16.pack(caps & 0xFFFF), bytes((UTF8MB4_BIN,)),
            _U16.pack(STATUS_AUTOCOMMIT), _U16.pack(caps >> 16), bytes((len(salt) + 1,)),
            b"\0" * 10, salt[8:], b"\0", NATIVE.encode(), b"\0",
        ))
        self.send(greeting)
        login = decode_handshake_response(self.read())
        self.log.login = login
        self.log.database = login.database
        if login.capabilities & (COMPRESS | ZSTD_COMPRESSION):
            return self._refuse(ER_UNKNOWN, "HY000", "the scripted TiDB does not compress")
        if login.plugin == TOKEN_PLUGIN:
            return self._token_login(login)
        auth, plugin = login.auth_data, login.plugin or NATIVE
        if plugin != NATIVE:  # TiDB switches an unknown plugin to the user's own
            salt = make_salt()
            self.send(b"\xfe" + NATIVE.encode() + b"\0" + salt + b"\0")
            auth = self.read()
        server = self.server
        expected = native_scramble(server.password, salt)
        if login.user != server.user or not hmac.compare_digest(auth, expected):
            return self._refuse(ER_ACCESS_DENIED, "28000",
                                f"Access denied for user '{login.user}'@'127.0.0.1' "
                                f"(using password: {'YES' if auth else 'NO'})")
        self.log.logged_in_with = "password"
        self.send(ok_packet())
        return True

    def _token_login(self, login: LoginRequest) -> bool:
        try:
            issuer = self.server.key.verify(login.auth_data, login.user)
        except (ValueError, KeyError) as e:
            return self._refuse(ER_ACCESS_DENIED, "28000",
                                f"Access denied for user '{login.user}'@'127.0.0.1': {e}")
        self.log.token_issuer = issuer
        self.log.logged_in_with = "token"
        self.send(ok_packet())
        return True

    def _refuse(self, code: int, sqlstate: str, message: str) -> bool:
        self.log.refused = message
        self.send(err_packet(code, sqlstate, message))
        return False

    # -- command phase ------------------------------------------------------------------------

    def command_loop(self) -> None:
        while True:
            payload = self.read()
            cmd = payload[0] if payload else -1
            if cmd == COM_QUIT:
                self.log.quit = True
                return
            if cmd == COM_PING:
                self.send(ok_packet())
            elif cmd == COM_INIT_DB:
                self.log.database = payload[1:].decode()
                self.send(ok_packet())
            elif cmd == COM_QUERY:
                self.query(payload[1:].decode())
            else:
                self.send(err_packet(ER_UNKNOWN_COM, "08S01", "Unknown command"))

    def query(self, sql: str) -> None:
        text = sql.strip().rstrip(";").strip()
        upper = text.upper()
        if upper == "SHOW SESSION_STATES":
            self.show_session_states()
        elif upper.startswith("SET SESSION_STATES"):
            self.set_session_states(text)
        elif upper.startswith("SELECT "):
            self.select(text[7:])
        elif upper.startswith("SET @"):
            self.set_user_vars(text[4:])
        elif upper.startswith(("SET ", "BEGIN", "COMMIT", "ROLLBACK")):
            self.send(ok_packet())  # SET NAMES, autocommit...: nothing a move must carry
        elif upper.startswith("USE "):
            self.log.database = text[4:].strip().strip("`")
            self.send(ok_packet())
        else:
            self.send(err_packet(ER_UNKNOWN, "HY000", f"the scripted TiDB cannot run: {text}"))

    def session_states(self) -> bytes:
        states: dict[str, Any] = {"user-var-values": self.log.user_vars}
        if self.log.database:
            states["current-db"] = self.log.database
        return json.dumps(states, ensure_ascii=False, sort_keys=True).encode()

    def show_session_states(self) -> None:
        states = self.session_states()
        assert self.log.login is not None
        token = self.server.key.issue(self.log.login.user, self.server.name)
        self.log.states_sent.append(states)
        self.log.issued_tokens.append(token)
        self.result_set([("Session_states", TYPE_JSON), ("Session_token", TYPE_VAR_STRING)],
                        [[states, token]])

    def set_session_states(self, text: str) -> None:
        m = _SET_STATES.match(text)
        try:
            if m is None:
                raise ValueError("not one string literal")
            raw = unquote(m.group(1)).encode()
            states = json.loads(raw)
        except ValueError as e:
            self.send(err_packet(ER_UNKNOWN, "HY000", f"invalid session states: {e}"))
            return
        self.log.states_loaded.append(raw)
        self.log.user_vars = dict(states.get("user-var-values", {}))
        self.log.database = states.get("current-db")
        self.send(ok_packet())

    def set_user_vars(self, text: str) -> None:
        matches = _split(_ASSIGN, text)
        if matches is None:
            self.send(err_packet(ER_UNKNOWN, "HY000", f"cannot parse SET {text}"))
            return
        for m in matches:
            self.log.user_vars[m.group(1).lower()] = _literal(m.group(2))
        self.send(ok_packet())

    def select(self, text: str) -> None:
        matches = _split(_TOKEN, text)
        if matches is None:
            self.send(err_packet(ER_UNKNOWN, "HY000", f"cannot parse SELECT {text}"))
            return
        names, values = [], []
        for m in matches:
            names.append(m.group(0).strip().rstrip(",").strip())
            values.append(self._value(m))
        columns = [(name, _type_of(value)) for name, value in zip(names, values, strict=True)]
        self.result_set(columns, [[_text(v) for v in values]])

    def _value(self, m: re.Match[str]) -> Any:
        kind = m.lastgroup
        token = m.group(kind or 0)
        if kind == "sys":
            name = token[2:].lower().removeprefix("session.")
            return {"hostname": self.server.name, "port": self.server.port,
                    "version": SERVER_VERSION}.get(name)
        if kind == "var":
            return self.log.user_vars.get(token[1:].lower())
        if kind == "func":
            func = token.split("(")[0].upper()
            return {"CONNECTION_ID": self.log.connection_id,
                    "DATABASE": self.log.database}.get(func)
        return _literal(token)

    def result_set(self, columns: list[tuple[str, int]], rows: list[list[bytes | None]]) -> None:
        """A text result set, ended by EOF packets or, under DEPRECATE_EOF, an OK (0xFE)."""
        deprecate_eof = self.log.deprecate_eof
        packets = [lenenc_int(len(columns))]
        for name, type_ in columns:
            charset = BINARY if type_ in (TYPE_LONGLONG, TYPE_NULL) else UTF8MB4_BIN
            packets.append(b"".join((
                lenenc_str(b"def"), lenenc_str(b""), lenenc_str(b""), lenenc_str(b""),
                lenenc_str(name.encode()), lenenc_str(b""), b"\x0c", _U16.pack(charset),
                _U32.pack(1 << 24), bytes((type_,)), _U16.pack(0), b"\0", b"\0\0",
            )))
        if not deprecate_eof:
            packets.append(eof_packet())
        for row in rows:
            packets.append(b"".join(b"\xfb" if v is None else lenenc_str(v) for v in row))
        packets.append(ok_packet(header=0xFE) if deprecate_eof else eof_packet())
        self.send(*packets)


def _type_of(value: Any) -> int:
    if value is None:
        return TYPE_NULL
    return TYPE_LONGLONG if isinstance(value, int) else TYPE_VAR_STRING


def _text(value: Any) -> bytes | None:
    return None if value is None else str(value).encode()
