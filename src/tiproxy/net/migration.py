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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from tiproxy.client.admin import AdminConnection
from tiproxy.client.channel import (
    Result,
    Row,
    queries,
    query,
    read_prepare,
    send_prepare,
    sql_error,
)
from tiproxy.client.leg import BackendLeg
from tiproxy.protocol.auth import NATIVE_PLUGIN, native_answer
from tiproxy.protocol.constants import Capability, MariaDBCapability
from tiproxy.protocol.errors import Origin, ProtocolError, SQLError
from tiproxy.protocol.packets import (
    HandshakeResponse,
    build_handshake_response,
    frame,
    parse_auth_switch,
    parse_greeting,
)
from tiproxy.protocol.tracker import ok_status
from tiproxy.session.dialects import mysql as mysql_dialect
from tiproxy.session.rebuild import Snapshot
from tiproxy.session.state import MAX_TRACKED_USER_VARS, MAX_USER_VAR_NAME
from tiproxy.session.statements import SESSION_ONLY_TYPES, user_variable_names

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
    captured: mysql_dialect.CapturedState | None = None  # what the move captured (MySQL)


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


class HiddenStateError(Exception):
    """The session holds state no capture carries (SessionState.unseen): now a pin, or, with
    `recheck`, a wait until it is gone (a named lock)."""

    def __init__(self, reason: str, recheck: bool = False) -> None:
        super().__init__(reason)
        self.recheck = recheck


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
    mysql: mysql_dialect.CapturedState | None = None
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
    state = await _capture_mysql(session, leg, deprecate_eof)
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


async def _capture_mysql(session: Session, leg: BackendLeg,
                         deprecate_eof: bool) -> mysql_dialect.CapturedState:
    state = await read_mysql_state(session, leg, deprecate_eof)
    _check_unseen(session, state)
    return state


async def read_mysql_state(session: Session, leg: BackendLeg,
                           deprecate_eof: bool) -> mysql_dialect.CapturedState:
    """Database, variables and user variables: listed by information_schema.USER_VARIABLES
    where the server has it, else by performance_schema (as auth-sync-user) where it can, else
    read by the names the session's statements used. Also what a traffic capture writes first
    for a session it joins (net/capture_rebuild.py)."""
    backend = session.backend
    # timestamp and insert_id, when the session set them (they have no global value)
    session_only = [(name, SESSION_ONLY_TYPES[name]) for name in sorted(session.state.session_only)]
    users, rows, terms = await _capture_rows(leg, backend, deprecate_eof, session_only)
    state = mysql_dialect.parse_capture(rows)
    mysql_dialect.apply_terms(state, terms, session_only)
    if users:
        state.user_listing = "information_schema"
    listed: list[bytes] = []
    if backend is not None:
        seen = await _seen_by_admin(session, backend, users=not users,
                                    locks=backend.lock_info_table is False)
        if seen is not None and seen.users is not None:
            listed, state.user_listing = seen.users, seen.listing
        if seen is not None and seen.locks is not None:
            state.locks += seen.locks
    await _user_values(session, leg, deprecate_eof, state, users, names_listed=listed)
    return state


@dataclass
class _AdminView:
    """What the proxy's own account could tell of a session's backend connection."""

    users: list[bytes] | None = None  # user variables' names
    listing: str = ""  # where they come from: performance_schema or the stored programs
    locks: list[bytes] | None = None  # named locks it holds


