"""Reading a session's state on its own backend connection, for a move (net/migration.py), a
checkpoint (net/checkpoints.py) and a traffic capture that joins the session
(net/capture_rebuild.py).

Theory of operation
-------------------
MariaDB and MySQL: the database, the session variables that differ from their global values,
and the user variables, in as few statements as the server allows: information_schema's
USER_VARIABLES lists the user variables where the server has it; else performance_schema, read
by the proxy's own account (auth-sync-user) about this connection's thread, or the stored
programs' texts; else the names the session's own statements used. Each statement runs with the
proxy's terms (no statement time limit, big selects allowed) so that a server's defaults cannot
refuse it. What no statement can carry (temporary tables, named locks, an open HANDLER, a
transaction) raises HiddenStateError: the session stays where it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tiproxy.client.admin import AdminConnection
from tiproxy.client.channel import (
    Result,
    Row,
    queries,
    query,
)
from tiproxy.client.leg import BackendLeg
from tiproxy.protocol.constants import Capability, MariaDBCapability
from tiproxy.protocol.errors import SQLError
from tiproxy.session.dialects import mysql as mysql_dialect
from tiproxy.session.dialects.mysql_restore import CapturedState, UserVariable
from tiproxy.session.sqltext import user_variable_names
from tiproxy.session.state import MAX_TRACKED_USER_VARS, MAX_USER_VAR_NAME, PROFILING
from tiproxy.session.statements import SESSION_ONLY_TYPES

if TYPE_CHECKING:
    from tiproxy.balance.router import Backend
    from tiproxy.net.relay import Session

log = logging.getLogger("tiproxy.migration")


class HiddenStateError(Exception):
    """The session holds state no capture carries (SessionState.unseen): now a pin, or, with
    `recheck`, a wait until it is gone (a named lock)."""

    def __init__(self, reason: str, recheck: bool = False) -> None:
        super().__init__(reason)
        self.recheck = recheck


async def capture_mysql(session: Session, leg: BackendLeg,
                         deprecate_eof: bool) -> CapturedState:
    """The session's state, refused (HiddenStateError) when it holds what cannot travel."""
    pin = session.state.counts_unusable()
    if pin:  # known before reading, which would count in what a session after FLUSH STATUS
        session.state.hidden = pin  # reads next (SHOW STATUS: Handler_tmp_write...)
        raise HiddenStateError(pin)
    state = await read_mysql_state(session, leg, deprecate_eof)
    check_unseen(session, state)
    return state


async def read_mysql_state(session: Session, leg: BackendLeg,
                           deprecate_eof: bool) -> CapturedState:
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
        tuple[list[UserVariable], int | None]:
    """The user variables and LAST_INSERT_ID() (None where USER_VARIABLES is missing: not
    read), for a checkpoint after a statement that changed only user variables."""
    deprecate_eof = bool(session.backend_caps & Capability.DEPRECATE_EOF)
    backend = session.backend
    state = CapturedState()
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
                                  ) -> tuple[list[UserVariable], int]:
    """The user variables of these names (those set: a NULL one is left out) and
    LAST_INSERT_ID(), read without a table: the last statement's warnings stay as they were."""
    deprecate_eof = bool(session.backend_caps & Capability.DEPRECATE_EOF)
    extended = bool(session.mariadb_caps & MariaDBCapability.EXTENDED_METADATA)
    named = await query(leg, mysql_dialect.named_user_vars_sql(names, last_insert_id=True),
                        deprecate_eof, extended_metadata=extended)
    state = CapturedState()
    mysql_dialect.apply_named_user_vars(state, names, named.rows[0], named.types,
                                        last_insert_id=True)
    return state.user, state.last_insert_id


async def _user_values(session: Session, leg: BackendLeg, deprecate_eof: bool,
                       state: CapturedState, listed: bool, *,
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


async def capture_state(session: Session, leg: BackendLeg) -> CapturedState:
    """Everything a move captures of a MySQL-dialect session (a checkpoint)."""
    return await capture_mysql(session, leg, bool(session.backend_caps & Capability.DEPRECATE_EOF))


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


def check_unseen(session: Session, captured: CapturedState) -> None:
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
    if any(name == "profiling" and raw == b"ON" for name, _, raw in captured.system):
        session.state.profiling = True  # set where the proxy cannot see (a stored program)
        raise HiddenStateError(PROFILING)
    if captured.locks:
        names = ", ".join(n.decode("utf-8", "replace") for n in captured.locks)
        raise HiddenStateError(f"named locks taken where the proxy cannot see (a stored "
                               f"program): {names}", recheck=True)
