"""A worker process: the data plane for its share of the clients, fed by the control process.

It accepts on the listening sockets the control process bound and handed down (one
SO_REUSEPORT socket per address and worker, so the kernel spreads connections over workers),
and owns the sessions it accepts. It routes on its own replica of the backend table
(workers/replica.py): every field comes from the control process's Table, except the session
counts, which every worker keeps in shared memory (workers/shared.py): its own row it writes,
its peers' it reads, so least-connections holds across workers at every login without a round
trip. What its sessions learn that the control plane acts on (a backend refusing connections, a
doubt, a login no stored hash verifies, a lasting move problem) goes up as an event; the
control process's answer comes back as a table.

A worker that accepts a connection while another worker holds fewer sessions passes it there
before reading a byte (workers/handoff.py), so that few long-lived connections spread evenly too.

Run as `python -m tiproxy.workers.worker CHANNEL_FD COUNTS_FD INBOX_FD OUTBOX_FD,... LISTEN_FD...`
by the control process only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any

from tiproxy.logs import apply_level
from tiproxy.net.kill import KillTarget
from tiproxy.net.loop import install_event_loop
from tiproxy.net.server import EARLY_WINDOW, ProxyServer
from tiproxy.session.credentials import CredentialStore
from tiproxy.tls import CertStore
from tiproxy.traffic.writer import summarized
from tiproxy.workers import messages as m
from tiproxy.workers.handoff import Handoff
from tiproxy.workers.replica import LinkedControl, ReplicaRouter
from tiproxy.workers.shared import LAST_LOGIN, SESSIONS, SharedCounts

if TYPE_CHECKING:
    from tiproxy.config import Config
    from tiproxy.traffic.sink import Record

log = logging.getLogger("tiproxy.workers")

STATS_INTERVAL = 1.0
ID_SPACE = 1 << 32
CAPTURE_LINK_LIMIT = 16 * 1024 * 1024  # capture batches waiting on the link, at most


class WorkerServer(ProxyServer):
    """The data plane of one worker; see the module docstring."""

    def __init__(self, cfg: Config, setup: m.Setup, link: m.Link, counts: SharedCounts,
                 handoff: Handoff) -> None:
        router = ReplicaRouter(link, counts, setup.index)
        router.configure(cfg)
        super().__init__(cfg, router, CertStore(cfg, setup.tls), CredentialStore(),
                         LinkedControl(link, router, lambda: self.config().health.enable))
        self.replica = router
        self.link = link
        self.index, self.count = setup.index, setup.count
        self.counts = counts
        self.handoff = handoff
        counts.clear(self.index)
        self._next_id = setup.incarnation * 1_000_000
        self.take_ids_from(setup.first_id)
        self._passed: set[asyncio.Task[None]] = set()  # connections passed here, being set up

    async def start(self) -> None:
        await super().start()
        self._tasks.append(asyncio.get_running_loop().create_task(self._report()))
        self.handoff.start(self._passed_here)

    async def stop(self, timeout: float, linger: bool = False) -> None:
        self.handoff.stop()
        await super().stop(timeout, linger)

    # -- new connections kept even over the workers (workers/handoff.py) ---------------------

    def hand_off(self, transport: asyncio.BaseTransport) -> bool:
        worker = self.handoff.target(len(self.sessions))
        # (The transport's socket object costs a getsockname: asked for only to pass it.)
        return worker >= 0 and self.handoff.send(worker, transport.get_extra_info("socket"))

    def _passed_here(self, sock: socket.socket) -> None:
        if self._shutting_down:
            sock.close()
            return
        task = asyncio.get_running_loop().create_task(self.serve_passed(sock))
        self._passed.add(task)
        task.add_done_callback(self._passed.discard)

    # -- from the control process -------------------------------------------------------------

    def handle(self, message: object) -> None:
        if isinstance(message, m.Table):
            for addr in self.replica.apply(message):
                self._undrained(addr)
            self._drain_sessions()
        elif isinstance(message, m.Credentials):
            self.credentials.restore(message.snapshot)
            self.credentials_changed()
        elif isinstance(message, m.Moves):
            self.carry_out(message.orders)
        elif isinstance(message, m.ConfigChanged):
            if message.table is not None:  # first: the new config may name its backends
                for addr in self.replica.apply(message.table):
                    self._undrained(addr)
            self.router.configure(message.config)
            self.tls.require_backend_tls = message.config.security.require_backend_tls
            apply_level(message.config.log)  # what this worker sends the control process
            self.config_changed(message.config)
        elif isinstance(message, m.TLSChanged):
            self.tls.follow(message.tls)
        elif isinstance(message, m.MemoryHigh):
            self.memory_high = message.reason
        elif isinstance(message, m.CaptureStart):  # a capture that ran before this worker
            self.begin_capture(self._send_capture)

    def _send_capture(self, records: list[Record], size: int) -> bool:
        """A batch of the capture to the control process's writer, with what each response
        said rather than its bytes (traffic/writer.py)."""
        if self.link.full(CAPTURE_LINK_LIMIT):
            return False  # no need to read the responses of a batch that is dropped
        dropped = self.capture.dropped if self.capture is not None else 0
        batch, size = summarized(records)
        return self.link.send_if_room(m.CaptureBatch(batch, size, dropped), CAPTURE_LINK_LIMIT)

    async def answer(self, what: str, arg: Any) -> Any:
        if what == "sessions":
            return self.local_session_views()
        if what == "stats":
            return self._stats(gauges=True)
        if what == "movable":
            return dict(self.movable_now(arg))
        if what == "redirect":
            return self.redirect_local()
        if what == "kill_target":
            return self._local_kill_target(arg)
        if what == "backend_ids":
            return self.local_backend_ids(*arg)
        if what == "max_id":
            return await self.max_session_id()
        if what == "receiver":
            return (await self.open_receivers())[0]
        if what == "capture_start":
            self.begin_capture(self._send_capture)
            return True
        if what == "capture_stop":
            return await self.stop_capture()
        raise ValueError(what)

    def _local_kill_target(self, session_id: int) -> KillTarget | None:
        s = self.sessions.get(session_id)
        if s is None or s.backend is None or not s.backend_connection_id:
            return None
        s.named_by_kill()
        return KillTarget(s.id, s.user, s.backend.addr, s.backend_connection_id)

    # -- to the control process -----------------------------------------------------------------

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            self.link.send(self._stats())

    def _stats(self, gauges: bool = False) -> m.Stats:
        return m.Stats(self.metrics, self.server_errors(), dict(self.rejected),
                       history=self._history,  # pickled as it is sent
                       gauges=self.session_gauges() if gauges else None)

    def server_errors(self) -> dict[str, int]:
        return dict(self.tls.errors + self.errors)  # its TLS store: the contexts it followed

    # -- one proxy, seen from outside --------------------------------------------------------------

    def new_session_id(self) -> int:
        """Ids of worker i are i+1 modulo the worker count, so any process finds the owner;
        a restarted worker starts a million ids further on (a stale id names nobody)."""
        self._next_id += 1
        return (self._next_id * self.count + self.index) % ID_SPACE + 1

    async def max_session_id(self) -> int:
        return (self._next_id * self.count + self.index) % ID_SPACE + 1

    def take_ids_from(self, first_id: int) -> None:
        self._next_id = max(self._next_id, first_id // self.count + 1)

    def kill_target_elsewhere(self, session_id: int) -> bool:
        return (session_id - 1) % self.count != self.index

    async def find_kill_target(self, session_id: int) -> KillTarget | None:
        target: KillTarget | None = await self.link.ask_or_none("kill_target", session_id)
        return target

    async def backend_ids(self, addr: str, locks_only: bool) -> dict[int, int]:
        ids: dict[int, int] | None = await self.link.ask_or_none("backend_ids",
                                                                 (addr, locks_only))
        return ids if ids is not None else self.local_backend_ids(addr, locks_only)

    def session_opened(self, session: Any) -> None:
        super().session_opened(session)
        self.counts.set(self.index, SESSIONS, len(self.sessions))

    def session_closed(self, session: Any) -> None:
        super().session_closed(session)
        self.counts.set(self.index, SESSIONS, len(self.sessions))

    def logged_in(self) -> None:
        self.counts.set(self.index, LAST_LOGIN, int(time.monotonic() * 1000))

    def logins_recently(self) -> bool:
        return time.monotonic() * 1000 - self.counts.latest(LAST_LOGIN) < EARLY_WINDOW * 1000

    def over_capacity(self) -> bool:
        limit = self._config.proxy.max_connections
        return bool(limit) and self.counts.total(SESSIONS) > limit


class _Forward(logging.Handler):
    """Log records go to the control process, which writes the one log (stderr or the file)."""

    def __init__(self, link: m.Link, index: int) -> None:
        super().__init__()
        self._link = link
        self._prefix = f"[worker {index}] "

    def emit(self, record: logging.LogRecord) -> None:
        message = self._prefix + record.getMessage()
        if record.exc_info:
            message += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        self._link.send(m.LogLine(record.name, record.levelno, message))


async def _run(channel: socket.socket, counts_fd: int, listening: list[socket.socket],
               inbox: socket.socket, outboxes: list[socket.socket]) -> None:
    setup_received: asyncio.Future[m.Setup] = asyncio.get_running_loop().create_future()
    server: WorkerServer | None = None
    early: list[object] = []  # what came with Setup, for the server once it exists
    stop = asyncio.Event()
    departing: list[asyncio.Task[None]] = []  # an upgrade's handover, kept until done

    def handle(message: object) -> None:
        if isinstance(message, m.Setup) and not setup_received.done():
            setup_received.set_result(message)
        elif isinstance(message, m.Shutdown):
            stop.set()
        elif isinstance(message, m.HandOver) and server is not None:
            server.hand_over(list(message.receivers))
            departing.append(asyncio.get_running_loop().create_task(server.handed_over()))
            departing[-1].add_done_callback(lambda _task: stop.set())
        elif server is not None:
            server.handle(message)
        else:
            early.append(message)

    async def answer(what: str, arg: Any) -> Any:
        if server is None and what == "capture_start":
            early.append(m.CaptureStart())  # applied before the first session is accepted
            return True
        return await server.answer(what, arg) if server is not None else None

    link = m.Link(channel, handle, answer)
    link_task = asyncio.get_running_loop().create_task(link.run())
    setup = await setup_received
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(_Forward(link, setup.index))
    root.setLevel(setup.log_level)
    counts = SharedCounts(setup.count, counts_fd)
    server = WorkerServer(setup.config, setup, link, counts,
                          Handoff(setup.index, counts, inbox, outboxes))
    for message in early:
        server.handle(message)
    await server.serve_sockets(listening)
    await server.start()
    log.info("started (pid %d)", os.getpid())
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    stopping = asyncio.get_running_loop().create_task(stop.wait())
    done, _ = await asyncio.wait({stopping, link_task}, return_when=asyncio.FIRST_COMPLETED)
    if link_task in done:  # the control process is gone: nobody routes or restarts us
        await server.stop(timeout=0)
        return
    await server.stop(server.config().proxy.graceful_close_conn_timeout,
                      linger=bool(departing))  # an upgrade: sessions that stayed may end
    link.close()


def main(argv: list[str]) -> int:
    # A terminal's ^C or hang-up reaches the whole process group: the control process decides
    # (it shuts the workers down, or reloads and tells them).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    channel = socket.socket(fileno=int(argv[0]))
    inbox = socket.socket(fileno=int(argv[2]))
    outboxes = [socket.socket(fileno=int(fd)) for fd in argv[3].split(",")]
    listening = [socket.socket(fileno=int(fd)) for fd in argv[4:]]
    install_event_loop()
    asyncio.run(_run(channel, int(argv[1]), listening, inbox, outboxes))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
