"""A client workload that notices every error, lost session state and lost row.

Theory of operation
-------------------
Each `SessionClient` is a thread with one PyMySQL connection that sets up session state of its
own (a current database, a user variable unique to it, a counter in a second user variable, a
session time_zone and sql_mode) and a table of its own, then loops until told to stop:

    BEGIN; INSERT (id, 0, @client); UPDATE that row; COMMIT      -- a write transaction
    SELECT one of its committed rows                             -- a point read
    SELECT the table's row count and checksum, DATABASE(), @client, @n := @n + 1,
           @@time_zone, @@sql_mode, UNIX_TIMESTAMP('2000-01-01')  -- the check

The check compares everything with what the client expects: a session state that differs
counts as lost state, a row count or checksum that differs as a row mismatch. An error counts
as an error; the client then rolls back. A connection that is gone is where the two modes part:
without `reconnect` (a client of a proxy that must keep sessions alive) the client stops there,
broken; with it (a client behind HAProxy, as an application's pool would) it logs in again,
counts a reconnect, checks the new session as it finds it (its state is gone: lost state) and
sets the state up again. A COMMIT whose answer never came has an unknown outcome; the client
looks for the row after reconnecting. `Workload.missing_rows` compares what the table holds
with what was acknowledged.
"""

from __future__ import annotations

import itertools
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pymysql

if TYPE_CHECKING:  # the stubs' Connection is generic, the runtime class is not
    from typing import TypeAlias

    Connection: TypeAlias = pymysql.connections.Connection[Any]
    Connect: TypeAlias = Callable[[], Connection]

DATABASE = "rolling"  # the clients' current database; they log in to another one
_EPOCH_2000 = 946_684_800  # UNIX_TIMESTAMP('2000-01-01 00:00:00') at UTC
# Session sql_modes the clients take, one per client in turn; none is the server's default and
# none changes how the workload's own statements parse (no ANSI, NO_BACKSLASH_ESCAPES).
_SQL_MODES = (
    "ANSI_QUOTES,STRICT_ALL_TABLES",
    "PIPES_AS_CONCAT,NO_ZERO_DATE",
    "ONLY_FULL_GROUP_BY,STRICT_TRANS_TABLES",
    "IGNORE_SPACE,NO_ENGINE_SUBSTITUTION",
    "HIGH_NOT_PRECEDENCE,STRICT_TRANS_TABLES",
    "NO_UNSIGNED_SUBTRACTION,NO_ZERO_IN_DATE",
    "ERROR_FOR_DIVISION_BY_ZERO,PAD_CHAR_TO_FULL_LENGTH",
    "ANSI_QUOTES,NO_DIR_IN_CREATE",
)
_PROBLEMS_KEPT = 20  # the first problems of each client, word for word; the rest are counted
_RECONNECT_PAUSE = 0.2  # between failed logins: a dead server must not make a busy loop
_STOP_TIMEOUT = 30.0


