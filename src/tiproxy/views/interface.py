"""What the API and metrics may see of the proxy: one read-only view, nothing else.

The API depends on this protocol only; control/proxy.py's Proxy implements it over the Cluster
and whoever holds the sessions (this process, or the workers, whose counts it then sums).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from tiproxy.config import Config
from tiproxy.views.counters import DataPlaneCounts
from tiproxy.views.history import MoveHistory


@dataclass(frozen=True)
class BackendView:
    addr: str
    status: str  # "healthy", "down", "draining"
    connections: int
    query_counts: Mapping[str, int]  # cmd_type (e.g. "Query", "StmtExecute") -> queries run here
    drained_by: Sequence[str] = ()  # why it is draining: "drained", "fail-backend-list", ...
    last_error: str = ""  # why it is down
    sources: Sequence[str] = ()  # "static", "etcd", "dns"
    health: str = ""  # why the health checks say it is unhealthy; "" when healthy
    labels: Mapping[str, str] = field(default_factory=dict)
    namespace: str = ""
    score: float = 0.0  # lower is better: new sessions go to the lowest
    threads_running: float = 0.0
    queries_per_second: float = 0.0
    cpu: float = 0.0  # a TiDB's cores busy
    move_problem: str = ""  # why moves from or to it fail for a lasting reason
    doubt: str = ""  # why a session's error put it in doubt until its next health check passes
    galera: bool = False  # a Galera node, as the health checks found (wsrep_on)
    # The router's factors, each lower-is-better, in the order it weighs them (balance/router.py)
    factors: Mapping[str, float] = field(default_factory=dict)
    load_sampled: bool = False  # the health checks have read its load at least once
    peer_connections: int = 0  # the other proxies' sessions on it, as they published them


@dataclass(frozen=True)
class SessionView:
    id: int
    user: str
    client: str
    backend: str
    moving: bool  # a move is requested and not done yet
    move_reason: str
    waiting: str  # why it has not moved yet, or why it could not move now ("pinned: ...")
    moves: int = 0  # how many times it has moved
    client_tls: bool = False  # the client leg is TLS
    backend_tls: bool = False  # the backend leg is TLS (kept when the session moves)
    direct: bool = False  # its sockets are read directly now (net/_direct.c)


@dataclass(frozen=True)
class MigrationStats:
    counts: Mapping[tuple[str, str, str, str], int]  # (from, to, reason, migrate_res) -> moves
    buckets: Sequence[float]  # upper bounds of the duration histogram, seconds
    bucket_counts: Sequence[int]  # one more than buckets: the last is +Inf
    total_seconds: float
    history: MoveHistory = field(default_factory=MoveHistory)  # recent moves, for the page


@dataclass(frozen=True)
class SessionGauges:
    """What the sessions are doing now, counted when asked (a walk over the sessions)."""

    pending: Mapping[tuple[str, str, str], int]  # (from, to, reason) -> moves asked, not done
    pinned: Mapping[str, int]  # pin kind (SessionState.pin_kinds) -> sessions holding one

    def __add__(self, other: SessionGauges) -> SessionGauges:
        return SessionGauges(Counter(self.pending) + Counter(other.pending),
                             Counter(self.pinned) + Counter(other.pinned))


@dataclass(frozen=True)
class HealthStats:
    """The health checks' own figures (balance/health.py)."""

    cycle_seconds: float  # the last round: until its slowest check ended
    probe_seconds: Mapping[str, float]  # backend -> its last check's SQL probe
    results: Mapping[tuple[str, str], int]  # (backend, "succeed"|"fail") -> checks


@dataclass(frozen=True)
class ProcessTotals:
    """Every process of the proxy together, for Prometheus' process_* metrics
    (control/processes.py reads them)."""

    cpu_seconds: float
    resident_bytes: int
    virtual_bytes: int
    open_fds: int
    max_fds: int
    start_time: float  # seconds since the epoch

@dataclass(frozen=True)
class ServerStats:
    """The proxy as a whole: its processes and the control process's clock monitor."""

    pids: Sequence[int]  # the control process (or the only one) first
    data_plane_processes: int  # 1, or `[proxy] workers` as resolved
    events: Mapping[str, int]  # "start", "close" (a shutdown began)
    time_jump_back: int  # the wall clock went back (control/monitor.py)
    keep_alive: int  # the monitor's heartbeat: once per 5 s it ran on time
    # The elections this proxy leads, by TiProxy's name for them ("vip/<ip>": [ha] virtual-ip)
    owner_of: Sequence[str] = ()


class ProxyView(Protocol):
    @property
    def shutting_down(self) -> bool: ...
    @property
    def unhealthy(self) -> str: ...  # why health is 502 besides a shutdown, "" when it is not
    async def refresh(self) -> None: ...  # counters as of now, before backends() and metrics
    def connection_count(self) -> int: ...
    def backends(self) -> list[BackendView]: ...
    async def session_views(self) -> list[SessionView]: ...
    def migration_stats(self) -> MigrationStats: ...
    def config(self) -> Config: ...
    def discovery_status(self) -> Mapping[str, str]: ...  # source -> "ok" or its error
    def server_errors(self) -> Mapping[str, int]: ...  # tiproxy_server_err by type
    def rejected_connections(self) -> Mapping[str, int]: ...  # clients refused, by why
    def data_plane_counts(self) -> DataPlaneCounts: ...  # every data plane's, at refresh()
    def session_gauges(self) -> SessionGauges: ...  # as of the last refresh()
    def health_stats(self) -> HealthStats: ...
    def server_stats(self) -> ServerStats: ...
    def process_totals(self) -> ProcessTotals: ...  # the proxy's processes, read now


class UpgradeError(Exception):
    """ProxyControl.upgrade: why no new process takes over (control/upgrade.py)."""


@runtime_checkable
class ProxyControl(Protocol):
    """What the API may change: the routes that drain, redirect and reload. A view that has
    these may be changed (isinstance looks at these alone, not at the view's read side)."""

    def drain(self, addr: str, drain: bool) -> None: ...  # KeyError: unknown backend
    async def redirect_all(self) -> int: ...
    async def upgrade(self) -> int: ...  # the new process's pid; UpgradeError: why not
    async def apply_config(self, cfg: Config) -> None: ...  # checked: config/reload.py
