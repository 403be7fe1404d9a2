"""Replaying a capture against a server, every command compared with the captured one.

Theory of operation
-------------------
The capture's files are decoded in a thread (store.py, format.py) and the commands scheduled in
the order of the files, each at its captured start time scaled by `speed` (sent at once when
the replay is behind). Each captured connection id gets a connection of its own to the target,
logged in as `username` when its first command comes, which runs that connection's commands
one after another in their captured order; so transactions and sessions keep their shape, and
connections run side by side as they did. The target is the proxy's own SQL port when the API
runs the replay, or any MySQL server (the standalone `tiproxy-replayer`).

A connection speaks the protocol with the proxy's client code (client/admin.py for the login,
then the captured command payloads as they are): statement ids are mapped from the captured ones
to the target's (an execute whose statement is unknown is prepared from its captured text, as
TiProxy does); each response is read whole (outcome.py) and handed to the report with its
latency. A connection lost is reported and opened again at the next command.

Memory is bounded: at most MAX_PENDING decoded commands wait for their connections; the
decoding waits beyond that. A `read-only` replay runs only what sql.is_read_only allows (and the
statement commands of statements it prepared), as TiProxy does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tiproxy.client.admin import AdminConnection
from tiproxy.protocol.codec import U32
from tiproxy.protocol.constants import MAX_PAYLOAD, Capability, Command
from tiproxy.protocol.errors import ProtocolError, SQLError
from tiproxy.protocol.packets import frame
from tiproxy.traffic import sql
from tiproxy.traffic.format import Decoder, FormatError, TrafficCommand
from tiproxy.traffic.outcome import Outcome, OutcomeReader, expect_of
from tiproxy.traffic.report import ReplayReport
from tiproxy.traffic.store import StoreError, TrafficReader

log = logging.getLogger("tiproxy.traffic")

MIN_SPEED, MAX_SPEED = 0.1, 10.0
MAX_PENDING = 100_000
READ_BATCH = 256
RESPONSE_TIMEOUT = 600.0  # seconds for the next packet of a response
# Past cmd-end-time by this much, nothing later can come (the capture's order is kept within
# its reorder window): the files are read no further.
END_SLACK_NS = 10_000_000_000
# What replaying connections ask for besides the proxy's own login capabilities: captured
# queries may hold several statements, procedures several results. Not CLIENT_FOUND_ROWS:
# captures record changed rows (a client that asked for matched rows gets no rows affected).
REPLAY_CAPABILITIES = (Capability.MULTI_STATEMENTS | Capability.PS_MULTI_RESULTS
                       | Capability.DEPRECATE_EOF | Capability.LONG_FLAG)
_STATEMENT = frozenset((Command.STMT_EXECUTE, Command.STMT_SEND_LONG_DATA, Command.STMT_CLOSE,
                        Command.STMT_RESET, Command.STMT_FETCH))
_WRITES = frozenset((Command.CREATE_DB, Command.DROP_DB, Command.DELAYED_INSERT))
_RESET = bytes((Command.RESET_CONNECTION,))


class ReplayError(Exception):
    """A replay that cannot go on (a file it cannot read, without ignore-errs)."""


@dataclass(frozen=True)
class ReplaySpec:
    input: Path
    host: str
    port: int
    username: str
    password: str = field(repr=False)
    speed: float = 1.0
    read_only: bool = False
    ignore_errs: bool = False
    cmd_start_ns: int | None = None  # commands that started at or before it are skipped
    cmd_end_ns: int | None = None  # commands that started after it are skipped
    key: bytes | None = field(default=None, repr=False)
    tls: ssl.SSLContext | None = None


class Replay:
    """One replay; run() replays it all, the attributes say how far it got."""

    def __init__(self, spec: ReplaySpec) -> None:
        self.spec = spec
        self.report = ReplayReport(str(spec.input), f"{spec.host}:{spec.port}", spec.speed)
        self.decoded = 0
        self.last_cmd_ns = 0
        self._connections: dict[int, _Connection] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending = 0
        self._room = asyncio.Event()
        self._reading = True

    def stop_reading(self) -> None:
        """A graceful stop: no more commands are read; those read already are replayed."""
        self._reading = False
        self._room.set()

    async def run(self) -> None:
        """Replay the capture; raises ReplayError when its files cannot be read."""
        self.report.started = _now()
        reader = TrafficReader(self.spec.input, self.spec.key, self.spec.cmd_start_ns)
        decoder = Decoder(reader)
        try:
            await self._schedule(decoder)
            for conn in list(self._connections.values()):
                conn.queue.put_nowait(None)
            await asyncio.gather(*self._tasks)
        finally:
            for task in self._tasks:
                task.cancel()
            for conn in self._connections.values():
                conn.close()
            reader.close()
            self.report.finished = _now()

    async def _schedule(self, decoder: Decoder) -> None:
        loop = asyncio.get_running_loop()
        first: int | None = None
        started = 0.0
        spec = self.spec
        while self._reading and (batch := await asyncio.to_thread(self._read, decoder)):
            self.decoded += len(batch)
            if spec.cmd_end_ns is not None and batch[0].start_ns > spec.cmd_end_ns + END_SLACK_NS:
                self.report.count("skipped_by_time", len(batch))
                return
            kept = [c for c in batch if self._in_window(c)]
            self.report.count("skipped_by_time", len(batch) - len(kept))
            for command in kept:  # logged in ahead of their first command, as a client was
                if command.conn_id not in self._connections and command.cmd != Command.QUIT:
                    self._open(command.conn_id)
            for command in kept:
                if not self._reading:
                    return
                self.last_cmd_ns = command.start_ns
                if first is None:
                    first, started = command.start_ns, loop.time()
                delay = started + (command.start_ns - first) / 1e9 / spec.speed - loop.time()
                if delay > 0.0005:
                    await asyncio.sleep(delay)
                while self._pending >= MAX_PENDING and self._reading:
                    self._room.clear()
                    await self._room.wait()
                self._dispatch(command)

    def _in_window(self, command: TrafficCommand) -> bool:
        """Started after cmd-start-time (TiProxy's rule: not at it) and by cmd-end-time."""
        start, end = self.spec.cmd_start_ns, self.spec.cmd_end_ns
        return (start is None or command.start_ns > start) \
            and (end is None or command.start_ns <= end)

    def _read(self, decoder: Decoder) -> list[TrafficCommand]:
        """The next commands (in the decoding thread); [] at the end."""
        out: list[TrafficCommand] = []
        while len(out) < READ_BATCH:
            try:
                command = decoder.next()
            except (FormatError, StoreError) as e:
                if not self.spec.ignore_errs:
                    raise ReplayError(str(e)) from None
                log.warning("traffic replay: skipped what could not be read: %s", e)
                self.report.other_error("file", str(e), 0)
                decoder.skip_to_next()
                continue
            if command is None:
                break
            out.append(command)
        return out

    def _dispatch(self, command: TrafficCommand) -> None:
        self.report.count("read")
        conn = self._connections.get(command.conn_id)
        if conn is None:
            if command.cmd == Command.QUIT:
                return  # a connection that did nothing here
            conn = self._open(command.conn_id)
        if command.cmd == Command.QUIT:
            del self._connections[command.conn_id]  # it ends after its queue
        self._pending += 1
        conn.queue.put_nowait(command)

    def _open(self, conn_id: int) -> _Connection:
        conn = self._connections[conn_id] = _Connection(self, conn_id)
        task = asyncio.get_running_loop().create_task(conn.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return conn

    def done_one(self) -> None:
        self._pending -= 1
        self._room.set()

    @property
    def pending(self) -> int:
        return self._pending


class _Connection:
    """One captured connection, replayed on a connection of its own."""

    def __init__(self, replay: Replay, conn_id: int) -> None:
        self.replay = replay
        self.conn_id = conn_id
        self.queue: asyncio.Queue[TrafficCommand | None] = asyncio.Queue()
        self.admin: AdminConnection | None = None
        self.ids: dict[int, int] = {}  # captured statement id -> the target's
        self.texts: dict[int, bytes] = {}  # the target's statement id -> its text

    async def run(self) -> None:
        try:
            await self._connect()  # now, before its first command is due
            while (command := await self.queue.get()) is not None:
                try:
                    await self._execute(command)
                finally:
                    self.replay.done_one()
                if command.cmd == Command.QUIT:
                    break
        finally:
            self.close()

    def close(self) -> None:
        if self.admin is not None:
            self.admin.close()
            self.admin = None

    async def _execute(self, c: TrafficCommand) -> None:
        report = self.replay.report
        if c.cmd == Command.QUIT:
            return
        if self.replay.spec.read_only and not self._read_only(c):
            report.count("skipped_read_only")
            return
        admin = self.admin or await self._connect()
        if admin is None:
            report.count("not_replayed")
            return
        packet = _RESET if c.cmd == Command.CHANGE_USER else c.packet
        packet, text = await self._statement(admin, c, packet)
        started = time.perf_counter_ns()
        try:
            outcome = await self._run(admin, packet)
        except (OSError, TimeoutError, ProtocolError) as e:
            report.other_error("connection", f"lost during a command: {e or type(e).__name__}",
                               self.conn_id)
            report.count("not_replayed")
            self.close()
            self.ids.clear()
            return
        latency = time.perf_counter_ns() - started
        self._follow(c, packet, outcome, text)
        report.add(c, outcome, latency, sql.text_of(text), sql.digest(sql.text_of(text))
                   if text else "")

    async def _connect(self) -> AdminConnection | None:
        spec = self.replay.spec
        try:
            self.admin = await AdminConnection.open(
                spec.host, spec.port, spec.username, spec.password, tls=spec.tls,
                capabilities=REPLAY_CAPABILITIES)
        except (OSError, TimeoutError, SQLError, ProtocolError, ssl.SSLError) as e:
            self.replay.report.other_error("connect", str(e) or type(e).__name__, self.conn_id)
            return None
        self.ids.clear()
        self.texts.clear()
        return self.admin

    async def _statement(self, admin: AdminConnection, c: TrafficCommand,
                         packet: bytes) -> tuple[bytes, bytes]:
        """The packet with the target's statement id, and the statement's text."""
        cmd = packet[0]
        if cmd in (Command.QUERY, Command.STMT_PREPARE, Command.INIT_DB):
            return packet, packet[1:]
        if cmd not in _STATEMENT or len(packet) < 5:
            return packet, b""
        captured = U32.unpack_from(packet, 1)[0]
        target = self.ids.get(captured)
        if target is None and cmd == Command.STMT_EXECUTE and c.prepared_sql:
            # Replayed from the middle of its connection: prepare it first, as TiProxy does.
            prepare = bytes((Command.STMT_PREPARE,)) + c.prepared_sql
            with contextlib.suppress(OSError, TimeoutError, ProtocolError):
                prepared = (await self._run(admin, prepare)).prepared
                if prepared is not None:
                    target = self.ids[captured] = prepared[0]
                    self.texts[target] = c.prepared_sql
        if target is None:
            return packet, c.prepared_sql or b""
        text = self.texts.get(target) or c.prepared_sql or b""
        return packet[:1] + U32.pack(target) + packet[5:], text

    def _follow(self, c: TrafficCommand, packet: bytes, outcome: Outcome, text: bytes) -> None:
        """What the command did to the connection's statements."""
        cmd = packet[0]
        if cmd == Command.STMT_PREPARE and outcome.prepared is not None and c.ps_id:
            self.ids[c.ps_id] = outcome.prepared[0]
            self.texts[outcome.prepared[0]] = text
        elif cmd == Command.STMT_CLOSE and len(packet) >= 5:
            self.texts.pop(U32.unpack_from(packet, 1)[0], None)
            self.ids.pop(U32.unpack_from(c.packet, 1)[0], None)
        elif cmd == Command.RESET_CONNECTION and not outcome.error:
            self.ids.clear()
            self.texts.clear()

    async def _run(self, admin: AdminConnection, packet: bytes) -> Outcome:
        """Send one command and read its whole response."""
        leg = admin.leg
        leg.write(frame(packet, 0))
        reader = OutcomeReader(expect_of(packet), admin.deprecate_eof)
        parts: list[bytes] = []
        while not reader.done:
            seq, payload = await leg.read_packet(RESPONSE_TIMEOUT)
            if len(payload) == MAX_PAYLOAD:
                parts.append(payload)
                continue
            if parts:
                payload = b"".join((*parts, payload))
                parts = []
            reader.feed(payload)
            if reader.asked_for_file:
                reader.asked_for_file = False
                leg.write(frame(b"", seq + 1))  # no file: the capture has none to give
        return reader.outcome

    def _read_only(self, c: TrafficCommand) -> bool:
        cmd = c.cmd
        if cmd in (Command.QUERY, Command.STMT_PREPARE):
            return sql.is_read_only(c.packet[1:])
        if cmd in _STATEMENT:
            return len(c.packet) >= 5 and U32.unpack_from(c.packet, 1)[0] in self.ids
        return cmd not in _WRITES


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
