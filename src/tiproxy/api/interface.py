"""What the API and metrics may see of the proxy: one read-only view, nothing else.

The API depends on this protocol only; control/proxy.py's Proxy implements it over the Cluster
and whoever holds the sessions (this process, or the workers, whose counts it then sums).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from tiproxy.api.history import MoveHistory
from tiproxy.config import Config


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


@dataclass(frozen=True)
class MigrationStats:
    counts: Mapping[tuple[str, str, str, str], int]  # (from, to, reason, migrate_res) -> moves
    buckets: Sequence[float]  # upper bounds of the duration histogram, seconds
    bucket_counts: Sequence[int]  # one more than buckets: the last is +Inf
    total_seconds: float
    history: MoveHistory = field(default_factory=MoveHistory)  # recent moves, for the page


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


class UpgradeError(Exception):
    """ProxyControl.upgrade: why no new process takes over (control/upgrade.py)."""


@runtime_checkable
class ProxyControl(ProxyView, Protocol):
    """What the API may change: the routes that drain, redirect and reload."""

    def drain(self, addr: str, drain: bool) -> None: ...  # KeyError: unknown backend
    async def redirect_all(self) -> int: ...
    async def upgrade(self) -> int: ...  # the new process's pid; UpgradeError: why not
    async def apply_config(self, cfg: Config) -> None: ...  # checked: config/reload.py
