"""The control plane's state: which backends there are and how they are, and what sessions need.

One Cluster per proxy, in its only process or in the control process of `[proxy] workers`:
- the router's state, from the discovery sources (the static list, etcd from `pd-addrs`, DNS
  from `backend-dns`; each restarted when its settings change) and the health checks;
- drains (the API, `fail-backend-list`), doubts and lasting move problems that sessions report;
- the rebalancer's decisions (balance/balancer.py), from the movable sessions' counts;
- the stored password hashes: `[security] users-file`, read at start and when a reload names
  another one (always in a thread, through config.files.read_small_file: a FIFO or /dev/zero
  must not stall the loop), and the backends' own, read by `auth-sync-user` every
  `auth-sync-interval` and soon after a login matched none of them;
- the TLS contexts (tls/store.py) and the config in force;
- this proxy's registration in PD's etcd when `pd-addrs` is set (discovery/registration.py),
  and beside it its sessions per backend shared with the other proxies there
  (discovery/peers.py, whose counts the router and the rebalancer use); both started again at
  the new place when a reload changes `pd-addrs` or `cluster-tls`, removed by `unregister()`
  at a clean shutdown;
- with `[ha] virtual-ip`, the campaign for the virtual IP in the same etcd (ha/vip.py),
  which follows `pd-addrs` the same way; a clean shutdown gives the address up first of all
  (`release_virtual_ip()`).
It never holds a session: whoever holds them (net/server.py, or the workers) is told through
`on_credentials`, and asks through the methods of net/server.py's ControlPlane.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from tiproxy.balance.balancer import Rebalancer
from tiproxy.balance.health import HealthChecker
from tiproxy.balance.router import LASTING_RETRY, Backend, Router
from tiproxy.client.admin import AdminConnection
from tiproxy.client.channel import Row
from tiproxy.client.leg import CONNECT_TIMEOUT, BackendLeg
from tiproxy.config.files import USERS_FILE_LIMIT, FileRefusedError, read_small_file
from tiproxy.discovery.base import DiscoveredBackend, DiscoverySource
from tiproxy.discovery.peers import PeerCounts, PeerSessions
from tiproxy.discovery.registration import ProxyInfo, TopologyRegistration
from tiproxy.ha.vip import VirtualIPOwner
from tiproxy.protocol.errors import ProtocolError, SQLError
from tiproxy.protocol.packets import parse_greeting
from tiproxy.session.credentials import CredentialStore, UsersFileError
from tiproxy.tls import CertStore
from tiproxy.views.interface import BackendView

if TYPE_CHECKING:
    from tiproxy.config import Config
    from tiproxy.views.counters import DataPlaneCounts

log = logging.getLogger("tiproxy.server")

MIN_SYNC_GAP = 2.0  # a burst of unmatched logins triggers one sync, not one each
# Locked accounts and expired passwords log in nowhere: their hashes are not kept, so no session
# logs in with them (a move, a kept backend connection of net/pool.py). MariaDB keeps the lock in
# mysql.global_priv, MySQL in mysql.user; a server with neither gets the last query.
# The fourth column says whether the account has limits of its own (1; NULL: unknown) that a
# kept connection of net/pool.py would not honour: MariaDB's MAX_STATEMENT_TIME (a reset sets the
# global one), MAX_USER_CONNECTIONS (kept connections count toward it) and
# MAX_CONNECTIONS_PER_HOUR (a login on a kept connection is not counted).
# User and plugin are CHAR columns: a server whose sql_mode has PAD_CHAR_TO_FULL_LENGTH pads
# them with spaces, which no name ends with (CHAR drops them when it stores one).
LOGIN_USERS_QUERIES = (
    "SELECT RTRIM(u.User), RTRIM(u.plugin), u.authentication_string, u.max_statement_time <> 0 OR "
    "u.max_user_connections <> 0 OR u.max_connections <> 0 FROM mysql.user u "
    "JOIN mysql.global_priv g USING (User, Host) "
    "WHERE u.password_expired <> 'Y' AND JSON_VALUE(g.Priv, '$.account_locked') IS NOT TRUE",
    "SELECT RTRIM(User), RTRIM(plugin), authentication_string, max_user_connections <> 0 OR "
    "max_connections <> 0 FROM mysql.user "
    "WHERE account_locked <> 'Y' AND password_expired <> 'Y'",
    "SELECT RTRIM(User), RTRIM(plugin), authentication_string, NULL FROM mysql.user",
)


class Cluster:
    def __init__(self, cfg: Config) -> None:
        self.config = cfg
        self.router = Router()
        self._configure_router(cfg)
        self.tls = CertStore(cfg)  # raises TLSLoadError for a certificate that does not load
        self.health = HealthChecker(self.router, cfg, self.tls.admin_options,
                                    lambda: self.tls.cluster)
        self.rebalancer = Rebalancer(self.router, cfg)
        self.credentials = CredentialStore()
        self.on_credentials: Callable[[], None] = lambda: None  # the hashes changed
        self.errors: Counter[str] = Counter()  # tiproxy_server_err by type, besides TLS's
        self._sources: dict[str, tuple[tuple[str, ...], asyncio.Task[None]]] = {}
        self._running_sources: dict[str, DiscoverySource] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._template_probe: asyncio.Task[None] | None = None
        self.registration: TopologyRegistration | None = None
        self.peers: PeerSessions | None = None
        self.vip: VirtualIPOwner | None = None
        self._elected_at: tuple[str, ...] = ()  # the settings the campaign was started with
        self._registered_at: tuple[str, ...] = ()  # the settings it was started with
        self._info: ProxyInfo | None = None  # what it registers: the address is fixed at start
        self._started = time.time()
        self._sync_now = asyncio.Event()
        self._last_sync = 0.0
        self._last_found: tuple[str, int] | None = None  # (backend, hashes) of the last sync
        self._sync_prefer = ""  # the backend the next sync reads first (sync_soon)
        self._unfiltered: set[str] = set()  # backends whose locked accounts the sync cannot see

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.config.security.users_file:
            await self._load_users_file(self.config.security.users_file)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._sync_loop()), loop.create_task(self.health.run()),
                       loop.create_task(self.tls.watch())]
        self._start_sources()
        await self._register()
        await self._campaign()
        if self.config.security.auth_sync_user:
            self._sync_now.set()  # the first sync at once: sessions need hashes to move

    def stop(self) -> None:
        for task in [*self._tasks, *(task for _, task in self._sources.values())]:
            task.cancel()

    async def apply_config(self, cfg: Config) -> None:
        """A reloaded config (checked by config.reload): the backend list and the fail list
        take effect at once; a users-file of another name is read first."""
        old = self.config
        if cfg.security.users_file and cfg.security.users_file != old.security.users_file:
            await self._load_users_file(cfg.security.users_file)
        self.config = cfg
        self.health.config = cfg
        self.rebalancer.config = cfg
        self.tls.reconfigure(cfg)
        self._configure_router(cfg)
        self._start_sources()
        await self._register()
        await self._campaign()
        self._sync_now.set()

    def _configure_router(self, cfg: Config) -> None:
        self.router.configure(cfg)
        static = list(cfg.proxy.backend_addrs) + [a for n in cfg.namespaces
                                                  for a in n.backend_addrs]
        self.router.update("static", {a: DiscoveredBackend(a) for a in static})

    def _start_sources(self) -> None:
        proxy = self.config.proxy
        wanted: dict[str, tuple[tuple[str, ...], DiscoverySource | None]] = {
            "etcd": ((*proxy.pd_addrs, repr(self.config.security.cluster_tls)),
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

    async def _register(self) -> None:
        """Registration follows `pd-addrs` and `cluster-tls`: started, moved, or stopped."""
        proxy, tls = self.config.proxy, self.config.security.cluster_tls
        wanted = (*proxy.pd_addrs, repr(tls)) if proxy.pd_addrs else ()
        if wanted == self._registered_at:
            return
        await self.unregister()
        self._registered_at = wanted
        if proxy.pd_addrs:
            if self._info is None:
                self._info = ProxyInfo.of(self.config, self._started)
            self.registration = TopologyRegistration(proxy.pd_addrs, self._info, self.tls.cluster)
            self.registration.start()
            self.peers = PeerSessions(proxy.pd_addrs, self._info.addr, self._own_sessions,
                                      self._peers_changed, self.tls.cluster)
            self.peers.start()

    async def unregister(self, handed_over: bool = False) -> None:
        """Remove this proxy's entry and its session counts from etcd (a clean shutdown, or
        pd-addrs changed); the others' counts are forgotten. After an upgrade (`handed_over`)
        both are the new process's, written with leases of its own: only ours go."""
        registration, self.registration = self.registration, None
        peers, self.peers = self.peers, None
        self._registered_at = ()
        self.router.set_peers("", {})
        await asyncio.gather(*(part.stop(delete=not handed_over)
                               for part in (registration, peers) if part is not None))

    async def _campaign(self) -> None:
        """The virtual IP's campaign follows `pd-addrs` and `cluster-tls` (`[ha]` is read at
        start only; the config requires `pd-addrs` with it)."""
        proxy, ha = self.config.proxy, self.config.ha
        wanted = (*proxy.pd_addrs, repr(self.config.security.cluster_tls)) \
            if ha.virtual_ip and proxy.pd_addrs and self._info is not None else ()
        if wanted == self._elected_at:
            return
        await self.release_virtual_ip()
        self._elected_at = wanted
        if wanted and self._info is not None:
            self.vip = VirtualIPOwner(ha, proxy.pd_addrs, self._info.addr, self.tls.cluster)
            await self.vip.start()

    async def release_virtual_ip(self) -> None:
        """Give the virtual IP up and resign (a clean shutdown, first thing)."""
        vip, self.vip = self.vip, None
        self._elected_at = ()
        if vip is not None:
            await vip.close()

    def _own_sessions(self) -> dict[str, int]:
        return {addr: b.connections for addr, b in self.router.backends.items()}

    def _peers_changed(self, peers: PeerCounts) -> None:
        if self.peers is not None:
            self.router.set_peers(self.peers.me, peers)

    # -- what sessions report -----------------------------------------------------------------

    def doubt(self, backend: Backend, why: str) -> None:
        """A session's error says the backend may be going away: the health checks decide."""
        if self.config.health.enable:
            self.router.doubt(backend, why)
            self.health.check_now(backend)

    def lasting_problem(self, backend: Backend, problem: str) -> None:
        """Moves from or to `backend` fail for a reason that will not go away: logged once
        per backend and problem, counted, shown in /api/admin/backends."""
        self.errors["migrate_lasting"] += 1
        if backend.move_problem != problem:
            backend.move_problem = problem
            log.error("moves involving backend %s failed for a lasting reason; such moves "
                      "are held for %.0fs: %s", backend.addr, LASTING_RETRY, problem)

    def sync_soon(self, prefer: str = "") -> None:
        """A login matched no stored hash, or a move's was refused: read them again (at most
        every MIN_SYNC_GAP), from the backend `prefer` names first if it answers."""
        if prefer:
            self._sync_prefer = prefer
        if self.config.security.auth_sync_user:
            self._sync_now.set()

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

    # -- credentials ------------------------------------------------------------------------------

    async def _load_users_file(self, path: str) -> None:
        try:
            data = await asyncio.to_thread(read_small_file, path, USERS_FILE_LIMIT)
            count = self.credentials.load_users(data, path)
        except (FileRefusedError, UsersFileError) as e:
            log.error("users file %s not loaded: %s", path, e)  # noqa: TRY400 - the reason
            return
        log.info("users file %s: %d password hashes", path, count)
        self.on_credentials()

    async def _sync_loop(self) -> None:
        while True:
            interval = self.config.security.auth_sync_interval or 60.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sync_now.wait(), interval)
            self._sync_now.clear()
            if not self.config.security.auth_sync_user:
                continue
            wait = self._last_sync + MIN_SYNC_GAP - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self.sync_credentials()

    async def sync_credentials(self) -> bool:
        """Read the stored hashes from the first backend that answers."""
        security = self.config.security
        self._last_sync = time.monotonic()
        candidates = self.router.candidates()
        preferred = self.router.backends.get(self._sync_prefer)
        self._sync_prefer = ""
        if preferred is not None:  # (drained or not: the account on it is what is asked)
            candidates = [preferred, *(b for b in candidates if b is not preferred)]
        for backend in candidates:
            try:
                conn = await AdminConnection.open(backend.host, backend.port,
                                                  security.auth_sync_user,
                                                  security.auth_sync_password,
                                                  **self.tls.admin_options())
                try:
                    rows, filtered = await _users(conn)
                finally:
                    conn.close()
            except (OSError, TimeoutError, ProtocolError, SQLError) as e:
                log.warning("credential sync from %s failed: %s", backend.addr, e)
                continue
            count = self.credentials.replace_synced(
                ((_text(r[0]), _text(r[1]), _text(r[2]), None if r[3] is None else _text(r[3]))
                 for r in rows if len(r) == 4), backend.addr)
            # Every minute: logged at info when what it found changed (the first sync too).
            found = (backend.addr, count)
            log.log(logging.INFO if found != self._last_found else logging.DEBUG,
                    "credential sync from %s: %d password hashes", *found)
            self._last_found = found
            if not filtered and backend.addr not in self._unfiltered:
                self._unfiltered.add(backend.addr)
                log.warning("credential sync from %s: locked accounts and expired passwords "
                            "cannot be told apart (on MariaDB, grant the auth-sync-user SELECT "
                            "on mysql.global_priv): their hashes are kept", backend.addr)
            self.on_credentials()
            return True
        return False

    # -- what the API shows -----------------------------------------------------------------------

    def backend_views(self, counts: DataPlaneCounts) -> list[BackendView]:
        """Each backend as the API and metrics show it; `counts` are the sessions'."""
        return [
            BackendView(
                b.addr, b.status, b.connections, counts.query_counts(b.addr),
                sorted(b.drained_by), b.last_error if b.down else "", sources=sorted(b.sources),
                health=b.health, move_problem=b.move_problem, doubt=b.doubt, galera=b.galera,
                labels=b.labels, namespace=b.namespace, score=self.router.score(b),
                threads_running=b.load.threads_running,
                queries_per_second=b.load.queries_per_second, cpu=b.load.cpu,
                factors=self.router.factors(b), load_sampled=b.load.sampled,
                peer_connections=b.peers,
            )
            for b in self.router.backends.values()
        ]

    def discovery_status(self) -> dict[str, str]:
        """Each running discovery source, and the registration: "ok", or why it cannot reach
        its origin."""
        status = {name: source.error or "ok" for name, source in self._running_sources.items()}
        if self.registration is not None:
            status["registration"] = self.registration.error or "ok"
        if self.peers is not None:
            status["peers"] = self.peers.error or "ok"
        if self.vip is not None:
            status["virtual-ip"] = self.vip.status
        return status

    def server_errors(self) -> Counter[str]:
        return self.tls.errors + self.errors


def _etcd(endpoints: tuple[str, ...], tls: ssl.SSLContext | None) -> DiscoverySource:
    from tiproxy.discovery.etcd import EtcdTopology  # noqa: PLC0415 - only when configured

    return EtcdTopology(endpoints, tls=tls)


def _dns(names: tuple[str, ...], interval: float) -> DiscoverySource:
    from tiproxy.discovery.dns import DNSNames  # noqa: PLC0415 - only when configured

    return DNSNames(names, interval)


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value is not None else ""


async def _users(conn: AdminConnection) -> tuple[list[Row], bool]:
    """The accounts that may log in, by the first of LOGIN_USERS_QUERIES this server knows (and
    whether it told locked accounts apart)."""
    for query in LOGIN_USERS_QUERIES[:-1]:
        with contextlib.suppress(SQLError):  # not this server's columns, or not readable
            return await conn.query(query), True
    return await conn.query(LOGIN_USERS_QUERIES[-1]), False
