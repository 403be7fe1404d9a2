"""Moving one session to another backend: capture, log in elsewhere, restore, swap.

Theory of operation
-------------------
The relay calls `move_session` at a safe point, with the client's input held. The old backend
connection is detached from the hot path and asked for the session's state; a new connection to
the target logs in as the same user without the password and is given that state; only then
are the two swapped. Any failure before the swap closes the new connection and leaves the
session on its old backend as it was: the capture statements change nothing a client can see.
If the old connection itself broke, the session cannot go on and the caller closes it.

Dialects differ in three steps (DESIGN section 5):
- MySQL (MariaDB, MySQL): capture with two SELECTs; log in with mysql_native_password using
  SHA1(password) recovered at the first login; restore with one SET, the SQL-level PREPAREs,
  and the server-side prepared statements prepared again in one pipelined batch.
- TiDB: `SHOW SESSION_STATES` gives the state and a session token; the token logs in
  (`tidb_session_token`); `SET SESSION_STATES '...'` restores everything, statement ids too.
Reading a MySQL-dialect session's state is net/state_capture.py's (a checkpoint and a traffic
capture read it the same way).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from tiproxy.client.channel import (
    query,
    read_prepare,
    send_prepare,
    sql_error,
)
from tiproxy.client.leg import BackendLeg
from tiproxy.net.state_capture import HiddenStateError, capture_mysql
from tiproxy.protocol.auth import NATIVE_PLUGIN, native_answer
from tiproxy.protocol.constants import Capability
from tiproxy.protocol.errors import Origin, ProtocolError, SQLError
from tiproxy.protocol.packets import (
    HandshakeResponse,
    build_handshake_response,
    frame,
    parse_auth_switch,
    parse_greeting,
)
from tiproxy.protocol.responses import ok_status
from tiproxy.session.dialects.mysql_restore import CapturedState, restore_sql
from tiproxy.session.rebuild import Snapshot

if TYPE_CHECKING:
    from tiproxy.balance.router import Backend
    from tiproxy.net.relay import Session

log = logging.getLogger("tiproxy.migration")

TIDB_TOKEN_PLUGIN = "tidb_session_token"  # noqa: S105 - a plugin name


class MigrationError(Exception):
    """A move failed at `step`; `old_intact` says whether the old connection can go on."""

    def __init__(self, step: str, reason: str, old_intact: bool = True,
                 cause: BaseException | None = None, *, pinned: bool = False,
                 recheck: bool = False) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.old_intact = old_intact
        # Not a failure: the session holds state no move can carry; `recheck`: until it is gone
        self.pinned = pinned
        self.recheck = recheck
        # The server's error code when a backend refused a statement or the login.
        self.code = cause.code if isinstance(cause, SQLError) else 0

    @property
    def lasting(self) -> bool:
        """A failure that trying again will not cure: a missing table or privilege, an account
        or a variable the target does not have."""
        return self.code in LASTING_ERRORS


# Server errors that make a move fail the same way every time (MariaDB's codes): unknown table
# (an information_schema plugin disabled), table/column/specific/database access denied, access
# denied at login, no such table, unknown system variable, read-only or bad variable value.
LASTING_ERRORS = frozenset({1109, 1142, 1143, 1227, 1044, 1045, 1146, 1193, 1238, 1231, 1232})


@dataclass
class MoveResult:
    leg: BackendLeg
    connection_id: int
    status: int
    stmt_ids: dict[int, int]  # client id -> new backend id
    database: bytes | None = None  # the current database after the move (b"": none; None: ?)
    captured: CapturedState | None = None  # what the move captured (MySQL)


async def move_session(session: Session, target: Backend,
                       snapshot: Snapshot | None = None) -> MoveResult:
    """Capture the session on its backend, log in to `target`, restore it there. With a
    `snapshot` (its old backend is gone: session/rebuild.py), restore that instead; the old
    connection is then not touched."""
    old = session.backend_leg if snapshot is None else None
    deprecate_eof = bool(session.backend_caps & Capability.DEPRECATE_EOF)
    if old is not None:
        old.detach()
        try:
            captured = await _capture(session, old, deprecate_eof)
        except HiddenStateError as e:
            raise MigrationError("check", str(e), old_intact=_reattach(old, session),
                                 pinned=True, recheck=e.recheck) from e
        except Exception as e:
            raise MigrationError("capture", _why(e), old_intact=_reattach(old, session),
                                 cause=e) from e
    else:
        assert snapshot is not None
        captured = _Captured(mysql=snapshot.state, replays=snapshot.replays, rebuilt=True)
    try:
        new = await BackendLeg.open(target.host, target.port, header=session.backend_header())
    except Exception as e:
        raise MigrationError("connect", _why(e), old_intact=_reattach(old, session)) from e
    step = "login"
    try:
        connection_id, status = await _login(session, new, captured, target)
        step = "restore"
        stmt_ids = await _restore(session, new, target, captured, deprecate_eof)
    except BaseException as e:
        new.abort()
        intact = _reattach(old, session)
        if not isinstance(e, Exception):
            raise  # cancelled: the session is closing
        raise MigrationError(step, _why(e), old_intact=intact, cause=e) from e
    current = None
    if captured.mysql is not None:
        current = captured.mysql.database or b""
    return MoveResult(new, connection_id, status, stmt_ids, current,
                      None if captured.rebuilt else captured.mysql)


def _reattach(old: BackendLeg | None, session: Session) -> bool:
    if old is None or old.closed or not old.clean:
        return False
    old.attach(session)
    return True


def _why(e: BaseException) -> str:
    if isinstance(e, SQLError):  # the code too: a session's character set can garble the text
        return f"error {e.code}: {e.message}"
    return str(e) or type(e).__name__


@dataclass
class _Captured:
    mysql: CapturedState | None = None
    tidb_states: bytes = b""
    tidb_token: bytes = b""
    galera_gtid: str = ""  # the session's last write on a Galera node: read it back after
    replays: tuple[bytes, ...] = ()  # a snapshot's SET statements, run after the restore
    rebuilt: bool = False  # from a snapshot: the old backend was not asked


# Galera: a move must not let the session read from a node that has not yet applied its own last
# write. The new node waits (up to this many seconds) until it has; if it cannot, the move fails.
GALERA_WAIT_SECONDS = 5


async def _capture(session: Session, leg: BackendLeg, deprecate_eof: bool) -> _Captured:
    if session.dialect == "tidb":
        result = await query(leg, "SHOW SESSION_STATES", deprecate_eof)
        if len(result.rows) != 1 or len(result.rows[0]) < 2:
            raise ProtocolError("SHOW SESSION_STATES did not return one row", Origin.BACKEND)
        states, token = result.rows[0][0], result.rows[0][1]
        return _Captured(tidb_states=states or b"", tidb_token=token or b"")
    state = await capture_mysql(session, leg, deprecate_eof)
    gtid = ""
    if session.backend is not None and session.backend.galera:
        rows = (await query(leg, "SELECT CAST(WSREP_LAST_WRITTEN_GTID() AS BINARY)",
                            deprecate_eof)).rows
        gtid = (rows[0][0] or b"").decode("ascii", "replace") if rows else ""
    return _Captured(mysql=state, galera_gtid=gtid)


async def _start_tls(session: Session, leg: BackendLeg, offered: int,
                     response: HandshakeResponse, target: Backend) -> int:
    """SSLRequest and TLS on the new leg; the sequence id of the response that follows."""
    ctx = session.server.tls.sql
    target.offers_tls = bool(offered & Capability.SSL)  # the router skips it for TLS moves
    if ctx is None or not offered & Capability.SSL:
        why = "sql-tls is no longer configured" if ctx is None else "the target offers no TLS"
        raise ProtocolError(f"the session's backend leg is TLS, but {why}", Origin.PROXY)
    return await leg.ssl_request(response, ctx, target.host)


async def _login(session: Session, leg: BackendLeg, captured: _Captured,
                 target: Backend) -> tuple[int, int]:
    """Log in as the session's user; returns (backend connection id, status)."""
    _, payload = await leg.read_packet()
    if payload[:1] == b"\xff":
        raise sql_error(payload)
    greeting = parse_greeting(payload)
    base = session.login_response
    assert base is not None
    caps = session.backend_caps
    database = base.database
    if captured.mysql is not None:
        database = captured.mysql.database
        caps = caps | Capability.CONNECT_WITH_DB if database else caps & ~Capability.CONNECT_WITH_DB
    if session.dialect == "tidb":
        plugin, auth = TIDB_TOKEN_PLUGIN, captured.tidb_token
        if len(auth) > 250:  # a token of ~500 bytes needs a length-encoded length, as TiProxy
            caps |= Capability.PLUGIN_AUTH_LENENC_CLIENT_DATA  # sends it; TiDB reads the flag
    else:
        stage1 = session.credential
        if stage1 is None:
            raise ProtocolError("no reusable credential", Origin.PROXY)
        plugin = NATIVE_PLUGIN
        native = greeting.auth_plugin == plugin
        auth = native_answer(stage1, greeting.salt) if native else b""
    caps = caps & ~Capability.SSL | Capability.PLUGIN_AUTH
    ext = session.mariadb_caps
    target.mariadb_capabilities = greeting.mariadb_capabilities
    if ext & ~greeting.mariadb_capabilities:
        raise ProtocolError("the target lacks MariaDB capabilities the client negotiated",
                            Origin.PROXY)
    if ext:
        caps &= ~Capability.LONG_PASSWORD  # CLIENT_MYSQL clear: the extension is read
    response = replace(
        base, capabilities=caps, user=session.user.encode(),
        auth_data=auth, auth_plugin=plugin, database=database, mariadb_capabilities=ext,
        ssl_request_only=False,
    )
    seq = 1
    if session.backend_tls:  # the session keeps its TLS decision on every backend
        seq = await _start_tls(session, leg, greeting.capabilities, response, target)
        response = replace(response, capabilities=caps | Capability.SSL)
    leg.write(frame(build_handshake_response(response), seq))
    unanswerable = ""  # a plugin the proxy cannot speak, answered empty once
    while True:
        seq, payload = await leg.read_packet()
        if payload[:1] == b"\x00":
            return greeting.connection_id, ok_status(payload, 0, len(payload))
        if payload[:1] == b"\xff":
            raise sql_error(payload)
        if payload[:1] != b"\xfe" or session.dialect == "tidb" or unanswerable:
            raise ProtocolError(f"backend asks for {unanswerable}" if unanswerable else
                                "unexpected packet while logging in again", Origin.BACKEND)
        switch = parse_auth_switch(payload)
        if switch.plugin != NATIVE_PLUGIN or session.credential is None:
            # The account has another plugin there, or does not exist (MariaDB then names a
            # plugin of some other account, not to tell): an empty answer has the server say
            # which, as an error (1045), which is what decides whether to try again.
            unanswerable = switch.plugin
            leg.write(frame(b"", seq + 1))
            continue
        leg.write(frame(native_answer(session.credential, switch.data), seq + 1))


