"""A session's state as the proxy tracks it: prepared statements, pins, and what keeps it put.

The MySQL dialect reads most state from the backend at the moment of a move (variables, the
current database). What the backend cannot tell, the proxy keeps here as the session runs:
- the SQL text of every server-side prepared statement, its parameter types, and the statement
  id the client knows it by (which stays the same when the backend's id changes after a move);
- SQL-level prepared statements (PREPARE name FROM ...), to prepare them again;
- pins: temporary tables, named locks, table locks, open HANDLERs, pending long data, open
  cursors. A pinned session moves only once the pin is released.
Every map a client can grow is bounded by what the backend itself allows (max_prepared_stmt_count
and the like): the proxy only records what the backend accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tiproxy.session.commands import KillExpression, KillRequest, prepared_kill
from tiproxy.session.rebuild import VariableChanges, variable_changes
from tiproxy.session.statements import OPAQUE, StatementEffects, prepared_effects

# What may pin a session, as SessionState.pin_kinds names it (the metrics' labels).
PIN_KINDS = ("temporary_table", "named_lock", "lock_tables", "read_lock", "backup", "handler",
             "long_data", "cursor", "no_credential", "unreadable_statement", "unseen_state",
             "role", "profiling", "next_transaction", "prepared_from_variable")
MAX_TRACKED_USER_VARS = 1024  # a client naming more is pinned where they cannot be listed
MAX_USER_VAR_NAME = 64 * 4  # MariaDB refuses names over 64 characters (4 bytes each at most)
UNCOUNTED = -1  # (SessionState.lock_counts) a named lock taken an unknown number of times


@dataclass
class PreparedStatement:
    client_id: int  # what the client uses in COM_STMT_EXECUTE etc.
    backend_id: int  # what the current backend knows it by
    sql: bytes
    params: int
    columns: int
    param_types: bytes | None = None  # the types of the last execute that sent them
    effects: StatementEffects | None = None  # what executing it does to tracked state
    database: bytes | None = None  # the current database it was prepared in, if known
    long_data: bool = False  # COM_STMT_SEND_LONG_DATA since the last execute or reset
    cursor_open: bool = False
    types_sent: bool = True  # the current backend has seen param_types (False after a move)
    # Column names its results get back: its text had CONNECTION_ID() rewritten (connid.py)
    renames: tuple[tuple[bytes, bytes], ...] = ()
    # What executing it does to the session's variables (session/rebuild.py), if anything
    variables: VariableChanges | None = None
    # A KILL of a proxy id or of an expression: each execute is the proxy's to carry out
    # (net/kill.py), as the same KILL sent as a query would be
    kill: KillRequest | KillExpression | None = None

    def reset(self) -> None:
        """An execute or a COM_STMT_RESET: no long data and no open cursor from now on (the
        compiled relay path does the same for a COM_STMT_RESET, net/_hotpath.c)."""
        self.long_data = False
        self.cursor_open = False


NEXT_TRANSACTION = ("SET TRANSACTION for the next transaction only, which no variable shows "
                    "and so no move carries: the move waits until that transaction begins")
PROFILING = ("profiling (SET profiling): SHOW PROFILES lists what this connection ran, which "
             "no other connection can show")


@dataclass
class SessionState:
    stmts: dict[int, PreparedStatement] = field(default_factory=dict)
    # The client id of the statement prepared last: a statement command with id 0xFFFFFFFF
    # (MariaDB: "the one prepared last", sent right behind its COM_STMT_PREPARE by
    # Connector/C's execute_direct) means it on any backend, which a move must keep true.
    last_prepared: int | None = None
    # backend id -> client id, only once they differ (after a move); empty means identity
    to_client: dict[int, int] = field(default_factory=dict)
    sql_prepared: dict[str, bytes] = field(default_factory=dict)
    sql_prepared_db: dict[str, bytes | None] = field(default_factory=dict)  # prepared in
    # The current database as the proxy follows it (login, COM_INIT_DB, USE, moves); only
    # meaningful while database_known: prepared statements are prepared again in theirs.
    database: bytes | None = None
    database_known: bool = False
    # name -> what EXECUTE name does to tracked state (only those that do something)
    sql_prepared_effects: dict[str, StatementEffects] = field(default_factory=dict)
    opaque: str = ""  # a statement whose effects the proxy could not read ran: a pin
    # What the proxy saw succeed on this backend connection, to compare with what the server
    # counted (see unseen()); hidden: what the comparison found, a pin until a reset.
    temp_creates: int = 0
    sql_prepares: int = 0
    counts_reset: bool = False  # FLUSH STATUS since the last reset: the comparison is off
    hidden: str = ""
    # SQL PREPAREd from a variable: prepared again after a move, the variable's text now might
    # not be the text then. A pin until deallocated.
    opaque_prepared: set[str] = field(default_factory=set)
    session_only: set[str] = field(default_factory=set)  # set session-only variables
    temp_tables: set[str] = field(default_factory=set)
    named_locks: set[str] = field(default_factory=set)
    # How many times each named lock was taken (MariaDB's are counted: each RELEASE_LOCK gives
    # back one); UNCOUNTED where a statement may have taken it any number of times.
    lock_counts: dict[str, int] = field(default_factory=dict)
    table_locks: bool = False
    read_lock: bool = False  # FLUSH TABLES WITH READ LOCK (or FOR EXPORT) holds
    backup: bool = False  # BACKUP STAGE or BACKUP LOCK holds
    handlers: set[str] = field(default_factory=set)
    no_credential: str = ""  # why the proxy cannot log this user in elsewhere, if it cannot
    # SET ROLE ran: a new login has the account's default role, and no capture reads the current
    # one, so a move would change the session's privileges. COM_RESET_CONNECTION and
    # COM_CHANGE_USER keep the role (MariaDB 10.11), so this pin stays for the connection's life.
    role_set: bool = False
    # SET profiling = 1 ran: SHOW PROFILES lists the statements this connection ran, which no
    # other connection can show. The server keeps them through COM_RESET_CONNECTION (MariaDB
    # 10.11), so this pin too stays for the connection's life.
    profiling: bool = False
    # SET TRANSACTION (no SESSION) ran and no transaction has begun since: its characteristics
    # wait on this connection for the next one. Cleared by BEGIN, or once the session is seen in
    # a transaction (net/moves.py); a reset forgets them, as the server does.
    next_transaction: bool = False
    # User variables the session's statements named, for servers that cannot list them
    # (information_schema.USER_VARIABLES disabled). Bounded: past the bound the session is
    # pinned on such servers instead.
    user_var_names: set[bytes] = field(default_factory=set)
    user_vars_overflow: bool = False
    # A CALL ran (even one that failed part way): where the server can list user variables
    # neither in information_schema nor in performance_schema, what it set cannot be named.
    procedure_called: bool = False

    @property
    def mapped(self) -> bool:
        """Whether statement ids must be translated between client and backend."""
        return bool(self.to_client)

    # -- prepared statements ----------------------------------------------------------------

    def prepared(self, backend_id: int, sql: bytes, columns: int, params: int) -> int:
        """A COM_STMT_PREPARE succeeded; returns the id to give the client."""
        client_id = backend_id
        if self.mapped or backend_id in self.stmts:
            client_id = self._free_client_id(backend_id)
            if client_id != backend_id:
                self.to_client[backend_id] = client_id
        changes = variable_changes(sql)
        self.stmts[client_id] = PreparedStatement(
            client_id, backend_id, sql, params, columns, effects=prepared_effects(sql),
            database=self.database if self.database_known else None,
            variables=changes if changes.stale or changes.replays else None,
            kill=prepared_kill(sql))
        self.last_prepared = client_id
        return client_id

    def _free_client_id(self, wanted: int) -> int:
        candidate = wanted
        while candidate in self.stmts or candidate == 0:
            candidate = (candidate + 1) & 0xFFFFFFFF
        return candidate

    def closed(self, client_id: int) -> None:
        stmt = self.stmts.pop(client_id, None)
        if stmt is not None:
            self.to_client.pop(stmt.backend_id, None)
        if client_id == self.last_prepared:
            self.last_prepared = None

    def backend_id(self, client_id: int) -> int:
        stmt = self.stmts.get(client_id)
        return stmt.backend_id if stmt is not None else client_id

    def rebound(self, new_ids: dict[int, int]) -> None:
        """After a move: client id -> the new backend's id for every statement."""
        self.to_client = {}
        for client_id, backend_id in new_ids.items():
            stmt = self.stmts[client_id]
            stmt.backend_id = backend_id
            stmt.cursor_open = False
            stmt.types_sent = False
            if backend_id != client_id:
                self.to_client[backend_id] = client_id

    def note_user_vars(self, names: set[bytes]) -> None:
        if self.user_vars_overflow:
            return
        self.user_var_names |= {n for n in names if len(n) <= MAX_USER_VAR_NAME}
        if len(self.user_var_names) > MAX_TRACKED_USER_VARS:
            self.user_var_names.clear()
            self.user_vars_overflow = True

    # -- statements with effects ------------------------------------------------------------

    def ran(self, fx: StatementEffects, failed: bool) -> None:
        """A statement completed: what it did, if it succeeded; a CALL counts either way."""
        if not failed:
            self.apply(fx)
            return
        for one in fx.parts or (fx,):
            executed = self.sql_prepared_effects.get(one.executed) if one.executed else None
            if one.calls_procedure or (executed is not None and executed.calls_procedure):
                self.procedure_called = True

    def apply(self, fx: StatementEffects) -> None:
        """A statement succeeded: record what it did (a multi-statement text's statements
        one after the other)."""
        if fx.parts:
            for one in fx.parts:
                self.apply(one)
            return
        self.procedure_called = self.procedure_called or fx.calls_procedure
        self.profiling = self.profiling or fx.profiling
        if fx.next_transaction or fx.begins_transaction:
            self.next_transaction = fx.next_transaction  # BEGIN: the transaction that takes it
        self.counts_reset = self.counts_reset or fx.counts_reset
        self.temp_tables.update(fx.temp_created)
        self.temp_creates += len(fx.temp_created)
        for name in fx.temp_dropped:
            self.temp_tables.discard(name)
        if fx.table_locks is not None:
            self.table_locks = fx.table_locks
        if fx.read_lock is not None:
            self.read_lock = fx.read_lock
        if fx.backup is not None:
            self.backup = fx.backup
        if fx.named_lock is not None or fx.lock_released is not None or fx.all_locks_released:
            self._named_locks(fx)
        if fx.use_db is not None:
            self.use(fx.use_db)
        if fx.prepared is not None:
            self.sql_prepares += 1
            name = fx.prepared[0]
            self.sql_prepared[name] = fx.prepared[1]
            self.sql_prepared_db[name] = self.database if self.database_known else None
            self.sql_prepared_effects.pop(name, None)
            if fx.prepared_effects is not None:
                self.sql_prepared_effects[name] = fx.prepared_effects
            if fx.prepared_effects is OPAQUE:
                self.opaque_prepared.add(name)
            else:
                self.opaque_prepared.discard(name)
        if fx.deallocated is not None:
            self.sql_prepared.pop(fx.deallocated, None)
            self.sql_prepared_db.pop(fx.deallocated, None)
            self.opaque_prepared.discard(fx.deallocated)
            self.sql_prepared_effects.pop(fx.deallocated, None)
        if fx.executed is not None and fx.executed in self.sql_prepared_effects:
            self.apply(self.sql_prepared_effects[fx.executed])
        if fx.opaque:
            self.opaque = fx.opaque
        for name, is_set in fx.session_only:
            (self.session_only.add if is_set else self.session_only.discard)(name)
        if fx.handler_opened is not None:
            self.handlers.add(fx.handler_opened)
        if fx.handler_closed is not None:
            self.handlers.discard(fx.handler_closed)
        if fx.begins_transaction:
            self.table_locks = False  # START TRANSACTION releases table locks

    def use(self, database: bytes | None) -> None:
        """The current database is now known to be `database`."""
        self.database = database
        self.database_known = True

    def _named_locks(self, fx: StatementEffects) -> None:
        """GET_LOCK, RELEASE_LOCK, RELEASE_ALL_LOCKS. A lock is gone once given back as often
        as it was taken; one taken an unknown number of times stays (pinned) until
        RELEASE_ALL_LOCKS or a reset."""
        if (name := fx.named_lock) is not None:
            self.named_locks.add(name)
            held = self.lock_counts.get(name, 0)
            once = fx.lock_once and held != UNCOUNTED
            self.lock_counts[name] = held + 1 if once else UNCOUNTED
        if (name := fx.lock_released) is not None:
            held = self.lock_counts.get(name, 1)
            if held > 1:
                self.lock_counts[name] = held - 1
            elif held != UNCOUNTED:
                self.named_locks.discard(name)
                self.lock_counts.pop(name, None)
        if fx.all_locks_released:
            self.named_locks.clear()
            self.lock_counts.clear()

    def reset(self) -> None:
        """COM_RESET_CONNECTION or COM_CHANGE_USER: the server forgot all of it (on MariaDB the
        current database stays through COM_RESET_CONNECTION)."""
        kept = self.no_credential, self.role_set, self.profiling
        database, known = self.database, self.database_known
        self.__init__()  # type: ignore[misc]
        self.no_credential, self.role_set, self.profiling = kept
        self.database, self.database_known = database, known

    # -- pins -------------------------------------------------------------------------------

    def counts_unusable(self) -> str:
        """Why the server's per-connection counts cannot be compared (unseen), known before
        asking: FLUSH STATUS zeroed them. "" while they can."""
        if not self.counts_reset:
            return ""
        return ("FLUSH STATUS reset the server's counts of what this connection made, so they "
                "cannot be compared: reset the connection to move")

    def unseen(self, counts: dict[str, int]) -> str:
        """What this backend connection holds that the proxy never saw made, by the server's
        own per-connection counts (reset with the connection); "" when it holds nothing.

        The proxy reads temporary tables and SQL prepared statements from the statements it
        relays. Stored procedures, functions and triggers make them where it cannot look; MariaDB
        counts them all the same (COM_CREATE_TEMPORARY_TABLE, COM_PREPARE_SQL). The proxy counts
        the ones it saw succeed: the server counting more means some were made unseen (or failed,
        which the server counts too), and no move can carry them.
        """
        if self.counts_reset and counts:
            return self.counts_unusable()
        made = []
        if counts.get("COM_CREATE_TEMPORARY_TABLE", self.temp_creates) != self.temp_creates:
            made.append("a temporary table")
        if counts.get("COM_PREPARE_SQL", self.sql_prepares) != self.sql_prepares:
            made.append("a prepared statement")
        if not made:
            return ""
        return (" and ".join(made) + " made where the proxy cannot see (a stored procedure, "
                "function or trigger, or a statement that failed): reset the connection to move")

    def pinned(self) -> bool:
        """bool(pins()), without building the reasons for the usual session that has none."""
        if self.temp_tables or self.named_locks or self.table_locks or self.handlers \
                or self.read_lock or self.backup or self.no_credential or self.opaque \
                or self.hidden or self.opaque_prepared or self.role_set or self.profiling \
                or self.next_transaction:
            return True
        return bool(self.stmts) and bool(self.pins())

    def pins(self) -> list[str]:
        """Why this session cannot move now, besides the server status (transaction, cursor)."""
        return [why for _, why in self._pins()]

    def pin_kinds(self) -> list[str]:
        """The kinds of pins() (`temporary_table`, `named_lock`...): a few fixed names, for
        the metrics' labels, where no table or statement name may go."""
        return [kind for kind, _ in self._pins()] if self.pinned() else []

    def _pins(self) -> list[tuple[str, str]]:
        pins = []
        if self.temp_tables:
            pins.append(("temporary_table",
                         "temporary tables: " + ", ".join(sorted(self.temp_tables))))
        if self.named_locks:
            pins.append(("named_lock", "named locks (GET_LOCK)"))
        if self.table_locks:
            pins.append(("lock_tables", "LOCK TABLES"))
        if self.read_lock:
            pins.append(("read_lock", "FLUSH TABLES WITH READ LOCK"))
        if self.backup:
            pins.append(("backup", "BACKUP STAGE or BACKUP LOCK"))
        if self.handlers:
            pins.append(("handler", "open HANDLER"))
        if any(s.long_data for s in self.stmts.values()):
            pins.append(("long_data", "pending long data"))
        if any(s.cursor_open for s in self.stmts.values()):
            pins.append(("cursor", "open cursor"))
        if self.no_credential:
            pins.append(("no_credential", self.no_credential))
        if self.opaque:
            pins.append(("unreadable_statement", self.opaque))
        if self.hidden:
            pins.append(("unseen_state", self.hidden))
        if self.role_set:
            pins.append(("role", "SET ROLE: a move would give the session the account's default "
                         "role instead"))
        if self.profiling:
            pins.append(("profiling", PROFILING))
        if self.next_transaction:
            pins.append(("next_transaction", NEXT_TRANSACTION))
        if self.opaque_prepared:
            pins.append(("prepared_from_variable",
                         "statements prepared from a variable (deallocate them to move): "
                         + ", ".join(sorted(self.opaque_prepared))))
        return pins
