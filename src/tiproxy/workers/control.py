"""The worker processes of `[proxy] workers` > 1, kept by the control process.

The control process runs the Cluster (control/cluster.py) and the API, as a one-process proxy
does, with Workers as the holder of the sessions (control/proxy.py) instead of a ProxyServer.
Workers binds every listening address once per worker (workers/sockets.py; SO_REUSEPORT: the
kernel spreads new connections over the sockets) and starts each worker with its sockets; it
keeps its own copies open, so a worker that dies leaves its queue of new connections intact for
the one that replaces it. The control process holds no session:
- every 100 ms each worker gets the backend table if it changed (at once after a drain), so
  routing a new connection never waits for this process;
- the workers' session counts are in shared memory (workers/shared.py): the backends'
  connections here are their sums, so the rebalancer, the API and `/metrics` see one proxy;
  counters add up the live workers' and those of workers that died before
  (workers/summed.py);
- a worker that dies is logged, counted (tiproxy_server_err{type="worker_died"}) and started
  again, sooner or later depending on how long it lived; the others go on untouched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from tiproxy.balance.balancer import MoveOrder
from tiproxy.net.keepalive import apply_keepalive_socket
from tiproxy.workers import messages as m
from tiproxy.workers.handoff import Cover, socket_pairs
from tiproxy.workers.shared import FIRST_SLOT, SESSIONS, SLOTS, SharedCounts
from tiproxy.workers.sockets import bind_listeners
from tiproxy.workers.summed import Retired, SummedViews

if TYPE_CHECKING:
    from collections.abc import Sequence

    from tiproxy.config import Config
    from tiproxy.control.cluster import Cluster
    from tiproxy.control.upgrade import Takeover
    from tiproxy.net.kill import KillTarget
    from tiproxy.traffic.sink import Deliver

log = logging.getLogger("tiproxy.workers")

PUSH_INTERVAL = 0.1
RESTART_FIRST = 0.5
RESTART_MAX = 30.0
STABLE_AFTER = 30.0  # a worker that lived this long restarts at once again if it dies
RECEIVER_TIMEOUT = 30.0  # an upgrade's new workers: seconds to start and open their receivers


@dataclasses.dataclass
class WorkerSlot:
    index: int
    incarnation: int = 0
    proc: asyncio.subprocess.Process | None = None
    link: m.Link | None = None
    reader: asyncio.Task[None] | None = None  # link.run(), kept so that it is not collected
    stats: m.Stats | None = None
    movable: Counter[str] = dataclasses.field(default_factory=Counter)  # as last asked
    sent: m.Table | None = None

    @property
    def live(self) -> bool:
        return self.link is not None and self.proc is not None and self.proc.returncode is None


class Workers(SummedViews):
    """The worker processes, as control/proxy.py's SessionHolder; see the module docstring."""

    def __init__(self, cluster: Cluster, count: int, takeover: Takeover | None = None) -> None:
        self.cluster = cluster
        self.count = count
        self._takeover = takeover  # an upgrade's new process: sockets from the old one
        self._workers = [WorkerSlot(i) for i in range(count)]
        self._listening: list[list[socket.socket]] = [[] for _ in range(count)]
        self._retired = Retired()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.errors: Counter[str] = Counter()
        self.counts = SharedCounts(count)
        self._handoff = socket_pairs(count)  # kept here: a worker started again gets its own
        outboxes = [pair[1] for pair in self._handoff]
        self._covers = [Cover(i, self.counts, outboxes) for i in range(count)]  # a dead one's
        self._slots: dict[str, int] = {}  # backend addr -> its column in self.counts
        self._table: m.Table | None = None  # the last table built
        self._memory_high = ""  # as last told to the workers
        self._capture: Deliver | None = None  # where a running capture's batches go
        self._capture_dropped: Counter[int] = Counter()  # by worker; -1: here, no room
        cluster.on_credentials = lambda: self._broadcast(
            m.Credentials(cluster.credentials.snapshot()))
        cluster.tls.changed = lambda: self._broadcast(m.TLSChanged(cluster.tls.materials()))

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every address for every worker (an address in use fails the start here),
        then start the workers."""
        cfg = self.cluster.config
        if self._takeover is not None:
            self._take_sockets(self._takeover)
        for addr in cfg.proxy.listen_addrs if self._takeover is None else ():
            for i, socks in enumerate(bind_listeners(addr, self.count)):
                for sock in socks:
                    apply_keepalive_socket(sock, cfg.proxy.frontend_keepalive)
                self._listening[i] += socks
            port = self._listening[0][-1].getsockname()[1]
            log.info("proxy listening on %s (port %d) for %d workers", addr, port, self.count)
        loop = asyncio.get_running_loop()
        for worker in self._workers:
            await self._spawn(worker)
        self._tasks += [loop.create_task(self._supervise(w)) for w in self._workers]
        self._tasks.append(loop.create_task(self._push()))

    def _take_sockets(self, takeover: Takeover) -> None:
        """The old process's listening sockets, as many groups as it had workers: worker i
        accepts on group i (a group also serves other workers when there are fewer groups
        than workers: several processes may accept on one socket), and on every group j
        beyond the workers with j modulo their count, so that no queue is left unserved."""
        groups = takeover.sockets()
        for i in range(max(self.count, len(groups))):
            self._listening[i % self.count] += [s for s in groups[i % len(groups)]
                                                if s not in self._listening[i % self.count]]
        log.info("proxy listening on the previous process's sockets for %d workers", self.count)

    # -- an upgrade (control/upgrade.py) ------------------------------------------------------

    def listening(self) -> list[list[socket.socket]]:
        return self._listening

    async def max_session_id(self) -> int:
        ids = [await w.link.ask_or_none("max_id", None) for w in self._workers
               if w.live and w.link is not None]
        return max((i for i in ids if i is not None), default=0) + len(self._workers)

    async def open_receivers(self) -> list[str]:
        """Each worker opens its handover receiver (once it has started); their names, by
        worker index."""
        names = []
        deadline = time.monotonic() + RECEIVER_TIMEOUT
        for worker in self._workers:
            name = None
            while not isinstance(name, str):
                if time.monotonic() > deadline:
                    raise OSError(f"worker {worker.index} opened no handover receiver")
                name = await worker.link.ask_or_none("receiver", None) if worker.link else None
                if not isinstance(name, str):
                    await asyncio.sleep(0.1)  # not started yet
            names.append(name)
        return names

    def hand_over(self, receivers: list[str]) -> None:
        """Every worker hands its sessions over and ends; none is started again."""
        self._stopping = True
        self._close_listening()
        self._broadcast(m.HandOver(tuple(receivers)))

    def _close_listening(self) -> None:
        for cover in self._covers:  # (a dead worker's, served here until now)
            cover.stop()
        for socks in self._listening:
            for sock in socks:
                sock.close()

    async def handed_over(self) -> None:
        procs = [w.proc for w in self._workers if w.proc is not None]
        await asyncio.gather(*(p.wait() for p in procs))

    async def _spawn(self, worker: WorkerSlot) -> None:
        parent, child = socket.socketpair()
        outboxes = ",".join(str(pair[1].fileno()) for pair in self._handoff)
        fds = [child.fileno(), self.counts.fd, self._handoff[worker.index][0].fileno(),
               *(s.fileno() for s in self._listening[worker.index])]
        worker.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tiproxy.workers.worker", *map(str, fds[:3]), outboxes,
            *map(str, fds[3:]), pass_fds=fds + [pair[1].fileno() for pair in self._handoff])
        child.close()
        link = m.Link(parent, lambda msg: self._handle(worker, msg),
                      self._answer)
        await link.open()
        worker.link, worker.stats, worker.sent = link, None, None
        cluster = self.cluster
        link.send(m.Setup(cluster.config, worker.index, self.count, worker.incarnation,
                          cluster.tls.materials(), logging.getLogger().level,
                          self._takeover.first_id if self._takeover is not None else 0))
        link.send(m.Credentials(cluster.credentials.snapshot()))
        if self._memory_high:
            link.send(m.MemoryHigh(self._memory_high))
        if self._capture is not None:
            link.send(m.CaptureStart())
        self._send_tables(only=worker)
        worker.reader = asyncio.get_running_loop().create_task(link.run())

    async def _supervise(self, worker: WorkerSlot) -> None:
        delay = RESTART_FIRST
        while True:
            assert worker.proc is not None
            started = time.monotonic()
            code = await worker.proc.wait()
            if worker.link is not None:
                worker.link.close()
            if self._stopping:
                return
            lost = self.counts.get(worker.index, SESSIONS)
            if worker.stats is not None:
                self._retired.add(worker.stats)
            worker.stats, worker.link = None, None
            self.counts.clear(worker.index)
            self._recount()
            self.errors["worker_died"] += 1
            delay = RESTART_FIRST if time.monotonic() - started > STABLE_AFTER \
                else min(RESTART_MAX, delay * 2)
            log.error("worker %d (pid %d) exited with %s: its %d sessions are lost; "
                      "starting it again in %.1fs", worker.index, worker.proc.pid,
                      _exit_status(code), lost, delay)
            cover = self._covers[worker.index]
            cover.start(self._listening[worker.index])
            try:
                await asyncio.sleep(delay)
            finally:
                cover.stop()
            if self._stopping:  # (an upgrade began meanwhile: this process starts no worker)
                return
            worker.incarnation += 1
            await self._spawn(worker)

    async def stop(self, timeout: float, linger: bool = False) -> None:
        """The workers close their sessions gracefully within `timeout`; new connections are
        refused from the moment this starts (the listening sockets close here and in the
        workers)."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        self._close_listening()
        self._broadcast(m.Shutdown())
        procs = [w.proc for w in self._workers if w.proc is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), timeout + 5)
        except TimeoutError:
            stuck = [p for p in procs if p.returncode is None]
            log.error("workers %s did not stop in time; killed",  # noqa: TRY400
                      [p.pid for p in stuck])
            for proc in stuck:
                proc.kill()
        for pair in self._handoff:  # (a connection passed on and not taken ends here)
            for end in pair:
                end.close()

    # -- from the workers -------------------------------------------------------------------

    def _handle(self, worker: WorkerSlot, message: object) -> None:
        cluster = self.cluster
        backend = cluster.router.backends.get(getattr(message, "addr", ""))
        if isinstance(message, m.Stats):
            if message.gauges is None and worker.stats is not None:  # as last asked
                message = dataclasses.replace(message, gauges=worker.stats.gauges)
            worker.stats = message
        elif isinstance(message, m.LogLine):
            logging.getLogger(message.name).log(message.level, "%s", message.message)
        elif isinstance(message, m.SyncNow):
            cluster.sync_soon(message.prefer)
        elif isinstance(message, m.CaptureBatch):
            self._captured(worker, message)
        elif backend is None:
            return
        elif isinstance(message, m.Failed):
            cluster.router.failed(backend, message.reason)
        elif isinstance(message, m.Succeeded):
            cluster.router.succeeded(backend, None)
        elif isinstance(message, m.Doubt):
            cluster.doubt(backend, message.why)
        elif isinstance(message, m.LastingProblem):
            cluster.lasting_problem(backend, message.problem)

    async def _answer(self, what: str, arg: Any) -> Any:
        if what == "kill_target":
            return await self._find_kill_target(int(arg))
        if what == "backend_ids":
            ids: dict[int, int] = {}
            for _, part in await self._ask_all("backend_ids", arg):
                ids.update(part)
            return ids
        if what == "template":
            if self.cluster.router.template is None:
                await self.cluster.probe_template()
            return self.cluster.router.template
        raise ValueError(what)

    async def _find_kill_target(self, session_id: int) -> KillTarget | None:
        owner = self._workers[(session_id - 1) % self.count]
        if not owner.live or owner.link is None:
            return None
        target: KillTarget | None = await owner.link.ask_or_none("kill_target", session_id)
        return target

    def _captured(self, worker: WorkerSlot, batch: m.CaptureBatch) -> None:
        self._capture_dropped[worker.index] = batch.dropped
        if self._capture is None or not self._capture(batch.records, batch.size):
            self._capture_dropped[-1] += len(batch.records)

    def _slot(self, addr: str) -> int:
        slot = self._slots.get(addr)
        if slot is None:
            slot = FIRST_SLOT + len(self._slots) % SLOTS  # past SLOTS: the oldest again
            self._slots[addr] = slot
        return slot

    def _recount(self) -> None:
        for backend in self.cluster.router.backends.values():
            backend.connections = self.counts.total(self._slot(backend.addr))

    # -- to the workers ---------------------------------------------------------------------

    async def _push(self) -> None:
        while True:
            await asyncio.sleep(PUSH_INTERVAL)
            self._recount()
            self.cluster.router.forget_empty()
            self._send_tables()

    def _send_tables(self, only: WorkerSlot | None = None) -> None:
        """The table, built once, to every worker (or `only`) whose last one differs."""
        table = self._current_table()
        for worker in self._workers if only is None else [only]:
            if worker.live and worker.link is not None and worker.sent is not table:
                worker.link.send(table)
                worker.sent = table

    def _current_table(self) -> m.Table:
        router = self.cluster.router
        table = m.Table(
            tuple(m.BackendState(
                b.addr, b.namespace, dict(b.sources), frozenset(b.drained_by), b.health,
                b.doubt, b.failures, b.retry_at, b.last_error, dataclasses.replace(b.load),
                b.galera, b.offers_tls, b.mariadb_capabilities, b.move_problem,
                self._slot(b.addr), b.peers, b.keep_unfit,
            ) for b in router.backends.values()),
            router.template,
        )
        if table == self._table:
            table = self._table  # unchanged: the workers that have it are known by identity
        self._table = table
        return table

    def _broadcast(self, message: object) -> None:
        for worker in self._workers:
            if worker.live and worker.link is not None:
                worker.link.send(message)

    def config_changed(self, cfg: Config) -> None:
        """The config with the table it makes (the Cluster has applied it): namespaces change
        the users' and the backends' side at once."""
        table = self._current_table()
        self._broadcast(m.ConfigChanged(cfg, table))
        for worker in self._workers:
            if worker.live and worker.link is not None:
                worker.sent = table

    def drained(self, addr: str, drain: bool) -> None:
        self._send_tables()  # at once, not at the next push

    async def movable(self, sources: set[str]) -> Counter[str]:
        """Every worker's movable sessions on `sources`, asked now (kept for carry_out)."""
        self._recount()
        for worker in self._workers:
            worker.movable = Counter()
        for worker, counts in await self._ask_all("movable", sources):
            worker.movable = Counter(counts or {})
        return sum((w.movable for w in self._workers), Counter())

    def carry_out(self, orders: Sequence[MoveOrder]) -> None:
        """Each order is split over the workers by how many movable sessions each has there."""
        movable = [Counter(w.movable) for w in self._workers]
        shares: list[list[MoveOrder]] = [[] for _ in self._workers]
        for order in orders:
            left = order.count
            for i in sorted(range(self.count), key=lambda i: -movable[i][order.source]):
                take = min(left, movable[i][order.source])
                if take > 0:
                    shares[i].append(dataclasses.replace(order, count=take))
                    movable[i][order.source] -= take
                    left -= take
        for worker, share in zip(self._workers, shares, strict=True):
            if share and worker.link is not None:
                worker.link.send(m.Moves(tuple(share)))

def _exit_status(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"code {code}"