async def _restore(session: Session, leg: BackendLeg, target: Backend, captured: _Captured,
                   deprecate_eof: bool) -> dict[int, int]:
    if session.dialect == "tidb":
        await query(leg, tidb_restore_sql(captured.tidb_states), deprecate_eof)
        return {cid: s.backend_id for cid, s in session.state.stmts.items()}
    assert captured.mysql is not None
    if captured.galera_gtid and target.galera:
        gtid = captured.galera_gtid.replace("'", "")
        await query(leg, f"SELECT WSREP_SYNC_WAIT_UPTO_GTID('{gtid}', {GALERA_WAIT_SECONDS})",
                    deprecate_eof)
    elif target.galera and captured.rebuilt:
        # The old node is gone with the session's last GTID: wait until this node has applied
        # everything the cluster had ordered, the session's own last commit included.
        await query(leg, "SET STATEMENT wsrep_sync_wait = 1 FOR SELECT 1", deprecate_eof)
    restore = restore_sql(captured.mysql)
    if restore is not None:
        await query(leg, restore, deprecate_eof)
    for statement in captured.replays:  # in their order: the last of each variable counts
        await query(leg, statement, deprecate_eof)
    session.state.note_user_vars({v.name for v in captured.mysql.user})
    current = captured.mysql.database
    state = session.state
    where = _Databases(leg, deprecate_eof, current)
    for name, text in state.sql_prepared.items():
        await where.enter(state.sql_prepared_db.get(name))
        await query(leg, text, deprecate_eof)
    again = restore_sql(captured.mysql, user_only=True)
    if state.sql_prepared and again is not None:
        await query(leg, again, deprecate_eof)
    # The statement the client prepared last is prepared last here too (SessionState.
    # last_prepared), its database's group last of all.
    last = state.stmts.get(state.last_prepared) if state.last_prepared is not None else None
    stmts = sorted(state.stmts.values(),
                   key=lambda s: (s.database == last.database if last else False,
                                  s.database or b"", s is last, s.client_id))
    new_ids: dict[int, int] = {}
    for database in dict.fromkeys(s.database for s in stmts):
        await where.enter(database)
        group = [s for s in stmts if s.database == database]
        for stmt in group:
            send_prepare(leg, stmt.sql)
        for stmt in group:
            prepared = await read_prepare(leg, deprecate_eof)
            if (prepared.params, prepared.columns) != (stmt.params, stmt.columns):
                raise ProtocolError("a prepared statement changed shape on the new backend",
                                    Origin.BACKEND)
            new_ids[stmt.client_id] = prepared.stmt_id
    await where.enter(current)
    return new_ids


class _Databases:
    """USE on the new leg so that each prepared statement is prepared in the database it was
    first prepared in (its unqualified names resolve there), then back to the current one."""

    def __init__(self, leg: BackendLeg, deprecate_eof: bool, current: bytes | None) -> None:
        self._leg = leg
        self._eof = deprecate_eof
        self._current = current
        self._active = current

    async def enter(self, database: bytes | None) -> None:
        if database is None or database == self._active or self._current is None:
            return  # unknown, already there, or no way back to "no database": stay
        quoted = b"`" + database.replace(b"`", b"``") + b"`"
        await query(self._leg, b"USE " + quoted, self._eof)
        self._active = database


def tidb_restore_sql(states: bytes) -> bytes:
    """SET SESSION_STATES with the JSON as a string literal (backslashes and quotes escaped)."""
    escaped = states.replace(b"\\", b"\\\\").replace(b"'", b"\\'")
    return b"SET SESSION_STATES '" + escaped + b"'"
