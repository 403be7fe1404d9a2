"""Which backend a session goes to, and which backends sessions must leave.

Backends come from discovery sources (the static list, etcd, DNS); each source hands over its
complete set and the router merges them. A backend that no source lists any more drains and is
forgotten once its last session has left. A backend drains too when it is in `[proxy]
fail-backend-list`, was drained through the API, or its health checks failed: it gets no new
sessions and its sessions move away at their next safe point.

New sessions go to the best backend of their namespace by the factors in priority order (the
`[balance] policy` decides which apply): health (draining and down backends are out), location
(a backend whose `label-name` label matches the proxy's own), load (sampled from the backend's
status counters), then the number of sessions: this proxy's, and with `pd-addrs` those the
other proxies published in etcd (discovery/peers.py), so that proxies sharing backends fill
them evenly together. Load counts in coarse steps so that noise in a sample does not reorder
backends. A backend that refused a connection is skipped until its retry
time; the delay doubles with each failure in a row (up to a minute).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tiproxy.discovery.base import DiscoveredBackend
from tiproxy.protocol.constants import Capability
from tiproxy.protocol.packets import Greeting

if TYPE_CHECKING:
    from tiproxy.config import Config

log = logging.getLogger("tiproxy.router")

RETRY_FIRST = 1.0
RETRY_MAX = 60.0
# A move that failed for a lasting reason (Backend.move_problem) is tried again this much later,
# not in a loop: an operator may have fixed a privilege meanwhile (net/moves.py).
LASTING_RETRY = 300.0
LOAD_STEP = 2.0  # threads running per step of the load factor
CPU_AS_THREADS = 4.0  # a TiDB's busy core counts as this many running threads

DRAIN_API = "drained"
DRAIN_FAIL_LIST = "fail-backend-list"
DRAIN_REMOVED = "removed"
DRAIN_UNHEALTHY = "unhealthy"

DEFAULT_NAMESPACE = ""


@dataclass
class Load:
    """What the last health check read from the backend's status counters."""

    threads_running: float = 0.0  # smoothed, the check's own thread not counted
    queries_per_second: float = 0.0
    cpu: float = 0.0  # cores busy, from a TiDB's own metrics (process_cpu_seconds_total)
    sampled: bool = False


