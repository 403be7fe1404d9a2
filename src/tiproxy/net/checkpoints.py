"""What a session keeps as it runs so that it can be rebuilt without its backend
(net/recovery.py rebuilds it): the variables' checkpoint, the literal assignments made since,
and whether a statement since changed them in a way only the server knows ("stale").

A stale session takes a new checkpoint when its next command arrives, before that command runs
(commands that read the last statement's diagnostics, which a capture would clear, go first):
a session made stale by assignments from expressions reads only those variables by name,
anything else reads every variable. A statement (a query, or a prepared statement executed)
that only reads and assigns user variables from expressions has its answer held until those
variables are read right after it, so that the session is never stale for it; if the backend
dies first, the client never got the answer and the statement runs again where the session is
rebuilt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from tiproxy.net.login_phase import COMMAND
from tiproxy.net.moves import SessionMoves
from tiproxy.net.state_capture import (
    HiddenStateError,
    capture_named_variables,
    capture_state,
    capture_system_variables,
    capture_user_variables,
)
from tiproxy.protocol.errors import ProtocolError, SQLError
from tiproxy.session.dialects.mysql_restore import CapturedState
from tiproxy.session.rebuild import (
    VARS_ALL,
    VARS_NONE,
    VARS_SYSTEM,
    VARS_USER,
    Snapshot,
    VariableChanges,
    charset_change,
)
from tiproxy.session.sqltext import reads_diagnostics

log = logging.getLogger("tiproxy.session")

# Bounds of the assignments kept since the last checkpoint (each variable's last only): past
# them the session is stale, and its next command takes a checkpoint, which empties them. They
# stop a client that assigns ever new variables from growing the proxy's memory.
MAX_REPLAYS = 256
MAX_REPLAY_BYTES = 64 * 1024
CHECKPOINT_BACKOFF = 5.0  # after a checkpoint failed, seconds before the next try
# An answer kept back until the variables its statement assigned are read: past this size it
# goes on to the client (the session is then stale until its next command's checkpoint).
HELD_ANSWER_LIMIT = 256 * 1024


class SessionCheckpoints(SessionMoves):
    """Mixed into Session (net/relay.py) under SessionRecovery, whose rebuilds start from
    what it keeps."""

    # Provided by Session.
    dialect: str

    if TYPE_CHECKING:  # provided by Session and its other mixins: for the type checker only
        def _executed_sql(self, packet: bytes, cmd: int) -> bytes | None: ...
        def send_client(self, data: bytes) -> None: ...
        def backend_gone(self, exc: Exception | None,
                         unanswered: bytes | None = None) -> None: ...

    def __init__(self) -> None:
        super().__init__()
        self.checkpoint: CapturedState | None = None  # None: as the login left it
        self.replays: dict[bytes, bytes] = {}  # variable -> its last literal assignment
        self._replay_bytes = 0
        self.stale = VARS_NONE
        self._stale_system: set[str] = set()  # assigned from expressions: read at a checkpoint
        self.role_changed = False  # the current role may differ from the login's (pool.py)
        self._checkpoint_after = 0.0
        self._checkpoint_task: asyncio.Task[None] | None = None
        # The answer to a statement that assigned user variables from expressions, kept back
        # until they are read (then the statement it answers, and the names to read).
        self.held_answer: bytearray | None = None
        self._held_for: tuple[bytes, list[bytes]] = (b"", [])

    # -- keeping what a rebuild needs ---------------------------------------------------------

    def variables_changed(self, changes: VariableChanges, failed: bool) -> None:
        """A statement that assigns variables completed."""
        if changes.role:
            self.role_changed = True  # even if it failed part way
            if changes.role_set:
                self.state.role_set = True
        if not (changes.rerun_names and self.held_answer is not None):
            self.stale = max(self.stale, changes.stale)  # (else: read right after it)
        if failed:
            if changes.replays or changes.system_names:
                # Several statements, a later one failed: the assignments before it took.
                self.stale = VARS_ALL
            return
        if charset_change(changes, list(self.replays.values())):
            self.stale = VARS_ALL  # only a capture knows the literals' bytes now
        self._stale_system.update(name.decode() for name in changes.system_names)
        self._keep(changes.replays)

    def _keep(self, replays: list[tuple[bytes, bytes]]) -> None:
        """Assignments to run again: the last of each variable, in the order of the last ones."""
        for key, statement in replays:
            old = self.replays.pop(key, None)
            if old is not None:
                self._replay_bytes -= len(old)
            self.replays[key] = statement
            self._replay_bytes += len(statement)
        if len(self.replays) > MAX_REPLAYS or self._replay_bytes > MAX_REPLAY_BYTES:
            self.stale = VARS_ALL

    def variables_reset(self) -> None:
        """COM_RESET_CONNECTION or COM_CHANGE_USER: the server set every variable to its global
        value, not to what the login chose (SET NAMES included): only a capture is exact."""
        self._forget_replays()
        self.checkpoint = None
        self.stale = VARS_ALL

    def captured_whole(self, state: CapturedState | None) -> None:
        """A move or a checkpoint read every variable: it is the checkpoint now."""
        if state is None:
            return
        self.checkpoint = state
        self._forget_replays()
        self._stale_system.clear()
        self.stale = VARS_NONE

    def _forget_replays(self, users_only: bool = False) -> None:
        for key in [k for k in self.replays if not users_only or k.startswith(b"@")]:
            self._replay_bytes -= len(self.replays.pop(key))

    def snapshot(self) -> Snapshot:
        base = self.checkpoint or CapturedState()
        state = CapturedState(database=base.database, last_insert_id=base.last_insert_id,
                              system=list(base.system), user=list(base.user))
        if self.state.database_known:
            state.database = self.state.database
        return Snapshot(state, tuple(self.replays.values()))

    def rebuild_problem(self) -> str:
        """Why this session cannot be rebuilt without its backend; "" when it can."""
        if self.dialect != "mysql":
            return "a TiDB session is rebuilt from its server's own state, which is gone"
        if self.stale:
            return ("its variables changed since its last checkpoint in a way only its backend "
                    "knew")
        # A profiling session is rebuilt all the same: the profiles went with the backend
        # either way, and losing the session too would not give them back.
        pins = [why for kind, why in zip(self.state.pin_kinds(), self.state.pins(), strict=True)
                if kind != "profiling"]
        return "pinned: " + "; ".join(pins) if pins else ""

    # -- checkpoints ------------------------------------------------------------------------

    def checkpoint_due(self, packet: bytes, cmd: int) -> bool:
        """At a command's arrival: take a checkpoint first if the session is stale (and could
        be rebuilt with one). True: the command waits for it."""
        if not self.stale or self._moving or time.monotonic() < self._checkpoint_after:
            return False
        if self.dialect != "mysql" or self.state.pinned() or self.backend_leg is None \
                or self.state.counts_reset:  # (its counts cannot be compared: unseen)
            return False  # no checkpoint would make a rebuild possible
        if reads_diagnostics(packet, self._executed_sql(packet, cmd)):
            return False  # it reads what a capture would clear: it goes first
        self.hold_input("checkpoint")
        self._checkpoint_task = asyncio.get_running_loop().create_task(self._take_checkpoint())
        return True

    async def _take_checkpoint(self) -> None:
        leg = self.backend_leg
        assert leg is not None
        by_name = self.stale in (VARS_USER, VARS_SYSTEM)
        leg.detach()
        try:
            if by_name:
                system = sorted(self._stale_system)
                assignments = await capture_system_variables(
                    self, leg, system) if system else []  # type: ignore[arg-type]
                users, last_insert_id = await capture_user_variables(
                    self, leg)  # type: ignore[arg-type]
                base = self.checkpoint or CapturedState()
                base.user = users
                if last_insert_id is not None:
                    base.last_insert_id = last_insert_id
                self.checkpoint = base
                self._forget_replays(users_only=True)
                self._keep([(name.encode(), statement) for name, statement in assignments])
                self._stale_system.clear()
                if self.stale != VARS_ALL:  # (_keep: too many to keep)
                    self.stale = VARS_NONE
            else:
                self.captured_whole(await capture_state(self, leg))  # type: ignore[arg-type]
        except HiddenStateError as e:  # state made unseen: no rebuild could carry it
            self._checkpoint_after = time.monotonic() + CHECKPOINT_BACKOFF
            log.info("session %d cannot be rebuilt without its backend (looked at again in "
                     "%.0fs): %s", self.id, CHECKPOINT_BACKOFF, e)
        except (SQLError, ProtocolError, OSError, TimeoutError) as e:
            self._checkpoint_after = time.monotonic() + CHECKPOINT_BACKOFF
            if by_name:  # what could not be read by name: the next one reads everything
                self.stale, self._stale_system = VARS_ALL, set()
            log.info("session %d: checkpoint failed (tried again in %.0fs): %s", self.id,
                     CHECKPOINT_BACKOFF, e)
        finally:
            if self.phase == COMMAND:
                if leg.closed or not leg.clean:
                    self.backend_gone(None)
                else:
                    leg.attach(self)
                self.release_input("checkpoint")

    # -- an answer held until the variables its statement assigned are read ------------------

    def hold_answer(self, packet: bytes, changes: VariableChanges) -> None:
        """Before sending `packet`, a statement that only reads and assigns user variables
        from expressions: keep its answer back, read those variables right after it, then
        let the answer go. If the backend dies before they are read, the client never got the
        answer: the statement runs again, on the backend the session is rebuilt on."""
        if self.dialect != "mysql" or self.state.pinned() or self._moving \
                or self.tracker is None or not self.tracker.idle:
            return
        self.held_answer = bytearray()
        self._held_for = (packet, sorted(changes.rerun_names))
        self.hold_input("capture")

    def keep_answer(self, data: bytes) -> None:
        held = self.held_answer
        assert held is not None
        held += data
        if len(held) > HELD_ANSWER_LIMIT:  # too large to keep: it goes on, stale afterwards
            self.held_answer = None
            self.stale = max(self.stale, VARS_USER)
            self.send_client(bytes(held))
            self.release_input("capture")

    def answer_complete(self) -> None:
        """The held answer is whole: read the variables, then send it on."""
        self._checkpoint_task = asyncio.get_running_loop().create_task(self._read_assigned())

    async def _read_assigned(self) -> None:
        leg = self.backend_leg
        assert leg is not None
        packet, names = self._held_for
        leg.detach()
        try:
            users, last_insert_id = await capture_named_variables(
                self, leg, names)  # type: ignore[arg-type]
        except (OSError, TimeoutError, ProtocolError, SQLError) as e:
            if self.phase != COMMAND:
                return
            if leg.closed or not leg.clean:  # gone before the client saw the answer
                self.held_answer = None
                self.backend_gone(None, unanswered=packet)
                self.release_input("capture")
                return
            self.stale = max(self.stale, VARS_USER)
            log.info("session %d: reading its user variables failed: %s", self.id, e)
        else:
            base = self.checkpoint or CapturedState()
            wanted = set(names)
            base.user = [v for v in base.user if v.name not in wanted] + users
            base.last_insert_id = last_insert_id
            self.checkpoint = base
            for name in names:  # read after them: their assignments need not run again
                old = self.replays.pop(b"@" + name, None)
                self._replay_bytes -= len(old) if old is not None else 0
        if self.phase != COMMAND:
            return
        held, self.held_answer = self.held_answer, None
        leg.attach(self)
        if held:
            self.send_client(bytes(held))
        self.release_input("capture")