async def _seen_by_admin(session: Session, backend: Backend, users: bool,
                         locks: bool) -> _AdminView | None:
    """Where information_schema cannot list the session's user variables (`users`) or named
    locks (`locks`), what auth-sync-user can: performance_schema for both, if it is on and
    instruments them, else the names of every user variable the stored programs' bodies use
    (what a procedure, function or trigger can set without the session naming it). None where
    nothing is needed or there is no auth-sync-user; what does not answer is learnt once per
    backend."""
    locks = locks and backend.mdl_instrumented is not False and \
        backend.performance_schema is not False
    users = users and (backend.performance_schema is not False
                       or backend.program_bodies is not False)
    security = session.server.config().security
    if not (users or locks) or not security.auth_sync_user:
        return None
    conn = await AdminConnection.open(backend.host, backend.port, security.auth_sync_user,
                                      security.auth_sync_password,
                                      **session.server.tls.admin_options())
    try:
        view = _AdminView()
        if backend.performance_schema is not False:
            await _performance_schema(conn, session.backend_connection_id, backend,
                                      users=users, locks=locks, view=view)
        if users and view.users is None and backend.program_bodies is not False:
            await _stored_program_names(conn, backend, view)
        return view
    finally:
        conn.close()


async def _performance_schema(conn: AdminConnection, thread_id: int, backend: Backend, *,
                              users: bool, locks: bool, view: _AdminView) -> None:
    try:
        rows = await conn.query(mysql_dialect.performance_schema_sql(thread_id, users, locks))
    except SQLError as e:
        backend.performance_schema = False
        log.warning("backend %s: performance_schema cannot be read as auth-sync-user (%d: %s)",
                    backend.addr, e.code, e.message)
        return
    ps = mysql_dialect.parse_performance_schema(rows, users, locks)
    if not ps.on:
        backend.performance_schema = False
        log.info("backend %s: performance_schema is off: it lists no session's user variables "
                 "or named locks", backend.addr)
        return
    listed = [what for what, found in (("user variables", ps.users), ("named locks", ps.locks))
              if found is not None]
    if backend.performance_schema is None and listed:
        log.info("backend %s: performance_schema lists what information_schema cannot (%s)",
                 backend.addr, " and ".join(listed))
    backend.performance_schema = True
    if locks and not ps.mdl_instrumented:
        backend.mdl_instrumented = False
        log.info("backend %s: performance_schema does not instrument metadata locks "
                 "(wait/lock/metadata/sql/mdl): named locks taken inside stored programs are "
                 "not seen there", backend.addr)
    view.locks = ps.locks
    if ps.users is not None:
        view.users, view.listing = ps.users, "performance_schema"


async def _stored_program_names(conn: AdminConnection, backend: Backend,
                                view: _AdminView) -> None:
    try:
        bodies = mysql_dialect.stored_program_bodies(
            await conn.query(mysql_dialect.STORED_PROGRAM_BODIES))
        why = "it lacks the global SELECT and TRIGGER privileges" if bodies is None else ""
    except SQLError as e:
        bodies, why = None, f"{e.code}: {e.message}"
    backend.program_bodies = bodies is not None
    if bodies is None:
        log.warning("backend %s: auth-sync-user cannot read every stored program's body (%s): a "
                    "session that CALLs a procedure there is pinned, and user variables that "
                    "functions and triggers set are not carried", backend.addr, why)
        return
    names: set[bytes] = set()
    for body in bodies:
        names |= user_variable_names(body)
    names = {n for n in names if len(n) <= MAX_USER_VAR_NAME}
    if len(names) > MAX_TRACKED_USER_VARS:
        log.warning("backend %s: its stored programs use more than %d user variables: a session "
                    "that CALLs a procedure there is pinned", backend.addr, MAX_TRACKED_USER_VARS)
        return
    view.users, view.listing = sorted(names), "stored programs"


async def capture_user_variables(session: Session, leg: BackendLeg) -> \
        tuple[list[mysql_dialect.UserVariable], int | None]:
    """The user variables and LAST_INSERT_ID() (None where USER_VARIABLES is missing: not
    read), for a checkpoint after a statement that changed only user variables."""
    deprecate_eof = bool(session.backend_caps & Capability.DEPRECATE_EOF)
    backend = session.backend
    state = mysql_dialect.CapturedState()
    if backend is not None:
        await _learn_plugin_tables(leg, backend, deprecate_eof)
    users = backend is None or backend.user_variables_table is not False
    if users:
        try:
            result, = await _unlimited(leg, [mysql_dialect.capture_user_sql()], deprecate_eof)
        except SQLError as e:
            if backend is None or e.code != mysql_dialect.ER_UNKNOWN_TABLE:
                raise
            backend.user_variables_table = users = False  # unloaded since the proxy looked
        else:
            state = mysql_dialect.parse_capture(result.rows)
    await _user_values(session, leg, deprecate_eof, state, users)
    return state.user, state.last_insert_id if users else None