@dataclass
class Backend:
    addr: str
    host: str
    port: int
    namespace: str = DEFAULT_NAMESPACE
    sources: dict[str, DiscoveredBackend] = field(default_factory=dict)
    static_labels: Mapping[str, str] = field(default_factory=dict)
    connections: int = 0  # this process's sessions on it (the control process: every worker's)
    elsewhere: int = 0  # in a worker: the other workers' sessions on it, as last reported
    peers: int = 0  # the other proxies' sessions on it, as they last published them in etcd
    failures: int = 0  # failed connects in a row (sessions' and checks')
    retry_at: float = 0.0
    last_error: str = ""
    health: str = ""  # why the checks say it is unhealthy; "" when healthy
    # Why a session's error put it in doubt (a Galera node that answered "not ready"): until a
    # health check passes again it is tried last for new sessions and gets no rebalancing.
    doubt: str = ""
    drained_by: set[str] = field(default_factory=set)  # the reasons it is draining
    load: Load = field(default_factory=Load)
    galera: bool = False  # a Galera node (wsrep_on), as the health checks found
    # Why a connection kept for the next login (net/pool.py) would not serve it as a new one
    # would: an init_connect (COM_RESET_CONNECTION does not run it), a max_user_connections
    # (kept connections count toward it); "": neither; None: the health checks have not read
    # them (they need auth-sync-user)
    keep_unfit: str | None = None
    offers_tls: bool | None = None  # its last greeting had CLIENT_SSL; None: not seen yet
    # information_schema.USER_VARIABLES answers there; None: not tried yet (net/migration.py)
    user_variables_table: bool | None = None
    lock_info_table: bool | None = None  # information_schema.METADATA_LOCK_INFO, the same way
    # performance_schema answers auth-sync-user there, and metadata locks are instrumented;
    # None: not tried yet (net/migration.py reads it where the tables above are missing)
    performance_schema: bool | None = None
    mdl_instrumented: bool | None = None
    program_bodies: bool | None = None  # auth-sync-user sees every stored program's body
    mariadb_capabilities: int | None = None  # of its last greeting; None: not seen yet
    move_problem: str = ""  # why moves from or to it fail for a lasting reason, if they do

    @property
    def draining(self) -> bool:
        return bool(self.drained_by)

    @property
    def down(self) -> bool:
        return bool(self.failures) and time.monotonic() < self.retry_at

    @property
    def status(self) -> str:
        if DRAIN_UNHEALTHY in self.drained_by:
            return "unhealthy"
        if self.draining:
            return "draining"
        return "down" if self.down else "healthy"

    @property
    def labels(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for found in self.sources.values():
            merged.update(found.labels)
        merged.update(self.static_labels)
        return merged

    @property
    def status_port(self) -> int | None:
        for found in self.sources.values():
            if found.status_port:
                return found.status_port
        return None

    @property
    def load_step(self) -> int:
        """Coarse load: MariaDB/MySQL by threads running, TiDB by CPU (a core ~ 4 threads)."""
        busy = max(self.load.threads_running, self.load.cpu * CPU_AS_THREADS)
        return int(busy // LOAD_STEP)


def split_addr(addr: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """"host:port" (the config has checked it); an empty host is `default_host`."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or default_host, int(port)


class Router:
    def __init__(self) -> None:
        self.backends: dict[str, Backend] = {}
        self.template: Greeting | None = None  # the last greeting a backend sent
        self.policy = "resource"
        self.label_name = ""
        self.own_labels: Mapping[str, str] = {}
        self.user_namespaces: dict[str, str] = {}  # user -> namespace
        self.static_labels: dict[str, Mapping[str, str]] = {}
        self._fail_list: tuple[str, ...] = ()
        self._namespace_of: dict[str, str] = {}  # backend addr -> namespace
        # The other proxies sharing the balance through etcd (discovery/peers.py): this
        # proxy's name among them, and their sessions per backend as last read.
        self.me = ""
        self.peer_sessions: Mapping[str, Mapping[str, int]] = {}

    # -- configuration ----------------------------------------------------------------------

    def configure(self, cfg: Config) -> None:
        """Policy, labels, namespaces and the fail list from a (re)loaded config."""
        self.policy = cfg.balance.policy
        self.label_name = cfg.balance.label_name
        self.own_labels = dict(cfg.labels)
        self.user_namespaces = {u: n.name for n in cfg.namespaces for u in n.users}
        self._namespace_of = {a: n.name for n in cfg.namespaces for a in n.backend_addrs}
        self.static_labels = {b.addr: b.labels for b in cfg.proxy.backend_labels}
        for backend in self.backends.values():
            backend.namespace = self._namespace_of.get(backend.addr, DEFAULT_NAMESPACE)
            backend.static_labels = self.static_labels.get(backend.addr, {})
        self.set_fail_list(cfg.proxy.fail_backend_list)

    def update(self, source: str, found: Mapping[str, DiscoveredBackend]) -> None:
        """A discovery source's complete set (BackendSink)."""
        for addr, info in found.items():
            backend = self.backends.get(addr)
            if backend is None:
                host, port = split_addr(addr)
                backend = Backend(addr, host, port,
                                  namespace=self._namespace_of.get(addr, DEFAULT_NAMESPACE),
                                  static_labels=self.static_labels.get(addr, {}),
                                  peers=self._peers_on(addr))
                if addr in self._fail_list:
                    backend.drained_by.add(DRAIN_FAIL_LIST)
                self.backends[addr] = backend
                log.info("backend %s joined (from %s)", addr, source)
            backend.sources[source] = info
            if DRAIN_REMOVED in backend.drained_by:
                backend.drained_by.discard(DRAIN_REMOVED)
                log.info("backend %s is back (from %s)", addr, source)
        for addr, backend in self.backends.items():
            if addr not in found and backend.sources.pop(source, None) is not None \
                    and not backend.sources:
                backend.drained_by.add(DRAIN_REMOVED)
                log.info("backend %s left %s: draining", addr, source)
        self.forget_empty()

    def adopted_backend(self, addr: str) -> Backend:
        """The backend of a session handed over by the proxy's previous process: one this
        process may not know (its config lost it), then kept, drained, while sessions use it."""
        backend = self.backends.get(addr)
        if backend is None:
            host, port = split_addr(addr)
            backend = Backend(addr, host, port,
                              namespace=self._namespace_of.get(addr, DEFAULT_NAMESPACE))
            backend.drained_by.add(DRAIN_REMOVED)
            self.backends[addr] = backend
            log.info("backend %s: known only to sessions handed over; draining", addr)
        return backend

    def set_peers(self, me: str, peer_sessions: Mapping[str, Mapping[str, int]]) -> None:
        """The other proxies' sessions per backend (discovery/peers.py), `me` this proxy's
        name among them: the "connection count" factor counts the whole cluster's sessions."""
        self.me = me
        self.peer_sessions = peer_sessions
        for addr, backend in self.backends.items():
            backend.peers = self._peers_on(addr)

    def _peers_on(self, addr: str) -> int:
        return sum(counts.get(addr, 0) for counts in self.peer_sessions.values())

    def set_fail_list(self, addrs: tuple[str, ...]) -> None:
        self._fail_list = addrs
        for addr, backend in self.backends.items():
            if addr in addrs:
                backend.drained_by.add(DRAIN_FAIL_LIST)
            else:
                backend.drained_by.discard(DRAIN_FAIL_LIST)

    def drain(self, addr: str, drain: bool) -> Backend:
        backend = self.backends[addr]
        if drain:
            backend.drained_by.add(DRAIN_API)
        else:
            backend.drained_by.discard(DRAIN_API)
        log.info("backend %s %s", addr, "drained" if drain else "undrained")
        return backend

    def set_health(self, backend: Backend, problem: str) -> None:
        """The checks' verdict: "" healthy, else why not. Unhealthy backends drain."""
        if problem and not backend.health:
            log.warning("backend %s unhealthy: %s", backend.addr, problem)
        elif backend.health and not problem:
            log.info("backend %s healthy again", backend.addr)
        backend.health = problem
        if problem:
            backend.drained_by.add(DRAIN_UNHEALTHY)
        else:
            backend.drained_by.discard(DRAIN_UNHEALTHY)

    def doubt(self, backend: Backend, why: str) -> None:
        """A session saw the backend fail in a way its health checks can confirm."""
        if not backend.doubt:
            log.info("backend %s in doubt until its next health check: %s", backend.addr, why)
        backend.doubt = why

    def forget_empty(self) -> None:
        for addr in [a for a, b in self.backends.items()
                     if DRAIN_REMOVED in b.drained_by and b.connections <= 0]:
            del self.backends[addr]

    # -- choosing -----------------------------------------------------------------------------

    def namespace_of_user(self, user: str) -> str:
        return self.user_namespaces.get(user, DEFAULT_NAMESPACE)

    def candidates(self, exclude: Backend | None = None,
                   namespace: str | None = DEFAULT_NAMESPACE, tls: bool = False) -> list[Backend]:
        """Backends to try for a session of `namespace` (None: any), best first; with `tls`,
        only those that may offer TLS (a TLS session's backend leg stays TLS when it moves)."""
        now = time.monotonic()
        ready = [
            b for b in self.backends.values()
            if b is not exclude and namespace in (None, b.namespace) and not b.draining
            and (not b.failures or now >= b.retry_at) and not (tls and b.offers_tls is False)
        ]
        return sorted(ready, key=self.score_key)

    def score_key(self, b: Backend) -> tuple[bool, int, int, int, int]:
        """Lower is better: (in doubt, location, load, connections, failures)."""
        location = 0
        if self.label_name and self.policy in ("resource", "location"):
            want = self.own_labels.get(self.label_name)
            location = 0 if want is None or b.labels.get(self.label_name) == want else 1
        load = b.load_step if self.policy == "resource" else 0
        return bool(b.doubt), location, load, b.connections + b.elsewhere + b.peers, b.failures

    def score(self, b: Backend) -> float:
        """One number for the API: lower is better."""
        doubted, location, load, connections, _ = self.score_key(b)
        return doubted * 1_000_000_000 + location * 1_000_000 + load * 1_000 + connections

    def factors(self, b: Backend) -> dict[str, float]:
        """Each factor's score, lower is better, in the order the router weighs them
        (tiproxy_balance_b_score{factor}, TiProxy's names where the factor is TiProxy's):
        status 1 when it takes no new sessions (draining, down), health 1 while a session's
        error holds it in doubt, label 1 when its `label-name` label is not the proxy's, load
        its load step (ours: threads running, a TiDB's cores), conn its sessions (the other
        proxies' too, when several balance as one)."""
        doubted, location, load, connections, _ = self.score_key(b)
        return {"status": float(b.draining or b.down), "health": float(doubted),
                "label": float(location), "load": float(load), "conn": float(connections)}

    def cross_location(self, b: Backend) -> bool:
        """The proxy has a `label-name` label and the backend another (or none), whatever the
        policy: its traffic counts in tiproxy_traffic_cross_location_bytes."""
        want = self.own_labels.get(self.label_name) if self.label_name else None
        return want is not None and b.labels.get(self.label_name) != want

    # -- connect results ------------------------------------------------------------------------

    def succeeded(self, backend: Backend, greeting: Greeting | None) -> None:
        backend.failures = 0
        backend.last_error = ""
        if greeting is not None:
            self.note_greeting(backend, greeting)

    def note_greeting(self, backend: Backend, greeting: Greeting) -> None:
        """What a backend's greeting says of it; the proxy greets clients in its image."""
        self.template = greeting
        backend.offers_tls = bool(greeting.capabilities & Capability.SSL)
        backend.mariadb_capabilities = greeting.mariadb_capabilities

    def failed(self, backend: Backend, reason: str) -> None:
        backend.failures += 1
        backend.last_error = reason
        delay = min(RETRY_MAX, RETRY_FIRST * 2 ** (backend.failures - 1))
        backend.retry_at = time.monotonic() + delay
        log.warning("backend %s unavailable (%s); next try in %.0fs", backend.addr, reason, delay)