@dataclass
class Figures:
    """What a client (or, summed, the workload) saw."""

    commits: int = 0
    reads: int = 0
    checks: int = 0
    errors: int = 0  # statements that failed
    failed_logins: int = 0  # reconnect attempts that failed
    reconnects: int = 0  # new sessions after the first
    lost_state: int = 0  # checks that found the session state not as set
    row_mismatches: int = 0  # checks whose row count or checksum was not the committed rows'
    unknown_commits: int = 0  # COMMITs whose outcome the client never heard
    error_kinds: Counter[str] = field(default_factory=Counter)

    def add(self, other: Figures) -> None:
        for name in ("commits", "reads", "checks", "errors", "failed_logins", "reconnects",
                     "lost_state", "row_mismatches", "unknown_commits"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.error_kinds.update(other.error_kinds)

    def summary(self) -> str:
        return (f"errors={self.errors} lost_state={self.lost_state} "
                f"row_mismatches={self.row_mismatches} reconnects={self.reconnects} "
                f"failed_logins={self.failed_logins} unknown_commits={self.unknown_commits} "
                f"commits={self.commits} reads={self.reads}")


@dataclass(frozen=True)
class ExpectedState:
    """The session state a client set up, as the server reports it back."""

    database: str
    client: str
    time_zone: str
    sql_mode: str

    @property
    def epoch_2000(self) -> int:
        """UNIX_TIMESTAMP('2000-01-01 00:00:00') in this time zone (an offset like -03:30)."""
        sign = -1 if self.time_zone.startswith("-") else 1
        hours, minutes = self.time_zone.lstrip("+-").split(":")
        return _EPOCH_2000 - sign * (int(hours) * 3600 + int(minutes) * 60)


def _error_kind(exc: BaseException) -> str:
    code, message, *_ = (*exc.args, None, None)
    if isinstance(code, int):
        return f"{code} {str(message)[:60]}"
    return f"{type(exc).__name__} {str(exc)[:60]}"


class SessionClient(threading.Thread):
    """One client connection running the workload in its own thread (see the module's doc)."""

    def __init__(self, index: int, table: str, connect: Connect, stop: threading.Event,
                 *, reconnect: bool, pause: float) -> None:
        super().__init__(name=f"workload-{table}", daemon=True)
        self.index = index
        self.table = table
        self._connect = connect
        self._stop_event = stop
        self.reconnect = reconnect
        self.pause = pause
        self.figures = Figures()
        self.problems: list[str] = []
        self.acked: set[int] = set()  # ids whose COMMIT succeeded
        self.unknown: set[int] = set()  # ids whose COMMIT outcome is unknown
        self.ports: list[int] = []  # @@port of the backend at each check, runs collapsed
        self.thread_ids: list[int] = []  # PyMySQL thread_id() of each session
        self.broken = ""  # why the client stopped before being told to
        self.conn: Connection | None = None
        self.expected: ExpectedState | None = None
        self._counter = 0  # the value @n must have
        self._name = f"client-{index}-{secrets.token_hex(4)}"  # @client, kept across logins
        self._ids = itertools.count(1)
        self._rng = random.Random(index)

    # -- setting up -----------------------------------------------------------------------------

    def open(self) -> None:
        """Log in, set the session state up, create the table: before the thread starts."""
        self.conn = self._connect()
        self.thread_ids.append(self.conn.thread_id())
        with self.conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {DATABASE}.{self.table}")
            cur.execute(f"CREATE TABLE {DATABASE}.{self.table} (id INT PRIMARY KEY, "
                        "v INT NOT NULL, who VARCHAR(64) NOT NULL) ENGINE=InnoDB")
        self._set_state()

    def _set_state(self) -> None:
        assert self.conn is not None
        sign = "-" if self.index % 2 else "+"
        time_zone = f"{sign}{self.index % 12:02d}:{15 * (self.index % 4):02d}"
        with self.conn.cursor() as cur:
            cur.execute(f"USE {DATABASE}")
            cur.execute("SET @client = %s, @n = %s, SESSION time_zone = %s, SESSION sql_mode = %s",
                        (self._name, self._counter, time_zone,
                         _SQL_MODES[self.index % len(_SQL_MODES)]))
            cur.execute("SELECT DATABASE(), @client, @@time_zone, @@sql_mode")
            row = cur.fetchone()
        self.expected = ExpectedState(*row)

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                try:
                    self._iteration()
                except pymysql.Error as exc:
                    self._failed(exc)
                    if not self._recover():
                        return
                if self.pause:
                    time.sleep(self.pause)
        except Exception as exc:  # a bug in the workload: report it, never hang
            self.broken = f"workload bug: {exc!r}"

    def _iteration(self) -> None:
        assert self.conn is not None
        new_id = next(self._ids)
        with self.conn.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute(f"INSERT INTO {self.table} (id, v, who) VALUES (%s, 0, @client)",
                        (new_id,))
            cur.execute(f"UPDATE {self.table} SET v = id * 2 WHERE id = %s", (new_id,))
            self.unknown.add(new_id)
            cur.execute("COMMIT")
            self.unknown.discard(new_id)
            self.acked.add(new_id)
            self.figures.commits += 1
            some_id = self._rng.choice(tuple(self.acked))
            cur.execute(f"SELECT v FROM {self.table} WHERE id = %s", (some_id,))
            self.figures.reads += 1
            if cur.fetchone() != (some_id * 2,):
                self._problem("row_mismatches", f"row {some_id} is not as committed")
            self._check(cur)

    def _check(self, cur: Any) -> None:
        """Compare the session's state and its table with what this client did."""
        assert self.expected is not None
        cur.execute(
            f"SELECT COUNT(*), COALESCE(SUM(v = id * 2 AND who = @client), 0), DATABASE(), "
            f"@client, @n := @n + 1, @@time_zone, @@sql_mode, "
            f"UNIX_TIMESTAMP('2000-01-01 00:00:00'), @@port FROM {DATABASE}.{self.table}"
        )
        count, good, database, client, counter, time_zone, sql_mode, epoch, port = cur.fetchone()
        self.figures.checks += 1
        self._counter += 1
        if not self.ports or self.ports[-1] != port:
            self.ports.append(port)
        state = ExpectedState(database, client, time_zone, sql_mode)
        if state != self.expected or counter != self._counter or epoch != self.expected.epoch_2000:
            self._problem("lost_state", f"state {state}, @n={counter}, epoch={epoch} on port "
                          f"{port}; expected {self.expected}, @n={self._counter}")
        elif count != len(self.acked) or good != count:
            self._problem("row_mismatches", f"{count} rows ({good} as written) on port {port}; "
                          f"{len(self.acked)} committed")

    # -- when something fails -------------------------------------------------------------------

    def _problem(self, counter: str, text: str) -> None:
        setattr(self.figures, counter, getattr(self.figures, counter) + 1)
        if len(self.problems) < _PROBLEMS_KEPT:
            self.problems.append(f"{time.strftime('%H:%M:%S')} {counter}: {text}")

    def _failed(self, exc: BaseException) -> None:
        self.figures.error_kinds[_error_kind(exc)] += 1
        self._problem("errors", repr(exc))

    def _recover(self) -> bool:
        """After an error: go on if the session is alive, else reconnect or stop."""
        assert self.conn is not None
        try:
            with self.conn.cursor() as cur:
                cur.execute("ROLLBACK")
            self._resolve_unknown()
        except pymysql.Error as exc:
            gone = repr(exc)
        else:
            return True
        if self.conn.open:
            self.conn.close()
        if not self.reconnect:
            self.broken = f"connection lost: {gone}"
            return False
        return self._log_in_again()

    def _log_in_again(self) -> bool:
        while not self._stop_event.is_set():
            try:
                conn = self._connect()
            except pymysql.Error:
                self.figures.failed_logins += 1
                time.sleep(_RECONNECT_PAUSE)
                continue
            self.conn = conn
            self.figures.reconnects += 1
            self.thread_ids.append(conn.thread_id())
            try:
                self._resolve_unknown()
                with conn.cursor() as cur:
                    self._check(cur)  # the new session as found: its state is gone
                self._set_state()
            except pymysql.Error as exc:
                self._failed(exc)
                if conn.open:
                    conn.close()
                time.sleep(_RECONNECT_PAUSE)
                continue
            return True
        return False

    def _resolve_unknown(self) -> None:
        """Find out whether the COMMITs that got no answer took effect."""
        assert self.conn is not None
        if not self.unknown:
            return
        ids = sorted(self.unknown)
        with self.conn.cursor() as cur:
            cur.execute(f"SELECT id FROM {DATABASE}.{self.table} WHERE id IN %s", (ids,))
            landed = {row[0] for row in cur.fetchall()}
        self.figures.unknown_commits += len(ids)
        self.acked |= landed
        self.unknown.clear()


class Workload:
    """`clients` SessionClients, each with a table `{tag}_c{i}` in DATABASE."""

    def __init__(self, connect: Connect, tag: str, clients: int = 8, *, reconnect: bool = False,
                 pause: float = 0.005) -> None:
        self._stop = threading.Event()
        self.clients = [SessionClient(i, f"{tag}_c{i}", connect, self._stop, reconnect=reconnect,
                                      pause=pause) for i in range(clients)]

    def start(self) -> None:
        for client in self.clients:
            client.open()
        for client in self.clients:
            client.start()

    def stop(self) -> None:
        """Tell every client to stop and wait for them; raise if one hangs."""
        self._stop.set()
        deadline = time.monotonic() + _STOP_TIMEOUT
        for client in self.clients:
            if client.ident is not None:  # started
                client.join(max(deadline - time.monotonic(), 0.1))
        hung = [c.name for c in self.clients if c.is_alive()]
        if hung:
            raise RuntimeError(f"workload threads did not stop: {hung}")

    def close(self) -> None:
        for client in self.clients:
            if client.conn is not None and client.conn.open:
                client.conn.close()

    def commits(self) -> list[int]:
        """Each client's commits so far (progress is measured as differences of these)."""
        return [c.figures.commits for c in self.clients]

    def figures(self) -> Figures:
        total = Figures()
        for client in self.clients:
            total.add(client.figures)
        return total

    def problems(self) -> list[str]:
        """The clients that stopped and why, then every client's first problems."""
        return [f"{c.table} (session {c.thread_ids[0]}): stopped: {c.broken}"
                for c in self.clients if c.broken] + [
            f"{c.table}: {p}" for c in self.clients for p in c.problems]

    def missing_rows(self, conn: Connection) -> dict[str, tuple[int, int]]:
        """{table: (acknowledged rows missing, rows present but never acknowledged)} seen
        through conn, only for the tables where either is not zero."""
        result = {}
        with conn.cursor() as cur:
            for client in self.clients:
                cur.execute(f"SELECT id FROM {DATABASE}.{client.table}")
                present = {row[0] for row in cur.fetchall()}
                missing, extra = client.acked - present, present - client.acked
                if missing or extra:
                    result[client.table] = (len(missing), len(extra))
        return result