async def capture_system_variables(session: Session, leg: BackendLeg,
                                   names: list[str]) -> list[tuple[str, bytes]]:
    """System variables by name (those statements assigned from expressions), read without a
    table, as (name, the SET statement that gives it back)."""
    deprecate_eof = bool(session.backend_caps & Capability.DEPRECATE_EOF)
    extended = bool(session.mariadb_caps & MariaDBCapability.EXTENDED_METADATA)
    result = await query(leg, mysql_dialect.named_system_vars_sql(names), deprecate_eof,
                         extended_metadata=extended)
    return mysql_dialect.named_system_assignments(names, result.rows[0], result.types)


async def capture_named_variables(session: Session, leg: BackendLeg, names: list[bytes]
                                  ) -> tuple[list[mysql_dialect.UserVariable], int]:
    """The user variables of these names (those set: a NULL one is left out) and
    LAST_INSERT_ID(), read without a table: the last statement's warnings stay as they were."""
    deprecate_eof = bool(session.backend_caps & Capability.DEPRECATE_EOF)
    extended = bool(session.mariadb_caps & MariaDBCapability.EXTENDED_METADATA)
    named = await query(leg, mysql_dialect.named_user_vars_sql(names, last_insert_id=True),
                        deprecate_eof, extended_metadata=extended)
    state = mysql_dialect.CapturedState()
    mysql_dialect.apply_named_user_vars(state, names, named.rows[0], named.types,
                                        last_insert_id=True)
    return state.user, state.last_insert_id


async def _user_values(session: Session, leg: BackendLeg, deprecate_eof: bool,
                       state: mysql_dialect.CapturedState, listed: bool, *,
                       names_listed: list[bytes] | tuple[()] = ()) -> None:
    """The user variables' exact values: the strings' bytes where USER_VARIABLES `listed`
    them, else every variable by name: those performance_schema listed and those the
    session's statements used."""
    if listed:
        second = mysql_dialect.string_values_sql(state)
        if second is not None:
            values = await query(leg, second, deprecate_eof)
            mysql_dialect.apply_string_values(state, values.rows[0])
        return
    names = sorted(session.state.user_var_names.union(names_listed))
    if names:
        extended = bool(session.mariadb_caps & MariaDBCapability.EXTENDED_METADATA)
        named = await query(leg, mysql_dialect.named_user_vars_sql(names), deprecate_eof,
                            extended_metadata=extended)
        mysql_dialect.apply_named_user_vars(state, names, named.rows[0], named.types)


async def capture_state(session: Session, leg: BackendLeg) -> mysql_dialect.CapturedState:
    """Everything a move captures of a MySQL-dialect session (a checkpoint)."""
    return await _capture_mysql(session, leg, bool(session.backend_caps & Capability.DEPRECATE_EOF))


async def _capture_rows(leg: BackendLeg, backend: Backend | None, deprecate_eof: bool,
                        session_only: list[tuple[str, str]]) -> tuple[bool, list[Row], Row]:
    """The capture statement with the plugin tables this backend has, learnt at the first
    move from it, sent with terms_sql: (USER_VARIABLES read, rows, terms_sql's row)."""
    terms = mysql_dialect.terms_sql(session_only)
    learnt_again = False
    while True:
        if backend is not None:
            await _learn_plugin_tables(leg, backend, deprecate_eof)
        users = backend is None or backend.user_variables_table is not False
        locks = backend is not None and backend.lock_info_table is not False
        try:
            result, own = await _unlimited(leg, [mysql_dialect.capture_sql(users, locks), terms],
                                           deprecate_eof)
        except SQLError as e:
            if backend is None or e.code != mysql_dialect.ER_UNKNOWN_TABLE or learnt_again:
                raise
            # A plugin was unloaded since the proxy looked: look again.
            backend.user_variables_table = backend.lock_info_table = None
            learnt_again = True
            continue
        return users, result.rows, own.rows[0]


