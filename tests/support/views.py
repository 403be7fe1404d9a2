"""A proxy as the API sees it, quiet: no backends, no sessions, nothing counted, no upgrade.
QuietView is views/interface.py's ProxyView alone (the API refuses control routes with it);
QuietProxy is a ProxyControl too. Unit tests of the API subclass them and say what differs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tiproxy.config import Config, parse_config
from tiproxy.control.processes import ProcessReader
from tiproxy.views.interface import (
    BackendView,
    DataPlaneCounts,
    HealthStats,
    MigrationStats,
    ProcessTotals,
    ServerStats,
    SessionGauges,
    SessionView,
    UpgradeError,
)

QUIET_CONFIG = parse_config('[proxy]\nbackend-addrs = ["127.0.0.1:3306"]\n')


@dataclass
class QuietView:
    cfg: Config = QUIET_CONFIG
    shutting_down: bool = False
    unhealthy: str = ""

    async def refresh(self) -> None:
        pass

    def connection_count(self) -> int:
        return 0

    def backends(self) -> list[BackendView]:
        return []

    async def session_views(self) -> list[SessionView]:
        return []

    def migration_stats(self) -> MigrationStats:
        return MigrationStats({}, (), [0], 0.0)

    def config(self) -> Config:
        return self.cfg

    def discovery_status(self) -> dict[str, str]:
        return {}

    def server_errors(self) -> dict[str, int]:
        return {}

    def rejected_connections(self) -> dict[str, int]:
        return {}

    def data_plane_counts(self) -> DataPlaneCounts:
        return DataPlaneCounts()

    def session_gauges(self) -> SessionGauges:
        return SessionGauges({}, {})

    def health_stats(self) -> HealthStats:
        return HealthStats(0.0, {}, {})

    def server_stats(self) -> ServerStats:
        return ServerStats([os.getpid()], 1, {}, 0, 0)

    def process_totals(self) -> ProcessTotals:
        return ProcessReader().read([os.getpid()])  # this test process's own


@dataclass
class QuietProxy(QuietView):
    applied: list[Config] = field(default_factory=list)  # every config apply_config was given

    def drain(self, addr: str, drain: bool) -> None:
        raise KeyError(addr)

    async def redirect_all(self) -> int:
        return 0

    async def upgrade(self) -> int:
        raise UpgradeError("no upgrade in these tests")

    async def apply_config(self, cfg: Config) -> None:
        self.applied.append(cfg)
        self.cfg = cfg
