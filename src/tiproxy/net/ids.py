"""Statements that name connection ids, made to show the proxy's: session/connid.py finds the
ids and rewrites the statement and its result; this part decides when (the backend idle, the
other sessions' ids known) and keeps the rewriter for the answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Literal

from tiproxy.protocol.constants import MAX_PAYLOAD, Capability
from tiproxy.protocol.packets import frame
from tiproxy.session.connid import ResultRewriter, find_id_uses, might_name_ids, rewrite
from tiproxy.session.prepared import packet_stmt_id

if TYPE_CHECKING:
    from tiproxy.balance.router import Backend
    from tiproxy.net.server import ProxyServer
    from tiproxy.protocol.tracker import ResponseTracker
    from tiproxy.session.state import SessionState

# COM_STMT_EXECUTE's flags byte: CURSOR_TYPE_READ_ONLY, FOR_UPDATE, SCROLLABLE
CURSOR_TYPES = 0x07


class ConnectionIds:
    """Mixed into Session (net/relay.py), whose attributes it uses."""

    # Provided by Session and its other mixins.
    server: ProxyServer
    id: int
    backend: Backend | None
    backend_connection_id: int
    backend_caps: int
    state: SessionState
    tracker: ResponseTracker | None
    _rewriter: ResultRewriter | None

    if TYPE_CHECKING:  # provided by Session: declared for the type checker only
        def hold_input(self, reason: str) -> None: ...
        def release_input(self, reason: str) -> None: ...
        def run_task(self, coro: Coroutine[Any, Any, None]) -> None: ...

    # Backend thread id -> proxy id on the backend named, for the statement that waits for it
    # (set only then: the class's None serves every session until one needs it).
    _id_map: tuple[str, dict[int, int]] | None = None

    def _connection_ids(self, packet: bytes, prepare: bool) -> bytes | Literal[False]:
        """A statement that names connection ids, made to show the proxy's (session/connid.py):
        the packet to send (the same one when nothing changes), or False to wait (for the
        backend to finish earlier responses, or for the other sessions' ids)."""
        sql = packet[5:]
        if len(sql) + 1 >= MAX_PAYLOAD or not might_name_ids(sql.lower()):
            return packet  # the first 16 MiB of a longer command goes as it came
        uses = find_id_uses(sql)
        backend = self.backend
        tracker = self.tracker
        if uses is None or backend is None or tracker is None:
            return packet
        if prepare:
            # Executed later, when other sessions' ids are not the ones known now: no lock call
            # is mapped, nor a processlist's rows (its CONNECTION_ID() stays the backend's).
            uses = dataclasses.replace(uses, lock_calls=())
        if not tracker.idle:
            return False  # the rewritten response must be the first one that comes back
        ids: dict[int, int] | None = None
        if uses.needs_holders and not prepare:
            known, self._id_map = self._id_map, None
            if known is None or known[0] != backend.addr:
                self._look_up_ids(backend.addr, locks_only=not uses.processlist)
                return False
            ids = known[1]
            ids[self.backend_connection_id] = self.id  # whatever it took without the proxy seeing
        out = rewrite(sql, uses, self.id, ids)
        if out.renames or (uses.processlist and ids):
            self._rewriter = ResultRewriter(
                out.renames, ids if uses.processlist and not prepare else None,
                show_processlist=uses.show_processlist, binary=prepare, prepare=prepare,
                deprecate_eof=bool(self.backend_caps & Capability.DEPRECATE_EOF),
                id_names=out.id_names)
        return frame(packet[4:5] + out.sql, 0) if out.sql != sql else packet

    def _look_up_ids(self, addr: str, locks_only: bool) -> None:
        self.hold_input("ids")

        async def look_up() -> None:
            self._id_map = (addr, await self.server.backend_ids(addr, locks_only))
            self.release_input("ids")

        self.run_task(look_up())

    def _renamed_execute(self, packet: bytes) -> Literal[False] | None:
        """An execute whose statement's column names come back rewritten; False: wait until
        the backend finished earlier responses."""
        stmt = self.state.stmts.get(packet_stmt_id(packet))
        if stmt is None or not stmt.renames:
            return None
        assert self.tracker is not None
        if not self.tracker.idle:
            return False
        self._rewriter = ResultRewriter(
            stmt.renames, None, show_processlist=False, binary=True, prepare=False,
            deprecate_eof=bool(self.backend_caps & Capability.DEPRECATE_EOF),
            cursor=len(packet) > 9 and bool(packet[9] & CURSOR_TYPES))
        return None
