"""One proxy, seen from outside: the Cluster and whoever holds the sessions, behind the API.

The sessions are held by a SessionHolder: this process's data plane (net/server.py's
ProxyServer) when `[proxy] workers = 1`, or the worker processes (workers/control.py's Workers).
Proxy is the API's ProxyControl over the two, and runs the rebalancer's round once a second:
the rebalancer names the backends it would take sessions from, the holder counts its movable
sessions there, the rebalancer decides, the holder carries the orders out.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from tiproxy.balance.balancer import INTERVAL

if TYPE_CHECKING:
    from tiproxy.api.interface import BackendView, MigrationStats, SessionView
    from tiproxy.balance.balancer import MoveOrder
    from tiproxy.config import Config
    from tiproxy.control.cluster import Cluster

log = logging.getLogger("tiproxy.server")


class SessionHolder(Protocol):
    async def start(self) -> None: ...
    async def stop(self, timeout: float) -> None: ...  # closes the sessions gracefully
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


class Proxy:
    """The API's ProxyControl; start() and stop() run the whole proxy."""

    def __init__(self, cluster: Cluster, holder: SessionHolder) -> None:
        self.cluster = cluster
        self.holder = holder
        self._shutting_down = False
        self._rebalancing: asyncio.Task[None] | None = None
        self._reloading = asyncio.Lock()  # reloads one at a time, cluster and holder alike

    async def start(self) -> None:
        await self.cluster.start()
        await self.holder.start()
        self._rebalancing = asyncio.get_running_loop().create_task(self._rebalance())

    def begin_shutdown(self) -> None:
        """Health turns 502 so that load balancers stop sending clients; sessions go on."""
        self._shutting_down = True

    async def stop(self) -> None:
        self._shutting_down = True
        if self._rebalancing is not None:
            self._rebalancing.cancel()
        self.cluster.stop()
        await self.holder.stop(self.cluster.config.proxy.graceful_close_conn_timeout)

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

    # -- ProxyView ------------------------------------------------------------------------------

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    async def refresh(self) -> None:
        await self.holder.refresh()

    def connection_count(self) -> int:
        return self.holder.connection_count()

    def backends(self) -> list[BackendView]:
        return self.cluster.backend_views()

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
            await self.cluster.apply_config(cfg)
            self.holder.config_changed(cfg)
