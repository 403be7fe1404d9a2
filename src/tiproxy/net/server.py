"""The data plane of one process: the listener and the registry of its sessions.

What it routes by (the router, the TLS contexts, the stored hashes) it is given, and what its
sessions learn that the control plane acts on goes to a ControlPlane: the Cluster itself when
the proxy is one process, or the control process through a worker's link (workers/worker.py).
It is control/proxy.py's SessionHolder for the one-process proxy. Besides accepting clients it
runs the sessions' maintenance twice a second: sessions on a draining backend are asked to move;
moves whose retry time has come are tried again; sessions still pinned on a draining backend
after `[proxy] failover-timeout` are closed with a logged reason, and other moves still waiting
then (a redirect of a pinned session) are given up; backend sockets follow their backend's
health in keep-alive.

Two parts of it are modules of their own: an upgrade's handover of the sessions to a new
process (net/server_upgrade.py), and what it shows and is told besides the sessions' traffic:
traffic captures, refreshed credentials, the API's and the metrics' views
(net/server_views.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from tiproxy.balance.balancer import MoveOrder, carry_out, count_movable
from tiproxy.balance.router import Backend, Router, split_addr
from tiproxy.net.client_leg import ClientLeg
from tiproxy.net.handover import Departure, Receiver, Staying
from tiproxy.net.keepalive import apply_keepalive_socket
from tiproxy.net.login_phase import COMMAND, SessionLogin
from tiproxy.net.pool import BackendPool
from tiproxy.net.server_upgrade import ServerUpgrade
from tiproxy.net.server_views import ServerViews
from tiproxy.session.credentials import CredentialStore
from tiproxy.tls import CertStore
from tiproxy.traffic.sink import CaptureSink
from tiproxy.views import counters
from tiproxy.views.counters import DataPlaneCounts
from tiproxy.views.history import MoveHistory, MoveRecord

if TYPE_CHECKING:
    from tiproxy.config import Config
    from tiproxy.control.cluster import Cluster
    from tiproxy.net.kill import KillTarget
    from tiproxy.net.relay import Session

log = logging.getLogger("tiproxy.server")

MAINTENANCE_INTERVAL = 0.5
EARLY_WINDOW = 10.0  # seconds after a login during which new connections reach a backend early


class ControlPlane(Protocol):
    """What sessions tell the control plane (control/cluster.py's Cluster has these)."""

    def doubt(self, backend: Backend, why: str) -> None: ...
    def lasting_problem(self, backend: Backend, problem: str) -> None: ...
    def sync_soon(self, prefer: str = "") -> None: ...
    async def probe_template(self) -> None: ...


class ProxyServer(ServerUpgrade, ServerViews):
    """Accepts clients and keeps their sessions; see the module docstring."""

    def __init__(self, cfg: Config, router: Router, tls: CertStore,
                 credentials: CredentialStore, control: ControlPlane) -> None:
        self._config = cfg
        self.router = router
        self.tls = tls
        self.credentials = credentials
        self.control = control
        self.sessions: dict[int, Session] = {}
        # Sessions logging in -> when they are cut off (LOGIN_TIMEOUT after they connected), in
        # that order: one sweep in the maintenance, where a timer per login cost more than the
        # rest of the login's bookkeeping (a libuv timer made and closed each time).
        self.logging_in: dict[SessionLogin, float] = {}
        self._next_id = 0
        self.last_login = float("-inf")  # when a session last logged in (monotonic)
        self.early_legs = 0  # backend connections made before a greeting, not yet taken
        self._servers: list[asyncio.Server] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._shutting_down = False
        self._stale: list[tuple[Session, tuple[bytes, bytes]]] = []
        self.metrics = DataPlaneCounts()  # what the sessions count (views/counters.py)
        self.pool = BackendPool(self.metrics.pool_events)  # connections kept for logins
        self.pool.configure(cfg.proxy.backend_pool_size, cfg.proxy.backend_pool_idle)
        self.errors: Counter[str] = Counter()  # tiproxy_server_err by type, besides TLS's
        self.rejected: Counter[str] = Counter()  # clients refused at once, by why
        self.memory_high = ""  # why new clients are refused for memory; set by the control plane
        self._history = MoveHistory()
        self._unhealthy: set[str] = set()  # backends unhealthy at the last keep-alive switch
        self.port = 0
        self._departure: Departure | None = None  # sessions leaving for a new process
        self._receiver: Receiver | None = None  # sessions arriving from an old one
        self._staying: Staying | None = None  # the old one's sessions that stay there
        self.capture: CaptureSink | None = None  # this process's share of a traffic capture
        self._capture_dropped = 0

    @classmethod
    def of(cls, cluster: Cluster) -> ProxyServer:
        """The data plane of a one-process proxy: the cluster's own state, shared."""
        server = cls(cluster.config, cluster.router, cluster.tls, cluster.credentials, cluster)
        cluster.on_credentials = server.credentials_changed
        return server

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on `[proxy] addr` (unless serve_sockets gave sockets), and maintain."""
        if not self._servers:
            await self._listen()
        self._tasks.append(asyncio.get_running_loop().create_task(self._maintain()))

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        for addr in self._config.proxy.listen_addrs:
            host, port = split_addr(addr, default_host="")
            server = await loop.create_server(
                lambda: ClientLeg(self), host or None, port, reuse_address=True, backlog=1024
            )
            self._servers.append(server)
            for sock in server.sockets:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # Accepted sockets inherit it: nothing to set per connection.
                apply_keepalive_socket(sock, self._config.proxy.frontend_keepalive)
            self.port = self.port or server.sockets[0].getsockname()[1]
            log.info("proxy listening on %s:%d", host, server.sockets[0].getsockname()[1])

    # -- new connections ---------------------------------------------------------------------

    def hand_off(self, transport: asyncio.BaseTransport) -> bool:
        """Pass a connection just accepted to another worker (workers/worker.py); True if
        it went (the caller then closes `transport`). One process keeps every connection."""
        return False

    async def serve_passed(self, sock: socket.socket) -> None:
        """Serve a connection another worker accepted and passed here, as if accepted here."""
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: ClientLeg(self, passed=True), sock=sock)
        except OSError as e:  # (the client has gone already)
            log.debug("a connection passed from another worker is not served: %s", e)
            sock.close()

    async def serve_sockets(self, socks: list[socket.socket]) -> None:
        """Accept on listening sockets made elsewhere (a worker's, bound by the control
        process)."""
        loop = asyncio.get_running_loop()
        for sock in socks:
            self._servers.append(await loop.create_server(lambda: ClientLeg(self), sock=sock,
                                                          backlog=1024))

    async def stop(self, timeout: float, linger: bool = False) -> None:
        """Stop accepting and close the sessions, gracefully within `timeout` seconds. With
        `linger` (an upgrade's old process, left with sessions that could not travel), they
        first have `timeout` seconds to end by themselves."""
        self._shutting_down = True
        self.pool.stop()
        for task in self._tasks:
            task.cancel()
        for server in self._servers:
            server.close()
        for part in (self._departure, self._receiver):
            if part is not None:
                part.close()
        deadline = time.monotonic() + timeout
        while linger and self.sessions:  # polled: they end in the clients' own time
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)
        await self._close_sessions(timeout)
        for server in self._servers:
            await server.wait_closed()

    async def _close_sessions(self, timeout: float) -> None:
        """TiProxy's graceful close: each session is closed at its next safe point (between
        commands, outside a transaction), and those still busy after `timeout` seconds then."""
        deadline = time.monotonic() + timeout
        while self.sessions and time.monotonic() < deadline:
            for session in list(self.sessions.values()):
                if session.phase != COMMAND or session.between_transactions():
                    session.close("proxy shutting down", quiet=True,
                                  kind=counters.PROXY_SHUTDOWN)
            if self.sessions:
                await asyncio.sleep(0.05)
        for session in list(self.sessions.values()):
            session.close(f"proxy shutting down: still busy after graceful-close-conn-timeout "
                          f"({timeout:g}s)", kind=counters.PROXY_SHUTDOWN)

    def config_changed(self, cfg: Config) -> None:
        self._config = cfg
        if not self._shutting_down and self._departure is None:
            self.pool.configure(cfg.proxy.backend_pool_size, cfg.proxy.backend_pool_idle)
        for server in self._servers:  # for the connections accepted from now on
            for sock in server.sockets:
                apply_keepalive_socket(sock, cfg.proxy.frontend_keepalive)
        self._drain_sessions()

    def config(self) -> Config:
        return self._config

    # -- the registry ---------------------------------------------------------------------------

    async def probe_template(self) -> None:
        await self.control.probe_template()

    def logged_in(self) -> None:
        self.last_login = time.monotonic()

    def logins_recently(self) -> bool:
        """Clients logged in within the last EARLY_WINDOW seconds: a new connection is most
        likely one more, worth a backend connection before its greeting (net/login_route.py)."""
        return time.monotonic() - self.last_login < EARLY_WINDOW

    def new_session_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def session_opened(self, session: Session) -> None:
        self.sessions[session.id] = session

    def session_closed(self, session: Session) -> None:
        self.sessions.pop(session.id, None)

    def kill_target_elsewhere(self, session_id: int) -> bool:
        """Whether another process may own the session `session_id` (a worker's peers)."""
        return False

    async def find_kill_target(self, session_id: int) -> KillTarget | None:
        return None

    async def backend_ids(self, addr: str, locks_only: bool) -> dict[int, int]:
        """Backend thread id -> proxy id of the sessions on `addr` (only those that hold named
        locks, seen or found by the unseen-state check, if asked), in every worker: what SQL's
        connection ids are translated with."""
        return self.local_backend_ids(addr, locks_only)

    def local_backend_ids(self, addr: str, locks_only: bool) -> dict[int, int]:
        return {s.backend_connection_id: s.id for s in self.sessions.values()
                if s.backend is not None and s.backend.addr == addr and s.backend_connection_id
                and (not locks_only or s.state.named_locks or s.state.hidden)}

    def over_capacity(self) -> bool:
        limit = self._config.proxy.max_connections
        return bool(limit) and len(self.sessions) > limit

    def refusal(self) -> tuple[str, str] | None:
        """(kind, message) when a new client must be refused at once, else None."""
        if self.over_capacity():
            return "max_connections", "Too many connections"
        if self.memory_high:
            return "memory", f"Too many connections: {self.memory_high}"
        return None

    def rejected_connections(self) -> dict[str, int]:
        return dict(self.rejected)

    def pids(self) -> list[int]:
        return [os.getpid()]

    def set_memory_high(self, reason: str) -> None:
        self.memory_high = reason

    # -- moves ----------------------------------------------------------------------------------

    def drained(self, addr: str, drain: bool) -> None:
        """A backend's drain changed: its sessions move away, or stop waiting to."""
        if drain:
            self._drain_sessions()
        else:
            self._undrained(addr)

    def _undrained(self, addr: str) -> None:
        """Moves away from `addr` that it no longer needs are called off."""
        for session in self.sessions.values():
            move = session.move_request
            if session.backend is not None and session.backend.addr == addr and move \
                    and move.target is None and not session.backend.draining:
                session.cancel_move()

    async def redirect_all(self) -> int:
        return self.redirect_local()

    def redirect_local(self) -> int:
        """TiProxy's /api/debug/redirect: every session moves to another backend."""
        count = 0
        for session in list(self.sessions.values()):
            if session.phase == COMMAND:
                session.request_move("redirect")
                count += 1
        return count

    def _drain_sessions(self) -> None:
        if not any(b.draining for b in self.router.backends.values()):
            return  # the usual case: no need to look at every session
        for session in list(self.sessions.values()):
            backend = session.backend
            if session.phase == COMMAND and backend is not None and backend.draining \
                    and session.move_request is None:
                session.request_move(sorted(backend.drained_by)[0])

    async def movable(self, sources: set[str]) -> Counter[str]:
        return self.movable_now(sources)

    def movable_now(self, sources: set[str]) -> Counter[str]:
        return count_movable((s for s in self.sessions.values() if s.phase == COMMAND), sources)

    def carry_out(self, orders: Sequence[MoveOrder]) -> None:
        sessions = [s for s in self.sessions.values() if s.phase == COMMAND]
        for order in orders:
            target = self.router.backends.get(order.target)
            if target is not None:
                carry_out(order, sessions, target)

    def lasting_move_problem(self, backend: Backend, problem: str) -> None:
        self.control.lasting_problem(backend, problem)

    def doubt_backend(self, backend: Backend, why: str) -> None:
        self.control.doubt(backend, why)

    def record_migration(self, move: MoveRecord) -> None:
        self.metrics.migrated(move.source, move.target, move.reason, move.ok, move.seconds)
        self._history.record(move)

    def dial_failed(self, backend: Backend, reason: str) -> None:
        """A session could not connect to `backend` (tiproxy_backend_dial_backend_fail)."""
        self.metrics.backend(backend.addr).dial_failures += 1
        self.router.failed(backend, reason)

    def dial_refused(self, backend: Backend) -> None:
        """A backend at its max_connections refused a session's connection (1040): counted
        as a dial failure, but the backend stays a choice: it may take the next one."""
        self.metrics.backend(backend.addr).dial_failures += 1

    def got_backend(self, seconds: float, ok: bool) -> None:
        """A login waited `seconds` for a backend, and got one or not."""
        self.metrics.get_backend.observe(seconds)
        self.metrics.get_backend_results["succeed" if ok else "fail"] += 1

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            self._drain_sessions()
            self._switch_keepalive()
            timeout = self._config.proxy.failover_timeout
            now = time.monotonic()
            self._cut_slow_logins(now)
            self.pool.sweep(self.router, now)
            for session in [s for s in self.sessions.values() if s.move_request is not None]:
                move = session.move_request
                if move is None or session.phase != COMMAND or session.try_move():
                    continue
                backend = session.backend
                if not timeout or backend is None or now - move.requested_at <= timeout:
                    continue
                if backend.draining:
                    session.close(f"still on draining backend {backend.addr} after "
                                  f"failover-timeout ({timeout}s): {move.waiting}",
                                  kind=counters.PROXY_SHUTDOWN)  # TiProxy's force close
                else:  # a redirect or a rebalance that never found its moment: let it go
                    log.info("session %d: move (%s) given up after %ds: %s", session.id,
                             move.reason, timeout, move.waiting)
                    session.cancel_move()
            self.router.forget_empty()
            self.metrics.forget(self.router.backends)

    def _cut_slow_logins(self, now: float) -> None:
        late = []
        for session, deadline in self.logging_in.items():  # the oldest first
            if deadline > now:
                break
            late.append(session)
        for session in late:
            del self.logging_in[session]
            session.login_timed_out()

    def _switch_keepalive(self) -> None:
        """Backend sockets take the keep-alive of their backend's health as it changes."""
        unhealthy = {b.addr for b in self.router.backends.values() if b.health}
        if unhealthy == self._unhealthy:
            return  # new sessions get theirs when they connect
        self._unhealthy = unhealthy
        for session in self.sessions.values():
            backend = session.backend
            if backend is not None and bool(backend.health) != session.keepalive_unhealthy:
                session.set_backend_keepalive(session.backend_leg, bool(backend.health))
