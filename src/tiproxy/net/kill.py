"""KILL and KILL QUERY through the proxy: the client names sessions by the proxy's ids.

The statement runs with the killer's rights wherever the target is, so the server decides as it
would directly (a user kills their own sessions; CONNECTION ADMIN or SUPER kills anyone's):
- a target on the killer's own backend: the statement, rewritten to the target's backend id,
  runs on the killer's own connection;
- a target on another backend: the proxy logs in there as the killer's user, with the reusable
  credential it recovered at the killer's login, and runs it. A killer without one (an
  authentication plugin the proxy cannot reuse, a TiDB session token) falls back on the proxy's
  account, `[security] auth-sync-user`, which the proxy then lets kill only the killer's own
  user's sessions (every user may kill those).
The server's errors come back as they are, with the backend's thread id in their text turned
into the proxy id the client named. A target that moved since it was looked up (its backend
connection is another now), in this process or another worker, is followed there: the KILL runs
again where it is.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tiproxy.balance.router import split_addr
from tiproxy.client.admin import AdminConnection
from tiproxy.client.channel import query
from tiproxy.client.leg import BackendLeg
from tiproxy.net.login_phase import CLOSED
from tiproxy.protocol.constants import ER_NO_SUCH_THREAD, Capability, ServerStatus
from tiproxy.protocol.errors import ProtocolError, SQLError
from tiproxy.protocol.packets import build_ok, frame
from tiproxy.session.commands import KillExpression, split_kill_expression
from tiproxy.views import counters

if TYPE_CHECKING:
    from tiproxy.net.relay import Session

log = logging.getLogger("tiproxy.session")

ER_UNKNOWN_ERROR = 1105
ER_KILL_DENIED = 1095
RETARGETS = 3  # moves a KILL follows its target through (_follow)


@dataclass(frozen=True)
class KillTarget:
    """What a KILL needs of its target, wherever (in whichever worker) the target lives."""

    id: int
    user: str
    backend_addr: str
    backend_connection_id: int


def handle_kill(session: Session, target_id: int, query_only: bool, prefix: bytes | None) -> None:
    """`prefix` starts the rewritten statement ("KILL [HARD] [QUERY] "); None: COM_PROCESS_KILL.
    A target another worker owns is looked up there first (the client's input waits)."""
    server = session.server
    local = server.sessions.get(target_id)
    if local is not None or not server.kill_target_elsewhere(target_id):
        target = None
        if local is not None and local.backend is not None and local.backend_connection_id:
            local.named_by_kill()
            target = KillTarget(local.id, local.user, local.backend.addr,
                                local.backend_connection_id)
        _kill(session, target_id, target, query_only, prefix)
        return
    session.hold_input("kill lookup")

    async def lookup() -> None:
        target = await server.find_kill_target(target_id)  # cancelled if the session closes
        _kill(session, target_id, target, query_only, prefix)
        session.release_input("kill lookup")

    session.run_task(lookup())


def _kill(session: Session, target_id: int, target: KillTarget | None, query_only: bool,
          prefix: bytes | None, *, tries: int = RETARGETS) -> None:
    if target is None:
        session.reply_error(ER_NO_SUCH_THREAD, "HY000", f"Unknown thread id: {target_id}")
        return
    if session.tracker is None or session.backend_leg is None or session.backend is None:
        return
    if prefix is None:
        prefix = b"KILL QUERY " if query_only else b"KILL CONNECTION "
    sql = prefix.decode("ascii", "replace") + str(target.backend_connection_id)
    if target.backend_addr != session.backend.addr:
        _kill_elsewhere(session, target, sql, tries)
        return
    log.info("session %d: %s (session %d)", session.id, sql, target.id)
    session.hold_input("kill")
    session.run_task(_kill_here(session, target, sql, tries))


def _moved(session: Session, target: KillTarget) -> KillTarget | None:
    """The target, a session of this process, on the backend connection it has now if that is
    not the one it was looked up on: it moved (between commands) since, and the KILL follows it
    there, as it would find the session directly."""
    local = session.server.sessions.get(target.id)
    if local is None or local.backend is None or not local.backend_connection_id:
        return None
    now = KillTarget(local.id, local.user, local.backend.addr, local.backend_connection_id)
    return now if now != target else None


async def _moved_anywhere(session: Session, target: KillTarget) -> KillTarget | None:
    """As _moved, for a target in any worker: one another worker owns is looked up there again
    (after the server said it has no such thread, not before every KILL)."""
    server = session.server
    if target.id in server.sessions or not server.kill_target_elsewhere(target.id):
        return _moved(session, target)
    now = await server.find_kill_target(target.id)
    return now if now is not None and now != target else None


def _follow(session: Session, moved: KillTarget, sql: str, tries: int) -> None:
    """The KILL again, on the connection the target moved to; a target that keeps moving
    under it gets the server's answer for a thread it cannot find, after RETARGETS tries."""
    if session.phase == CLOSED:
        return
    if tries <= 0:
        session.reply_error(ER_NO_SUCH_THREAD, "HY000", f"Unknown thread id: {moved.id}")
        return
    local = session.server.sessions.get(moved.id)
    if local is not None:
        local.named_by_kill()  # (its new connection is not kept for another client either)
    prefix = sql.rsplit(" ", 1)[0].encode("ascii") + b" "
    _kill(session, moved.id, moved, query_only=False, prefix=prefix, tries=tries - 1)


def _gone(session: Session, target: KillTarget) -> bool:
    """The target, a session of this process, ended since it was looked up: it answers the
    killer as if the target were never there. (Its backend connection was not kept for another
    client, net/pool.py: a target is marked when it is looked up, here or in its worker.)"""
    local = session.server.sessions.get(target.id)
    if local is None:
        if session.server.kill_target_elsewhere(target.id):
            return False  # another worker's: looked up there just now
    elif local.backend is not None and local.backend.addr == target.backend_addr \
            and local.backend_connection_id == target.backend_connection_id:
        return False
    session.reply_error(ER_NO_SUCH_THREAD, "HY000", f"Unknown thread id: {target.id}")
    return True


async def _kill_here(session: Session, target: KillTarget, sql: str, tries: int) -> None:
    """On the killer's own connection, out of the hot path for one statement."""
    await _then_follow(session, _kill_on_own_connection(session, target, sql), sql, tries)


async def _then_follow(session: Session, killing: Awaitable[KillTarget | None], sql: str,
                       tries: int) -> None:
    """The KILL (the client's input held as "kill" meanwhile); where its target moved,
    followed there before anything the client sent behind the KILL runs."""
    moved = None
    try:
        moved = await killing
        if moved is not None:
            session.hold_input("kill follow")
    finally:
        session.release_input("kill")
    if moved is not None:
        try:
            _follow(session, moved, sql, tries)
        finally:
            session.release_input("kill follow")


async def _kill_on_own_connection(session: Session, target: KillTarget,
                                  sql: str) -> KillTarget | None:
    """Run it and answer the killer; or, where the target moved, where to run it instead."""
    leg = session.backend_leg
    assert leg is not None
    moved = _moved(session, target)
    if moved is not None or _gone(session, target):
        return moved
    leg.detach()
    try:
        await query(leg, sql, bool(session.backend_caps & Capability.DEPRECATE_EOF))
    except SQLError as e:
        if e.code == ER_NO_SUCH_THREAD:
            moved = await _moved_anywhere(session, target)
        if moved is None:
            session.reply_error(e.code, e.sqlstate, _proxy_ids(e.message, target))
        _reattached(session, leg)  # killing itself closes the connection: the error first
    except (OSError, TimeoutError, ProtocolError) as e:
        if _reattached(session, leg):
            session.reply_error(ER_UNKNOWN_ERROR, "HY000",
                                f"TiProxy: KILL failed: {str(e) or type(e).__name__}")
    except Exception as e:  # a bug: the session cannot go on with its leg detached
        log.exception("session %d: KILL failed", session.id)
        session.close(f"KILL failed: {type(e).__name__}", kind=counters.PROXY_ERROR)
    else:
        if _reattached(session, leg):
            _reply_ok(session)
    return moved


def _kill_elsewhere(session: Session, target: KillTarget, sql: str, tries: int) -> None:
    security = session.server.config().security
    credential = session.credential if session.dialect != "tidb" else None
    if credential is not None:
        user, password = session.user, ""
    elif target.user != session.user:
        session.reply_error(ER_KILL_DENIED, "HY000", f"You are not owner of thread {target.id}")
        return
    elif not security.auth_sync_user:
        session.reply_error(
            ER_UNKNOWN_ERROR, "HY000",
            f"TiProxy: connection {target.id} is on another backend; KILL there needs the "
            "killer's reusable credential or [security] auth-sync-user",
        )
        return
    else:
        user, password = security.auth_sync_user, security.auth_sync_password
    host, port = split_addr(target.backend_addr)
    log.info("session %d: %s (session %d) on %s as %s", session.id, sql, target.id,
             target.backend_addr, "its own user" if credential is not None else "auth-sync-user")
    session.hold_input("kill")

    async def kill_there() -> KillTarget | None:
        moved: KillTarget | None = None
        try:
            header = session.backend_header() if credential is not None else None
            conn = await AdminConnection.open(host, port, user, password, stage1=credential,
                                              header=header, **session.server.tls.admin_options())
            try:
                moved = _moved(session, target)  # it moved while the proxy logged in
                if moved is not None or _gone(session, target):  # or it ended
                    return moved
                await conn.query(sql)
            finally:
                conn.close()
        except SQLError as e:
            if e.code == ER_NO_SUCH_THREAD:
                moved = await _moved_anywhere(session, target)
            if moved is None:
                session.reply_error(e.code, e.sqlstate, _proxy_ids(e.message, target))
        except (OSError, TimeoutError, ProtocolError, ValueError) as e:
            why = str(e) or type(e).__name__
            session.reply_error(ER_UNKNOWN_ERROR, "HY000",
                                f"TiProxy: KILL on the other backend failed: {why}")
        else:
            _reply_ok(session)
        return moved

    session.run_task(_then_follow(session, kill_there(), sql, tries))


def _reply_ok(session: Session) -> None:
    assert session.tracker is not None
    # The proxy's own OK carries no session state: the flag would promise some.
    status = session.tracker.status & ~ServerStatus.SESSION_STATE_CHANGED
    session.send_client(frame(build_ok(status), 1))


def _proxy_ids(message: str, target: KillTarget) -> str:
    """The server's message names the backend's thread id; the client named the proxy's."""
    return re.sub(rf"\b{target.backend_connection_id}\b", str(target.id), message)


# The server's own parser judges a KILL <expression>: the statement is prepared (not run) on
# the killer's connection under this name, then deallocated.
_PROBE = b"__tiproxy_kill"
CONNECTION_ID_CALL = re.compile(rb"\bCONNECTION_ID\s*\(\s*\)", re.IGNORECASE)
# KILL refuses an expression that names a table or calls a stored function (a subquery FROM a
# table, NEXTVAL(s), a function the server does not know) before it opens or runs anything,
# which PREPARE does not check and the evaluation would do: MariaDB's SET STATEMENT applies the
# same rule at the same point, and IF(0, ...) leaves the expression unevaluated. Its refusal
# names the statement ("SET STATEMENT does not support ..." in any language), so the name is
# put back. Any other answer (MySQL has no SET STATEMENT) leaves the judging to the evaluation.
ER_SUBQUERIES_NOT_SUPPORTED = 1970
ER_BAD_FIELD_ERROR = 1054
_SAME_RULE = b"SET STATEMENT max_statement_time = IF(0, (%s), 0) + 0 FOR DO 0"


def handle_kill_expression(session: Session, sql: bytes) -> None:
    """KILL <expression>: the server says what it says of the statement (its parse errors), the
    expression is evaluated on the killer's own backend, and the session with that proxy id is
    killed as for KILL <id>. Nothing else is ever killed: the backend never runs the KILL."""
    parts = split_kill_expression(sql)
    if parts is None:
        session.reply_error(ER_UNKNOWN_ERROR, "HY000",
                            "TiProxy: a KILL with a backslash in it is not evaluated")
        return
    evaluate_kill(session, parts)


def evaluate_kill(session: Session, parts: KillExpression) -> None:
    """A KILL <expression> taken apart (a query's, or a prepared statement's at each execute)."""
    session.hold_input("kill expression")  # the KILL it leads to holds "kill" of its own
    session.run_task(_evaluate(session, parts))


async def _evaluate(session: Session, parts: KillExpression) -> None:
    leg = session.backend_leg
    assert leg is not None
    eof = bool(session.backend_caps & Capability.DEPRECATE_EOF)
    leg.detach()
    target: int | None = None
    try:
        quoted = b"'" + parts.statement.replace(b"'", b"''") + b"'"
        try:
            await query(leg, b"PREPARE " + _PROBE + b" FROM " + quoted, eof)
        finally:
            session.state.sql_prepares += 1  # the server counts it even when it fails
        await query(leg, b"DEALLOCATE PREPARE " + _PROBE, eof)
        await _refuse_what_kill_refuses(leg, parts.expression, eof)
        # CONNECTION_ID() means the killer's own id, which the client knows as the proxy's.
        expression = CONNECTION_ID_CALL.sub(str(session.id).encode(), parts.expression)
        # BINARY: the session's character_set_results cannot re-encode the number
        result = await query(leg, b"SELECT CAST(CAST((" + expression + b") AS SIGNED) AS BINARY)",
                             eof)
        value = result.rows[0][0] if result.rows and result.rows[0] else None
        target = int(value) if value is not None else 0
    except SQLError as e:
        _reattached(session, leg)
        session.reply_error(e.code, e.sqlstate, _as_kills(e))
    except (OSError, TimeoutError, ProtocolError, ValueError) as e:
        if _reattached(session, leg):
            session.reply_error(ER_UNKNOWN_ERROR, "HY000",
                                f"TiProxy: KILL not evaluated: {str(e) or type(e).__name__}")
    else:
        if _reattached(session, leg):
            handle_kill(session, target, parts.query_only, parts.prefix)
    finally:
        session.release_input("kill expression")


async def _refuse_what_kill_refuses(leg: BackendLeg, expression: bytes, eof: bool) -> None:
    """Raise the server's ER_SUBQUERIES_NOT_SUPPORTED if KILL would refuse `expression`."""
    try:
        await query(leg, _SAME_RULE % expression, eof)
    except SQLError as e:
        if e.code == ER_SUBQUERIES_NOT_SUPPORTED:
            message = e.message.replace("SET STATEMENT", "KILL", 1)
            raise SQLError(e.code, e.sqlstate, message, e.origin) from e


def _as_kills(error: SQLError) -> str:
    """The evaluation's error as KILL words it: an unknown column is "in 'KILL'", not in the
    SELECT's 'field list'."""
    if error.code == ER_BAD_FIELD_ERROR:
        head, found, tail = error.message.rpartition("'field list'")
        if found:
            return head + "'KILL'" + tail
    return error.message


def _reattached(session: Session, leg: BackendLeg) -> bool:
    """Back on the hot path; a connection left in a bad state ends the session."""
    if leg.closed or not leg.clean:
        session.close("backend connection broke while a KILL was evaluated",
                      kind=counters.BACKEND_NETWORK)
        return False
    leg.attach(session)
    return True
