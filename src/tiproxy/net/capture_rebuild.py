"""What a capture writes first for a session that was open before it started: its state.

A replay starts every connection from nothing, so a session the capture joins mid-way is preceded
in the capture by commands that rebuild where it stands. They are read at a safe point (between
commands, outside a transaction) on the session's own backend connection, as a migration reads
them (net/migration.py):
- MariaDB and MySQL: COM_INIT_DB of the current database; one SET of every session variable that
  differs from its global value, the user variables and LAST_INSERT_ID() (the migration's
  restore statement, session/dialects/mysql_restore.py); the SQL-level PREPAREs; a
  COM_STMT_PREPARE of each server-side prepared statement under the id its client uses, in the
  database it was prepared in;
- TiDB: `SET SESSION_STATES` with what `SHOW SESSION_STATES` returned, as TiProxy writes it.
Not rebuilt (no statement recreates them): temporary tables, locks and an open HANDLER; a
replay of statements that use them fails, and its report says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tiproxy.client.channel import query
from tiproxy.net.migration import tidb_restore_sql
from tiproxy.net.state_capture import read_mysql_state
from tiproxy.protocol.constants import Capability, Command
from tiproxy.protocol.errors import Origin, ProtocolError
from tiproxy.session.dialects.mysql_restore import CapturedState, restore_sql

if TYPE_CHECKING:
    from tiproxy.client.leg import BackendLeg
    from tiproxy.net.relay import Session

_INIT_DB = bytes((Command.INIT_DB,))
_QUERY = bytes((Command.QUERY,))
_PREPARE = bytes((Command.STMT_PREPARE,))


@dataclass(frozen=True)
class Rebuilt:
    """One command of a session's rebuilt state (its payload, command byte first); a
    COM_STMT_PREPARE carries the client's statement id, parameter count and types."""

    packet: bytes
    statement: tuple[int, int, bytes | None] | None = None


async def rebuild(session: Session) -> list[Rebuilt]:
    """The session's state as commands, read on its backend connection (detached meanwhile).
    Raises what the backend or the connection raised; a connection left unusable closes the
    session."""
    leg = session.backend_leg
    assert leg is not None
    deprecate_eof = bool(session.backend_caps & Capability.DEPRECATE_EOF)
    leg.detach()
    try:
        if session.dialect == "tidb":
            result = await query(leg, "SHOW SESSION_STATES", deprecate_eof)
            if len(result.rows) != 1 or len(result.rows[0]) < 1:
                raise ProtocolError("SHOW SESSION_STATES did not return one row", Origin.BACKEND)
            commands = [Rebuilt(_QUERY + tidb_restore_sql(result.rows[0][0] or b""))]
        else:
            commands = _mysql_commands(session, await read_mysql_state(session, leg,
                                                                       deprecate_eof))
    except BaseException:
        if not _reattach(leg, session):
            session.close("traffic capture: reading the session's state left its backend "
                          "connection unusable")
        raise
    if not _reattach(leg, session):
        session.close("traffic capture: the backend sent more than the state asked for")
    return commands


def _reattach(leg: BackendLeg, session: Session) -> bool:
    if leg.closed or not leg.clean:
        return False
    leg.attach(session)
    return True


def _mysql_commands(session: Session, captured: CapturedState) -> list[Rebuilt]:
    out: list[Rebuilt] = []
    current = captured.database
    where = current

    def use(database: bytes | None) -> None:
        nonlocal where
        if database and database != where:
            out.append(Rebuilt(_INIT_DB + database))
            where = database

    if current:
        out.append(Rebuilt(_INIT_DB + current))
    restore = restore_sql(captured)
    if restore is not None:
        out.append(Rebuilt(_QUERY + restore.encode()))
    state = session.state
    for name, text in state.sql_prepared.items():
        use(state.sql_prepared_db.get(name))
        out.append(Rebuilt(_QUERY + text))
    again = restore_sql(captured, user_only=True)
    if state.sql_prepared and again is not None:  # PREPARE of `SET @v = ?` makes @v binary
        out.append(Rebuilt(_QUERY + again.encode()))
    for stmt in sorted(state.stmts.values(), key=lambda s: (s.database or b"", s.client_id)):
        use(stmt.database)
        out.append(Rebuilt(_PREPARE + stmt.sql, (stmt.client_id, stmt.params, stmt.param_types)))
    if current:
        use(current)
    return out
