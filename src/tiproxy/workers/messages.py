"""The boundary between the control process and its workers: every message, and the link.

One Unix socket pair per worker carries length-prefixed pickles of the dataclasses below (both
ends are this program, started by the control process; nothing else can reach the socket).

Control to worker: Setup first, then Table whenever what a worker routes by changes, Config on a
reload, Credentials when the stored hashes change, TLSChanged when a context was rebuilt, Moves
from the rebalancer, CaptureStart to a worker that starts while a traffic capture runs (the
others are asked "capture_start", and the capture is started once they answered), Shutdown.
Worker to control: Stats once a second (counters), and the events the control plane acts on:
Failed, Succeeded, Doubt, SyncNow, LastingProblem, LogLine; while a capture runs, CaptureBatch
(its sessions' commands, for the one writer in the control process; sent only while the link
has room, else dropped and counted: a capture never holds up the link or the data path).
Session counts do not travel as messages: they are in shared memory (workers/shared.py), so
least-connections balancing and `max-connections` hold across workers at every login.
Either side may `ask` the other (Request/Reply): the control process asks a worker for its
sessions, its counters now, its movable sessions on the backends a rebalancing round would take
from, to redirect its sessions, for a KILL target, or to end a capture ("capture_stop": its
last batch comes first, then the commands it dropped); a worker asks the control process to find
a KILL target in another worker, or for the greeting to give clients when it knows none.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import pickle
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tiproxy.views.history import MoveHistory

if TYPE_CHECKING:
    from tiproxy.balance.balancer import MoveOrder
    from tiproxy.balance.router import Load
    from tiproxy.config import Config
    from tiproxy.discovery.base import DiscoveredBackend
    from tiproxy.protocol.packets import Greeting
    from tiproxy.session.credentials import CredentialSnapshot
    from tiproxy.tls.store import Material
    from tiproxy.traffic.sink import Record
    from tiproxy.views.counters import DataPlaneCounts
    from tiproxy.views.interface import SessionGauges

log = logging.getLogger("tiproxy.workers")

_LENGTH = struct.Struct("!I")
ASK_TIMEOUT = 5.0


# -- control to worker -----------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    config: Config
    index: int  # this worker's number, 0..count-1
    count: int
    incarnation: int  # how many times this worker has been started before
    tls: Mapping[str, Material | None]  # the contexts, as the control process built them
    log_level: int  # the control process's: a worker's records below it are not even sent
    first_id: int = 0  # after an upgrade: ids below it were the old process's


@dataclass(frozen=True)
class ConfigChanged:
    config: Config
    # The backend table as of this config, applied with it in one step: a login must never see
    # a user mapped to a namespace whose backends the worker has not got yet, or the reverse.
    table: Table | None = None


@dataclass(frozen=True)
class BackendState:
    """What the control plane knows of a backend; the worker keeps its own session count."""

    addr: str
    namespace: str
    sources: Mapping[str, DiscoveredBackend]
    drained_by: frozenset[str]
    health: str
    doubt: str
    failures: int
    retry_at: float  # time.monotonic(): the same clock in every process of the machine
    last_error: str
    load: Load
    galera: bool
    offers_tls: bool | None
    mariadb_capabilities: int | None
    move_problem: str
    slot: int  # its column in the shared session counts
    peers: int = 0  # the other proxies' sessions on it (discovery/peers.py)
    keep_unfit: str | None = None


@dataclass(frozen=True)
class Table:
    backends: tuple[BackendState, ...]
    template: Greeting | None


@dataclass(frozen=True)
class TLSChanged:
    tls: Mapping[str, Material | None]


@dataclass(frozen=True)
class Credentials:
    snapshot: CredentialSnapshot


@dataclass(frozen=True)
class Moves:
    orders: tuple[MoveOrder, ...]


@dataclass(frozen=True)
class CaptureStart:
    """Every session records its commands for a traffic capture until "capture_stop"."""


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class HandOver:
    """An upgrade: stop accepting, send the sessions to these receivers (net/handover.py),
    then end once no session that can travel is left."""

    receivers: tuple[str, ...]


# -- worker to control ---------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Totals since the worker started (the control process adds them up)."""

    counts: DataPlaneCounts  # what its sessions counted (views/counters.py)
    errors: Mapping[str, int]
    rejected: Mapping[str, int] = dataclasses.field(default_factory=dict)  # clients refused
    history: MoveHistory = dataclasses.field(default_factory=MoveHistory)  # for the page
    # Its sessions' moves and pins now: only in an answer to "stats" (a walk over the
    # sessions, made when the API asks), None in the reports of every second.
    gauges: SessionGauges | None = None