async def _learn_plugin_tables(leg: BackendLeg, backend: Backend, deprecate_eof: bool) -> None:
    """Which of the capture's plugin tables the backend has, asked at the first capture there."""
    if backend.user_variables_table is not None and backend.lock_info_table is not None:
        return
    result, = await _unlimited(leg, [mysql_dialect.PLUGIN_TABLES_SQL], deprecate_eof)
    tables = mysql_dialect.plugin_tables(result.rows)
    backend.user_variables_table = mysql_dialect.USER_VARIABLES in tables
    backend.lock_info_table = mysql_dialect.METADATA_LOCK_INFO in tables
    if not backend.user_variables_table:
        log.warning("backend %s has no information_schema.USER_VARIABLES: user variables are "
                    "listed by performance_schema or carried by the names sessions use",
                    backend.addr)
    if not backend.lock_info_table:
        log.info("backend %s has no information_schema.METADATA_LOCK_INFO: named locks taken "
                 "inside stored programs are seen only through performance_schema (or load the "
                 "metadata_lock_info plugin)", backend.addr)


async def _unlimited(leg: BackendLeg, sqls: list[str], deprecate_eof: bool) -> list[Result]:
    """The proxy's statements, the first of which reads tables: run once more with the
    session's own limits lifted if they are what refused it (mysql_dialect.PROXY_TERMS)."""
    try:
        return await queries(leg, sqls, deprecate_eof)
    except SQLError as e:
        again = mysql_dialect.lifted(sqls[0], e.code)
        if again is None:
            raise
        log.debug("the session's own limits refused the proxy's statement (%s): lifted",
                  e.message)
        return await queries(leg, [again, *sqls[1:]], deprecate_eof)


def _check_unseen(session: Session, captured: mysql_dialect.CapturedState) -> None:
    """State the session made where the proxy could not see it: temporary tables and prepared
    statements pin it until a reset; named locks hold the move until they are released (the
    proxy's own record of the session's locks pinned it before the capture, so any lock the
    server lists here was taken unseen)."""
    pin = session.state.unseen(captured.counts)
    if not pin and session.state.procedure_called and not captured.user_listing:
        pin = ("a stored procedure ran (CALL) where the server lists user variables neither in "
               "information_schema.USER_VARIABLES nor, for auth-sync-user, in "
               "performance_schema: what it set cannot be carried; reset the connection to move")
    if pin:
        session.state.hidden = pin
        raise HiddenStateError(pin)
    if captured.locks:
        names = ", ".join(n.decode("utf-8", "replace") for n in captured.locks)
        raise HiddenStateError(f"named locks taken where the proxy cannot see (a stored "
                               f"program): {names}", recheck=True)


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
    while True:
        seq, payload = await leg.read_packet()
        if payload[:1] == b"\x00":
            return greeting.connection_id, ok_status(payload, 0, len(payload))
        if payload[:1] == b"\xff":
            raise sql_error(payload)
        if payload[:1] != b"\xfe" or session.dialect == "tidb":
            raise ProtocolError("unexpected packet while logging in again", Origin.BACKEND)
        switch = parse_auth_switch(payload)
        if switch.plugin != NATIVE_PLUGIN or session.credential is None:
            raise ProtocolError(f"backend asks for {switch.plugin}", Origin.BACKEND)
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
    restore = mysql_dialect.restore_sql(captured.mysql)
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
    again = mysql_dialect.restore_sql(captured.mysql, user_only=True)
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
