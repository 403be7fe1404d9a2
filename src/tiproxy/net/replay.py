"""Transaction replay (`[proxy] transaction-replay = true`, ours): an open transaction that its
backend lost, or that ended in a deadlock or a lock wait timeout, is run again and goes on.

Theory of operation
-------------------
While a transaction is open the session records each command and a CRC-32 of the answer the
client got (session/txlog.py). The relay computes the CRC over the backend's chunks as it
forwards them, so recording costs one zlib call per chunk and nothing else on the data path.
- A deadlock (1213: the server rolled the transaction back) or a lock wait timeout (1205: only
  the statement was; the proxy rolls back the rest) is seen in the first chunk of a statement's
  answer, before it reaches the client. The proxy keeps that error back, runs the recorded
  commands again on the same backend and, if every answer is the one the client got, sends the
  failed statement again: the client sees its answer and never the error. Otherwise it rolls
  back and the client gets the original error. At most MAX_ATTEMPTS replays per transaction.
- When the backend is lost (net/recovery.py), the session is rebuilt elsewhere and the recorded
  commands run there, then the statement that was in flight, if any. A statement that may
  commit (COMMIT, or one that commits implicitly) whose answer never came has an outcome no one
  can know: it is never sent again, and its error says so.
Outcomes are counted by reason and result: `tiproxy_session_transaction_replay_total{reason,
replay_res}` (ours), reason "deadlock", "lock_wait_timeout" or "backend_lost".
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from typing import TYPE_CHECKING, Any

from tiproxy.client.channel import query
from tiproxy.net.recovery import SessionRecovery
from tiproxy.protocol.codec import U32
from tiproxy.protocol.constants import COMMAND_NAMES, Capability, Command, ServerStatus
from tiproxy.protocol.errors import ProtocolError, SQLError
from tiproxy.protocol.responses import Expect
from tiproxy.protocol.tracker import ResponseTracker
from tiproxy.session.statements import first_keyword
from tiproxy.session.txlog import DEFAULT_LIMIT, TransactionLog
from tiproxy.views import counters

if TYPE_CHECKING:
    from tiproxy.client.leg import BackendLeg

log = logging.getLogger("tiproxy.session")

ER_LOCK_DEADLOCK = 1213
ER_LOCK_WAIT_TIMEOUT = 1205
MAX_ATTEMPTS = 3  # replays of one transaction after deadlocks or timeouts
CONFLICT = "the replay met a deadlock or a lock wait timeout of its own"
_IN_TRANS = int(ServerStatus.IN_TRANS)
_QUERY = int(Command.QUERY)
_EXECUTE = int(Command.STMT_EXECUTE)
# Commands answered inside a transaction that change nothing a replay must do again.
_NOT_REPLAYED = frozenset((Command.PING, Command.STMT_PREPARE, Command.STMT_CLOSE,
                           Command.STMT_RESET, Command.STATISTICS, Command.FIELD_LIST,
                           Command.STMT_SEND_LONG_DATA))
# Statements that change data or read it, and commit nothing: one of these in flight when the
# backend died runs again after the replay. Anything else may have committed.
_INSIDE = frozenset((b"SELECT", b"INSERT", b"UPDATE", b"DELETE", b"REPLACE", b"WITH",
                     b"VALUES", b"TABLE", b"SAVEPOINT", b"DO", b"SHOW", b"DESCRIBE", b"DESC"))

# The proxy's own ROLLBACK on a replay's leg: whatever the session's completion_type says
# (CHAIN would open another transaction, RELEASE would end the connection).
_ROLLBACK = "ROLLBACK AND NO CHAIN NO RELEASE"


class TransactionReplay(SessionRecovery):
    """Mixed into Session (net/relay.py), after SessionRecovery."""

    if TYPE_CHECKING:  # provided by Session (net/relay.py): for the type checker only
        def packet_for_replay(self, packet: bytes) -> tuple[bytes, Expect]: ...
        def send_client(self, data: bytes) -> None: ...

    def __init__(self) -> None:
        super().__init__()
        self.replay_limit = 0  # transaction-replay's size limit as the session logged in; 0: off
        self.txlog: TransactionLog | None = None
        self.last_command = b""  # b"": the last command cannot be sent again as it was
        self.answer_crc = 0  # of the answer being relayed, while replay is on
        self._replaying = False

    def replay_configured(self, enabled: bool, limit: int) -> None:
        self.replay_limit = (limit or DEFAULT_LIMIT) if enabled else 0

    # -- recording --------------------------------------------------------------------------

    def track_transaction(self, token: Any, status: int) -> None:
        """A response ended (replay on): record its command while a transaction is open."""
        crc, self.answer_crc = self.answer_crc, 0
        if self._replaying:
            return
        if not status & _IN_TRANS:
            self.txlog = None
            return
        txlog = self.txlog
        if txlog is None:
            txlog = self.txlog = TransactionLog(self.replay_limit)
        packet = self.last_command
        cmd = packet[4] if len(packet) > 4 else -1
        if cmd in _NOT_REPLAYED:
            return
        why = self._unreplayable(token, cmd)
        if why:
            txlog.refuse(why)
        else:
            txlog.add(packet, crc)

    def _unreplayable(self, token: Any, cmd: int) -> str:
        assert self.tracker is not None
        if self.tracker.pending:
            return "its commands were pipelined"
        if cmd not in (_QUERY, _EXECUTE):
            return ("it ran a command the replay cannot send again" if cmd < 0
                    else f"it ran {COMMAND_NAMES.get(cmd, hex(cmd))}")
        if isinstance(token, tuple) and token[0] == "query":
            fx, variables = token[1], token[2]
            if variables is not None and (variables.stale or variables.replays):
                return "a statement in it assigned variables"
            if fx and fx.use_db is not None:
                return "it changed the current database"
        elif isinstance(token, tuple) and token[0] == "execute":
            stmt = self.state.stmts.get(token[1])
            if stmt is not None and stmt.variables is not None:
                return "a statement in it assigned variables"
        elif isinstance(token, tuple):
            return f"it ran {token[0]}"
        return ""

    # -- deadlocks and lock wait timeouts ---------------------------------------------------

    def replay_on_error(self, data: bytes, packet: bytes) -> bool:
        """The first chunk of the answer to `packet`, an ERR, while a transaction is recorded:
        True if it is kept back for a replay (1213, 1205), False to relay it as usual."""
        txlog = self.txlog
        if txlog is None or txlog.broken or len(data) < 7:
            return False
        if (U32.unpack_from(data, 0)[0] & 0xFFFFFF) + 4 != len(data):
            return False  # not one whole ERR packet alone
        code = data[5] | data[6] << 8
        if code not in (ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT):
            return False
        reason = "deadlock" if code == ER_LOCK_DEADLOCK else "lock_wait_timeout"
        if txlog.attempts >= MAX_ATTEMPTS:
            self._replayed(reason, f"it was replayed {MAX_ATTEMPTS} times already")
            return False
        txlog.attempts += 1
        self._replaying = True
        assert self.tracker is not None
        self.tracker.feed(data)  # the response ends here, as far as the tracker knows
        self.hold_input("replay")
        self._checkpoint_task = asyncio.get_running_loop().create_task(
            self._replay_here(txlog, bytes(data), packet, reason))
        return True

    async def _replay_here(self, txlog: TransactionLog, err: bytes, packet: bytes,
                           reason: str) -> None:
        leg = self.backend_leg
        assert leg is not None and self.tracker is not None
        eof = bool(self.backend_caps & Capability.DEPRECATE_EOF)
        leg.detach()
        # After a lock wait timeout only the statement was rolled back: the transaction first.
        why = await self._replay_on(leg, txlog, eof, rollback_first=reason == "lock_wait_timeout")
        if self.phase != 1:
            return
        if leg.closed or not leg.clean:
            self.close(f"backend connection broke during a transaction replay: {why}",
                       kind=counters.BACKEND_NETWORK)
            return
        leg.attach(self)
        self._replayed(reason, why)
        if why:
            self.txlog = None
            self.send_client(err)  # the client gets the error it would have had
        else:
            self.txlog = txlog
            self._cbuf[:0] = packet  # the statement that failed, once more
        self.release_input("replay")

    async def _replay_on(self, leg: BackendLeg, txlog: TransactionLog, eof: bool,
                         rollback_first: bool) -> str:
        """Run the recorded transaction on a detached leg; again when the replay meets a
        conflict of its own (a storm goes on), while attempts remain. On failure the
        transaction there is rolled back. Why it failed, or "" when every answer matched."""
        assert self.tracker is not None
        self._replaying = True
        try:
            if rollback_first:
                await query(leg, _ROLLBACK, eof)
            why, status = await replay_log(self, leg, txlog, eof)
            while why == CONFLICT and txlog.attempts < MAX_ATTEMPTS:
                txlog.attempts += 1
                await query(leg, _ROLLBACK, eof)
                why, status = await replay_log(self, leg, txlog, eof)
            if why:
                status = (await query(leg, _ROLLBACK, eof)).status
            self.tracker.status = status
        except (SQLError, ProtocolError, OSError, TimeoutError) as e:
            why = f"the replay failed: {e}"
        finally:
            self._replaying = False
        return why

    def _replayed(self, reason: str, why: str) -> None:
        self.server.metrics.replays[(reason, "fail" if why else "succeed")] += 1
        if why:
            log.warning("session %d: transaction not replayed after %s: %s", self.id,
                        reason.replace("_", " "), why)
        else:
            log.info("session %d: transaction replayed after %s", self.id,
                     reason.replace("_", " "))

    # -- a lost backend (recovery.py calls these) -------------------------------------------

    def replayable_transaction(self, inflight: bytes | None) -> TransactionLog | None:
        """The recorded transaction, if a replay can carry it to another backend (the command
        in flight, if any, must not be one that may have committed)."""
        txlog = self.txlog
        if not self.replay_limit or txlog is None or txlog.broken:
            return None
        if inflight is not None and not _inside_transaction(self, inflight):
            return None
        return txlog

    async def replay_elsewhere(self, txlog: TransactionLog) -> bool:
        """On the new backend the session was just rebuilt on: the recorded transaction."""
        leg = self.backend_leg
        assert leg is not None and self.tracker is not None
        eof = bool(self.backend_caps & Capability.DEPRECATE_EOF)
        leg.detach()
        why = await self._replay_on(leg, txlog, eof, rollback_first=False)
        if leg.closed or not leg.clean:
            self.close(f"backend connection broke during a transaction replay: {why}",
                       kind=counters.BACKEND_NETWORK)
            return False
        leg.attach(self)
        self._replayed("backend_lost", why)
        self.txlog = None if why else txlog
        return not why


def _inside_transaction(session: TransactionReplay, packet: bytes) -> bool:
    """Whether a command changes or reads data and commits nothing, so that it may run again
    after its transaction was replayed."""
    if packet[4] == _QUERY:
        return first_keyword(packet[5:]) in _INSIDE
    if packet[4] == _EXECUTE:
        stmt = session.state.stmts.get(U32.unpack_from(packet, 5)[0])
        return stmt is not None and first_keyword(stmt.sql) in _INSIDE
    return False


async def replay_log(session: TransactionReplay, leg: BackendLeg, txlog: TransactionLog,
                     deprecate_eof: bool) -> tuple[str, int]:
    """Run the recorded commands on a detached leg: ("", status after the last) when every
    answer is the one the client got, (CONFLICT, status) when one met a deadlock or a lock
    wait timeout of its own, else (why not, status)."""
    status = int(ServerStatus.AUTOCOMMIT)
    for packet, crc in txlog.entries:
        sent, kind = session.packet_for_replay(packet)
        got, status, error = await exchange(leg, sent, kind, deprecate_eof)
        if error in (ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT):
            return CONFLICT, status
        if got != crc:
            what = first_keyword(packet[5:]).decode() if packet[4] == _QUERY else \
                "COM_STMT_EXECUTE"
            return f"the answer to a {what or 'statement'} is not the one the client got", status
    return "", status


async def exchange(leg: BackendLeg, packet: bytes, kind: Expect,
                   deprecate_eof: bool) -> tuple[int, int, int]:
    """One command on a detached leg: (CRC-32 of its whole answer as the backend framed it,
    the status after it, its ERR's code or 0)."""
    ended: list[tuple[int, bool]] = []  # (status, failed)

    def done(_token: object, status: int, failed: bool) -> None:
        ended.append((status, failed))

    tracker = ResponseTracker(deprecate_eof, done)
    tracker.expect(kind)
    leg.write(packet)
    crc = 0
    while not ended:
        seq, payload = await leg.read_packet()
        framed = U32.pack(len(payload) | seq << 24) + payload
        crc = zlib.crc32(framed, crc)
        tracker.feed(framed)
    status, failed = ended[0]
    return crc, status, tracker.error if failed else 0
