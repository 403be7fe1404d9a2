"""One proxy, seen from outside: the Cluster and whoever holds the sessions, behind the API.

The sessions are held by a SessionHolder: this process's data plane (net/server.py's
ProxyServer) when `[proxy] workers = 1`, or the worker processes (workers/control.py's Workers).
Proxy is the API's ProxyControl over the two, and runs the rebalancer's round once a second:
the rebalancer names the backends it would take sessions from, the holder counts its movable
sessions there, the rebalancer decides, the holder carries the orders out. It also runs the
clock monitor (control/monitor.py) and counts the proxy's start and close for the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from tiproxy.balance.balancer import INTERVAL
from tiproxy.control.memory import effective_threshold, memory_use
from tiproxy.control.monitor import ClockMonitor
from tiproxy.control.processes import ProcessReader
from tiproxy.control.upgrade import Upgrader
from tiproxy.logs import apply_level
from tiproxy.traffic.jobs import TrafficJobs
from tiproxy.views.interface import HealthStats, ProcessTotals, ServerStats, UpgradeError

if TYPE_CHECKING:
    from tiproxy.balance.balancer import MoveOrder
    from tiproxy.config import Config
    from tiproxy.control.cluster import Cluster
    from tiproxy.traffic.sink import Deliver
    from tiproxy.views.counters import DataPlaneCounts
    from tiproxy.views.interface import BackendView, MigrationStats, SessionGauges, SessionView

log = logging.getLogger("tiproxy.server")
MEMORY_INTERVAL = 1.0  # seconds between looks at the memory use


class SessionHolder(Protocol):
    async def start(self) -> None: ...
    # Closes the sessions gracefully; `linger`: after an upgrade, they may end by themselves.
    async def stop(self, timeout: float, linger: bool = False) -> None: ...
    def connection_count(self) -> int: ...
    async def session_views(self) -> list[SessionView]: ...
    async def redirect_all(self) -> int: ...
    async def refresh(self) -> None: ...  # counters and per-backend counts as of now
    # backend addr -> sessions movable now, on the backends `sources`
    async def movable(self, sources: set[str]) -> Mapping[str, int]: ...
    def carry_out(self, orders: Sequence[MoveOrder]) -> None: ...
    def drained(self, addr: str, drain: bool) -> None: ...  # a backend's drain changed
    def config_changed(self, cfg: Config) -> None: ...
    def migration_stats(self) -> MigrationStats: ...
    def server_errors(self) -> Mapping[str, int]: ...
    def rejected_connections(self) -> Mapping[str, int]: ...  # clients refused, by why
    def data_plane_counts(self) -> DataPlaneCounts: ...  # as of the last refresh()
    def session_gauges(self) -> SessionGauges: ...  # as of the last refresh()
    def data_plane_processes(self) -> int: ...
    def set_memory_high(self, reason: str) -> None: ...  # "" lets new clients in again
    def pids(self) -> list[int]: ...  # the proxy's processes
    # An upgrade (control/upgrade.py's DataPlane, and the new process's receivers).
    def listening(self) -> list[list[socket.socket]]: ...
    async def max_session_id(self) -> int: ...
    def hand_over(self, receivers: list[str]) -> None: ...
    async def handed_over(self) -> None: ...
    async def open_receivers(self) -> list[str]: ...
    # A traffic capture (traffic/): every session, open or to come, records into `deliver`.
    async def start_capture(self, deliver: Deliver) -> None: ...  # recording when it returns
    async def stop_capture(self) -> int: ...  # the commands dropped, now final
    def capture_dropped(self) -> int: ...


class Proxy:
    """The API's ProxyControl; start() and stop() run the whole proxy."""

    def __init__(self, cluster: Cluster, holder: SessionHolder) -> None:
        self.cluster = cluster
        self.holder = holder
        self._shutting_down = False
        self._rebalancing: asyncio.Task[None] | None = None
        self._watching_memory: asyncio.Task[None] | None = None
        self._monitoring: asyncio.Task[None] | None = None
        self.memory_high = ""  # why new clients are refused for memory, if they are
        self.monitor = ClockMonitor()
        self._processes = ProcessReader()
        self.events: Counter[str] = Counter()  # tiproxy_server_event: start, close
        self._reloading = asyncio.Lock()  # reloads one at a time, cluster and holder alike
        self.upgrader: Upgrader | None = None  # set by whoever serves (cli/server.py)
        self.handed_over = False  # an upgrade gave everything to a new process
        self.traffic = TrafficJobs(holder, lambda: self.cluster.config,
                                   lambda: int(getattr(holder, "port", 0)))

    async def start(self) -> None:
        await self.cluster.start()
        await self.holder.start()
        loop = asyncio.get_running_loop()
        self._rebalancing = loop.create_task(self._rebalance())
        self._watching_memory = loop.create_task(self._watch_memory())
        self._monitoring = loop.create_task(self.monitor.run())
        self.events["start"] += 1

    async def release_virtual_ip(self) -> None:
        """The first step of a clean shutdown: the virtual IP goes to another proxy."""
        await self.cluster.release_virtual_ip()

    def begin_shutdown(self) -> None:
        """Health turns 502 so that load balancers stop sending clients; sessions go on."""
        if not self._shutting_down:
            self.events["close"] += 1
        self._shutting_down = True

    async def stop(self) -> None:
        if not self._shutting_down:
            self.events["close"] += 1
        self._shutting_down = True
        for task in (self._rebalancing, self._watching_memory, self._monitoring):
            if task is not None:
                task.cancel()
        await self.traffic.close()
        self.cluster.stop()
        await self.cluster.release_virtual_ip()  # done already in a clean shutdown
        await self.holder.stop(self.cluster.config.proxy.graceful_close_conn_timeout,
                               linger=self.handed_over)
        # Last, as TiProxy: the proxy is listed while it drains.
        await self.cluster.unregister(handed_over=self.handed_over)

    async def upgrade(self) -> int:
        """Start a new proxy process that takes everything over (control/upgrade.py); its
        pid. Rebalancing stops here: the new process balances from now on."""
        if self.upgrader is None:
            raise UpgradeError("this proxy cannot upgrade itself (not started by tiproxy)")
        pid = await self.upgrader.upgrade()
        if self._rebalancing is not None:
            self._rebalancing.cancel()
        return pid

    async def _rebalance(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            rebalancer = self.cluster.rebalancer
            sources = rebalancer.sources()
            if not sources:
                continue  # balanced: no session needs to be looked at
            orders = rebalancer.plan(await self.holder.movable(sources))
            if orders:
                self.holder.carry_out(orders)

    async def _watch_memory(self) -> None:
        """Once a second: over `high-memory-usage-reject-threshold`, new clients are refused
        (sessions go on) and health says why, until the use is under it again."""
        while True:
            await asyncio.sleep(MEMORY_INTERVAL)
            threshold = effective_threshold(
                self.cluster.config.proxy.high_memory_usage_reject_threshold)
            use = await asyncio.to_thread(memory_use, self.holder.pids()) if threshold else None
            reason = ""
            if use is not None and use >= threshold:
                reason = (f"memory use {use:.0%} is at or over high-memory-usage-reject-"
                          f"threshold ({threshold:.0%})")
            if reason != self.memory_high:
                if reason:
                    log.warning("new clients refused: %s", reason)
                else:
                    log.info("memory use back under the threshold: new clients accepted")
                self.memory_high = reason
                self.holder.set_memory_high(reason)

    # -- ProxyView ------------------------------------------------------------------------------

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    async def refresh(self) -> None:
        await self.holder.refresh()

    def connection_count(self) -> int:
        return self.holder.connection_count()

    def backends(self) -> list[BackendView]:
        return self.cluster.backend_views(self.holder.data_plane_counts())

    async def session_views(self) -> list[SessionView]:
        return await self.holder.session_views()

    def migration_stats(self) -> MigrationStats:
        return self.holder.migration_stats()

    def config(self) -> Config:
        return self.cluster.config

    def discovery_status(self) -> dict[str, str]:
        return self.cluster.discovery_status()

    def server_errors(self) -> dict[str, int]:
        return dict(self.cluster.server_errors() + Counter(self.holder.server_errors()))

    def rejected_connections(self) -> dict[str, int]:
        return dict(self.holder.rejected_connections())

    def data_plane_counts(self) -> DataPlaneCounts:
        return self.holder.data_plane_counts()

    def session_gauges(self) -> SessionGauges:
        return self.holder.session_gauges()

    def health_stats(self) -> HealthStats:
        health = self.cluster.health
        return HealthStats(health.cycle_seconds, dict(health.probe_seconds),
                           dict(health.results))

    def server_stats(self) -> ServerStats:
        vip = self.cluster.vip
        owner_of = [owned_job(vip.election.name)] if vip is not None and vip.election.owner \
            else []
        return ServerStats(self.holder.pids(), self.holder.data_plane_processes(),
                           dict(self.events), self.monitor.time_jump_back,
                           self.monitor.keep_alive, owner_of)

    def process_totals(self) -> ProcessTotals:
        return self._processes.read(self.holder.pids())

    @property
    def unhealthy(self) -> str:
        """Why health should say unhealthy besides a shutdown ("" when nothing does)."""
        return self.memory_high

    # -- ProxyControl ---------------------------------------------------------------------------

    def drain(self, addr: str, drain: bool) -> None:
        """Drain (or undrain) a backend through the API. Raises KeyError if unknown."""
        self.cluster.router.drain(addr, drain)
        self.holder.drained(addr, drain)

    async def redirect_all(self) -> int:
        return await self.holder.redirect_all()

    async def apply_config(self, cfg: Config) -> None:
        """A reloaded config, checked by config.reload."""
        async with self._reloading:
            apply_level(cfg.log)
            await self.cluster.apply_config(cfg)
            self.holder.config_changed(cfg)


def owned_job(key: str) -> str:
    """tiproxy_server_owner's type: TiProxy's election key without "/tiproxy/" and "/owner"."""
    return key.removeprefix("/tiproxy/").removesuffix("/owner")