@dataclass(frozen=True)
class MemoryHigh:
    """Control to worker: why new clients are refused for memory now ("" when they are not)."""

    reason: str


@dataclass(frozen=True)
class Failed:
    addr: str
    reason: str


@dataclass(frozen=True)
class Succeeded:
    addr: str


@dataclass(frozen=True)
class Doubt:
    addr: str
    why: str


@dataclass(frozen=True)
class SyncNow:
    prefer: str = ""  # the backend to read first (its address), if any


@dataclass(frozen=True)
class LastingProblem:
    addr: str
    problem: str


@dataclass(frozen=True)
class CaptureBatch:
    """Captured commands (traffic/sink.py), their bytes, and what the worker dropped so far."""

    records: list[Record]
    size: int
    dropped: int


@dataclass(frozen=True)
class LogLine:
    """A worker's log record, written by the control process's handler (one log file)."""

    name: str
    level: int
    message: str


# -- either way ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    id: int
    # "sessions", "stats", "movable", "redirect", "kill_target", "backend_ids", "template"
    what: str
    arg: Any = None


@dataclass(frozen=True)
class Reply:
    id: int
    value: Any = None


Answer = Callable[[str, Any], Awaitable[Any]]


@dataclass
class Link:
    """One end of a worker's socket pair. `handle` takes the plain messages, `answer` the
    requests; run() returns when the other end is gone."""

    sock: socket.socket
    handle: Callable[[object], None]
    answer: Answer
    _reader: asyncio.StreamReader | None = None
    _writer: asyncio.StreamWriter | None = None
    _pending: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def send(self, message: object) -> None:
        if self._writer is None or self._writer.is_closing():
            return
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        self._writer.write(_LENGTH.pack(len(data)) + data)

    def full(self, limit: int) -> bool:
        """More than `limit` bytes wait to be written (the other end is behind), or it closed."""
        writer = self._writer
        return writer is None or writer.is_closing() \
            or writer.transport.get_write_buffer_size() > limit

    def send_if_room(self, message: object, limit: int) -> bool:
        """send(), unless full(limit): then nothing is sent and False says so."""
        if self.full(limit):
            return False
        self.send(message)
        return True

    async def ask(self, what: str, arg: Any = None, timeout: float = ASK_TIMEOUT) -> Any:
        """The other end's answer; raises TimeoutError, or ConnectionError once it is gone."""
        if self._writer is None or self._writer.is_closing():
            raise ConnectionError("worker link closed")
        request = Request(next(self._ids), what, arg)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request.id] = future
        try:
            self.send(request)
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(request.id, None)

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_unix_connection(sock=self.sock)

    async def ask_or_none(self, what: str, arg: Any = None,
                          timeout: float = ASK_TIMEOUT) -> Any:
        """ask(), or None when the other end does not answer in time or is gone."""
        try:
            return await self.ask(what, arg, timeout)
        except (TimeoutError, ConnectionError):
            return None

    async def run(self) -> None:
        if self._reader is None:
            await self.open()
        reader = self._reader
        assert reader is not None
        try:
            while True:
                try:
                    head = await reader.readexactly(_LENGTH.size)
                    message = pickle.loads(await reader.readexactly(_LENGTH.unpack(head)[0]))  # noqa: S301 - our own process
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if isinstance(message, Reply):
                    future = self._pending.get(message.id)
                    if future is not None and not future.done():
                        future.set_result(message.value)
                elif isinstance(message, Request):
                    task = asyncio.get_running_loop().create_task(self._answer(message))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                else:
                    self.handle(message)
        finally:
            self.close()

    async def _answer(self, request: Request) -> None:
        try:
            value = await self.answer(request.what, request.arg)
        except Exception:
            log.exception("request %r failed", request.what)
            value = None
        self.send(Reply(request.id, value))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("worker link closed"))
        with contextlib.suppress(OSError):
            self.sock.close()
