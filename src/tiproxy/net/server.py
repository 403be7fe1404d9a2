"""The proxy's data plane: the listener, the registry of sessions, and its view for the API.

Beside accepting clients it runs two small loops of the control plane, which stay here until the
planes split into processes:
- maintenance, twice a second: sessions on a draining backend are asked to move; moves whose
  retry time has come are tried again; sessions still pinned on a draining backend after
  `[proxy] failover-timeout` are closed with a logged reason, and other moves still waiting
  then (a redirect of a pinned session) are given up;
- credential sync: the stored password hashes are read from the backends by `[security]
  auth-sync-user` every `auth-sync-interval`, and at once when a login matched none of them.
`[security] users-file` is read at start and when a reload names another one, always in a
thread and through config.files.read_small_file (a FIFO or /dev/zero must not stall the loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tiproxy.api.interface import BackendView, MigrationStats, SessionView
from tiproxy.balance.balancer import Rebalancer, carry_out, count_movable
from tiproxy.balance.health import HealthChecker
from tiproxy.balance.router import DRAIN_REMOVED, Backend, Router, split_addr
from tiproxy.client.admin import AdminConnection
from tiproxy.client.leg import CONNECT_TIMEOUT, BackendLeg
from tiproxy.config.files import USERS_FILE_LIMIT, FileRefusedError, read_small_file
from tiproxy.discovery.base import DiscoveredBackend, DiscoverySource
from tiproxy.net.keepalive import apply_keepalive_socket
from tiproxy.net.moves import LASTING_RETRY
from tiproxy.net.relay import COMMAND, ClientLeg
from tiproxy.protocol.errors import ProtocolError, SQLError
from tiproxy.protocol.packets import parse_greeting
from tiproxy.session.credentials import CredentialStore, UsersFileError
from tiproxy.tls import CertStore

if TYPE_CHECKING:
    from tiproxy.config import Config
    from tiproxy.net.kill import KillTarget
    from tiproxy.net.relay import Session

log = logging.getLogger("tiproxy.server")

MAINTENANCE_INTERVAL = 0.5
MIN_SYNC_GAP = 2.0  # a burst of unmatched logins triggers one sync, not one each
EARLY_WINDOW = 10.0  # seconds after a login during which new connections reach a backend early
# Upper bounds of tiproxy_balance_migrate_duration_seconds, as TiProxy's buckets go.
DURATION_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
USERS_QUERY = "SELECT User, plugin, authentication_string FROM mysql.user"


@dataclass
class _Durations:
    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(DURATION_BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += seconds


class ProxyServer:
    """Accepts clients and keeps the sessions; implements the API's ProxyView."""

    def __init__(self, cfg: Config, tls: CertStore | None = None) -> None:
        self._config = cfg
        self.router = Router()
        self._configure_router(cfg)
        # CertStore raises TLSLoadError for a certificate that does not load.
        self.tls = CertStore(cfg) if tls is None else tls
        self.health = HealthChecker(self.router, cfg, self.tls.admin_options,
                                    lambda: self.tls.cluster)
        self.rebalancer = Rebalancer(self.router, cfg)
        self._sources: dict[str, tuple[tuple[str, ...], asyncio.Task[None]]] = {}
        self._running_sources: dict[str, DiscoverySource] = {}
        self.sessions: dict[int, Session] = {}
        self.credentials = CredentialStore()
        self._next_id = 0
        self.last_login = float("-inf")  # when a session last logged in (monotonic)
        self._template_probe: asyncio.Task[None] | None = None
        self.early_legs = 0  # backend connections made before a greeting, not yet taken
        self._servers: list[asyncio.Server] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._shutting_down = False
        self._sync_now = asyncio.Event()
        self._last_sync = 0.0
        self._stale: list[tuple[Session, tuple[bytes, bytes]]] = []
        self._migrations: Counter[tuple[str, str, str, str]] = Counter()
        self.errors: Counter[str] = Counter()  # tiproxy_server_err by type, besides TLS's
        self._durations = _Durations()
        self.port = 0
        self._reloading = asyncio.Lock()  # one apply_config at a time: they await a file

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen, and run the control plane's loops in this process."""
        if self._config.security.users_file:
            await self._load_users_file(self._config.security.users_file)
        await self._listen()
        loop = asyncio.get_running_loop()
        self._tasks += [loop.create_task(self._maintain()), loop.create_task(self._sync_loop()),
                        loop.create_task(self.health.run()), loop.create_task(self.tls.watch())]
        self._start_sources()
        if self._config.security.auth_sync_user:
            self._sync_now.set()  # the first sync at once: sessions need hashes to move

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

    async def serve_sockets(self, socks: list[socket.socket]) -> None:
        """Accept on listening sockets made elsewhere (a worker's, bound by the control
        process)."""
        loop = asyncio.get_running_loop()
        for sock in socks:
            self._servers.append(await loop.create_server(lambda: ClientLeg(self), sock=sock,
                                                          backlog=1024))

    def begin_shutdown(self) -> None:
        """Health turns 502 so that load balancers stop sending clients; sessions go on."""
        self._shutting_down = True

    async def stop(self, timeout: float | None = None) -> None:
        """Stop accepting and close the sessions, gracefully within `timeout` seconds
        (default `[proxy] graceful-close-conn-timeout`)."""
        self._shutting_down = True
        for task in [*self._tasks, *(task for _, task in self._sources.values())]:
            task.cancel()
        for server in self._servers:
            server.close()
        await self._close_sessions(self._config.proxy.graceful_close_conn_timeout
                                   if timeout is None else timeout)
        for server in self._servers:
            await server.wait_closed()

    async def _close_sessions(self, timeout: float) -> None:
        """TiProxy's graceful close: each session is closed at its next safe point (between
        commands, outside a transaction), and those still busy after `timeout` seconds then."""
        deadline = time.monotonic() + timeout
        while self.sessions and time.monotonic() < deadline:
            for session in list(self.sessions.values()):
                if session.phase != COMMAND or session.between_transactions():
                    session.close("proxy shutting down", quiet=True)
            if self.sessions:
                await asyncio.sleep(0.05)
        for session in list(self.sessions.values()):
            session.close(f"proxy shutting down: still busy after graceful-close-conn-timeout "
                          f"({timeout:g}s)")

    async def apply_config(self, cfg: Config) -> None:
        """A reloaded config (checked by config.reload): the backend list and the fail list
        take effect at once; a users-file of another name is read first."""
        async with self._reloading:
            old = self._config
            if cfg.security.users_file and cfg.security.users_file != old.security.users_file:
                await self._load_users_file(cfg.security.users_file)
            self._apply(cfg)

    def _apply(self, cfg: Config) -> None:
        self._config = cfg
        for server in self._servers:  # for the connections accepted from now on
            for sock in server.sockets:
                apply_keepalive_socket(sock, cfg.proxy.frontend_keepalive)
        self.health.config = cfg
        self.rebalancer.config = cfg
        self.tls.reconfigure(cfg)
        self._configure_router(cfg)
        self._start_sources()
        self._sync_now.set()
        self._drain_sessions()

    def _configure_router(self, cfg: Config) -> None:
        self.router.configure(cfg)
        static = list(cfg.proxy.backend_addrs) + [a for n in cfg.namespaces
                                                  for a in n.backend_addrs]
        self.router.update("static", {a: DiscoveredBackend(a) for a in static})

    def _start_sources(self) -> None:
        """etcd from `[proxy] pd-addrs`, DNS from `backend-dns`: started, or restarted when
        their settings change."""
        proxy = self._config.proxy
        wanted: dict[str, tuple[tuple[str, ...], DiscoverySource | None]] = {
            "etcd": ((*proxy.pd_addrs, repr(self._config.security.cluster_tls)),
                     _etcd(proxy.pd_addrs, self.tls.cluster) if proxy.pd_addrs else None),
            "dns": ((*proxy.backend_dns, str(proxy.dns_interval)),
                    _dns(proxy.backend_dns, proxy.dns_interval) if proxy.backend_dns
                    else None),
        }
        loop = asyncio.get_running_loop()
        for name, (settings, source) in wanted.items():
            running = self._sources.get(name)
            if running is not None and running[0] == settings:
                continue
            if running is not None:
                running[1].cancel()
                del self._sources[name]
                self._running_sources.pop(name, None)
                if source is None:
                    self.router.update(name, {})
            if source is not None:
                self._sources[name] = (settings, loop.create_task(source.run(self.router)))
                self._running_sources[name] = source

    async def _load_users_file(self, path: str) -> None:
        try:
            data = await asyncio.to_thread(read_small_file, path, USERS_FILE_LIMIT)
            count = self.credentials.load_users(data, path)
        except (FileRefusedError, UsersFileError) as e:
            log.error("users file %s not loaded: %s", path, e)  # noqa: TRY400 - the reason
            return
        self.credentials_changed()
        log.info("users file %s: %d password hashes", path, count)

    # -- the registry ---------------------------------------------------------------------------

    async def probe_template(self) -> None:
        """No backend has greeted the proxy yet (the health checks learn it too): connect to
        one to learn what to greet clients with. One probe at a time, shared by the sessions
        that wait for it, and not cancelled with any of them (a client that hangs up at once
        must not leave the next one to probe again)."""
        if self._template_probe is None or self._template_probe.done():
            self._template_probe = asyncio.get_running_loop().create_task(self._probe_once())
        await asyncio.shield(self._template_probe)

    async def _probe_once(self) -> None:
        for backend in self.router.candidates(namespace=None):
            try:
                leg = await BackendLeg.open(backend.host, backend.port)
                try:
                    _, payload = await leg.read_packet(CONNECT_TIMEOUT)
                finally:
                    leg.abort()
                greeting = parse_greeting(payload) if payload[:1] != b"\xff" else None
            except (OSError, TimeoutError, ProtocolError) as e:
                self.router.failed(backend, str(e) or type(e).__name__)
                continue
            if greeting is not None:
                self.router.succeeded(backend, greeting)
                return

    def logged_in(self) -> None:
        self.last_login = time.monotonic()

    def logins_recently(self) -> bool:
        """Clients logged in within the last EARLY_WINDOW seconds: a new connection is most
        likely one more, worth a backend connection before its greeting (net/relay.py)."""
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

    def over_capacity(self) -> bool:
        limit = self._config.proxy.max_connections
        return bool(limit) and len(self.sessions) > limit

    # -- moves ----------------------------------------------------------------------------------

    def drain(self, addr: str, drain: bool) -> None:
        """Drain (or undrain) a backend through the API. Raises KeyError if unknown."""
        self.router.drain(addr, drain)
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
        for session in list(self.sessions.values()):
            backend = session.backend
            if session.phase == COMMAND and backend is not None and backend.draining \
                    and session.move_request is None:
                session.request_move(sorted(backend.drained_by)[0])

    def lasting_move_problem(self, backend: Backend, problem: str) -> None:
        """Moves from or to `backend` fail for a reason that will not go away: logged once
        per backend and problem, counted, shown in /api/admin/backends."""
        self.errors["migrate_lasting"] += 1
        if backend.move_problem != problem:
            backend.move_problem = problem
            log.error("moves involving backend %s failed for a lasting reason; such moves "
                      "are held for %.0fs: %s",
                      backend.addr, LASTING_RETRY, problem)

    def record_migration(self, source: str, target: str, reason: str, ok: bool,
                         seconds: float) -> None:
        self._migrations[(source, target, reason, "succeed" if ok else "fail")] += 1
        self._durations.observe(seconds)

    async def _maintain(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            ticks += 1
            self._drain_sessions()
            self._switch_keepalive()
            if ticks % 2 == 0:
                self._rebalance()
            timeout = self._config.proxy.failover_timeout
            now = time.monotonic()
            for session in list(self.sessions.values()):
                move = session.move_request
                if move is None or session.phase != COMMAND or session.try_move():
                    continue
                backend = session.backend
                if not timeout or backend is None or now - move.requested_at <= timeout:
                    continue
                if backend.draining:
                    session.close(f"still on draining backend {backend.addr} after "
                                  f"failover-timeout ({timeout}s): {move.waiting}")
                else:  # a redirect or a rebalance that never found its moment: let it go
                    log.info("session %d: move (%s) given up after %ds: %s", session.id,
                             move.reason, timeout, move.waiting)
                    session.cancel_move()
            self.router.forget_empty()

    def _rebalance(self) -> None:
        sessions = [s for s in self.sessions.values() if s.phase == COMMAND]
        for order in self.rebalancer.plan(count_movable(sessions)):
            target = self.router.backends.get(order.target)
            if target is not None:
                carry_out(order, sessions, target)

    def doubt_backend(self, backend: Backend, why: str) -> None:
        """A session's error says the backend may be going away: the health checks decide."""
        if self.config().health.enable:
            self.router.doubt(backend, why)
            self.health.check_now(backend)

    def _switch_keepalive(self) -> None:
        """Backend sockets take the keep-alive of their backend's health as it changes."""
        for session in self.sessions.values():
            backend = session.backend
            if backend is not None and bool(backend.health) != session.keepalive_unhealthy:
                session.set_backend_keepalive(session.backend_leg, bool(backend.health))

    # -- credentials ------------------------------------------------------------------------------

    def refresh_credential(self, session: Session, exchange: tuple[bytes, bytes]) -> None:
        """A login matched no stored hash: sync now, then try that login again."""
        if not self._config.security.auth_sync_user:
            return
        self._stale.append((session, exchange))
        del self._stale[:-1000]  # bounded: unmatched logins of a burst, not forever
        self._sync_now.set()

    async def _sync_loop(self) -> None:
        while True:
            interval = self._config.security.auth_sync_interval or 60.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sync_now.wait(), interval)
            self._sync_now.clear()
            if not self._config.security.auth_sync_user:
                continue
            wait = self._last_sync + MIN_SYNC_GAP - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self.sync_credentials()

    async def sync_credentials(self) -> bool:
        """Read the stored hashes from the first backend that answers."""
        security = self._config.security
        self._last_sync = time.monotonic()
        for backend in self.router.candidates():
            try:
                conn = await AdminConnection.open(backend.host, backend.port,
                                                  security.auth_sync_user,
                                                  security.auth_sync_password,
                                                  **self.tls.admin_options())
                try:
                    rows = await conn.query(USERS_QUERY)
                finally:
                    conn.close()
            except (OSError, TimeoutError, ProtocolError, SQLError) as e:
                log.warning("credential sync from %s failed: %s", backend.addr, e)
                continue
            count = self.credentials.replace_synced(
                (_text(r[0]), _text(r[1]), _text(r[2])) for r in rows if len(r) == 3)
            log.info("credential sync from %s: %d password hashes", backend.addr, count)
            self.credentials_changed()
            return True
        return False

    def credentials_changed(self) -> None:
        """The stored hashes changed: logins that matched none are tried again."""
        self._retry_stale()

    def _retry_stale(self) -> None:
        stale, self._stale = self._stale, []
        for session, exchange in stale:
            if session.phase != COMMAND:
                continue
            credential = self.credentials.recover(session.user, *exchange)
            if credential is not None:
                session.credential_recovered(credential)

    # -- ProxyView ------------------------------------------------------------------------------

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    async def refresh(self) -> None:
        pass  # this process holds the sessions: its counters are current

    def connection_count(self) -> int:
        return len(self.sessions)

    def backends(self) -> list[BackendView]:
        return [
            BackendView(
                b.addr, b.status, b.connections, dict(b.query_counts), sorted(b.drained_by),
                b.last_error if b.down else "", sources=sorted(b.sources), health=b.health,
                move_problem=b.move_problem, doubt=b.doubt, galera=b.galera,
                labels=b.labels, namespace=b.namespace, score=self.router.score(b),
                threads_running=b.load.threads_running,
                queries_per_second=b.load.queries_per_second, cpu=b.load.cpu,
            )
            for b in self.router.backends.values()
        ]

    async def session_views(self) -> list[SessionView]:
        return self.local_session_views()

    def local_session_views(self) -> list[SessionView]:
        views = []
        for s in self.sessions.values():
            move = s.move_request
            waiting = move.waiting if move is not None else ""
            if not waiting and move is None and s.phase == COMMAND:
                pins = s.state.pins()
                waiting = "pinned: " + "; ".join(pins) if pins else ""
            views.append(SessionView(
                id=s.id, user=s.user, client=s.peer,
                backend=s.backend.addr if s.backend else "",
                moving=move is not None, move_reason=move.reason if move else "",
                waiting=waiting, moves=s.moves, client_tls=s.client_tls,
                backend_tls=s.backend_tls,
            ))
        return views

    def migration_stats(self) -> MigrationStats:
        return MigrationStats(dict(self._migrations), DURATION_BUCKETS,
                              list(self._durations.counts), self._durations.total)

    def config(self) -> Config:
        return self._config

    def server_errors(self) -> dict[str, int]:
        return dict(self.tls.errors + self.errors)

    def discovery_status(self) -> dict[str, str]:
        """Each running discovery source: "ok", or why it cannot reach its origin."""
        return {name: source.error or "ok" for name, source in self._running_sources.items()}

    def backend_addr_known(self, addr: str) -> bool:
        return addr in self.router.backends and \
            DRAIN_REMOVED not in self.router.backends[addr].drained_by


def _etcd(endpoints: tuple[str, ...], tls: ssl.SSLContext | None) -> DiscoverySource:
    from tiproxy.discovery.etcd import EtcdTopology  # noqa: PLC0415 - only when configured

    return EtcdTopology(endpoints, tls=tls)


def _dns(names: tuple[str, ...], interval: float) -> DiscoverySource:
    from tiproxy.discovery.dns import DNSNames  # noqa: PLC0415 - only when configured

    return DNSNames(names, interval)


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value is not None else ""
