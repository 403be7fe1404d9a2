"""What the API and the metrics see of the workers: one proxy. Sessions are listed from every
live worker (asked when the API asks); counters, errors, refusals and the move history are the
live workers' as last reported (every 100 ms, or asked for at once by refresh) added to those of
workers that died, which never go back; the session count is the shared table's sum.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections import Counter
from typing import TYPE_CHECKING, Any

from tiproxy.net.server_views import migration_summary
from tiproxy.views.counters import DataPlaneCounts
from tiproxy.views.history import MoveHistory
from tiproxy.views.interface import MigrationStats, SessionGauges, SessionView
from tiproxy.workers import messages as m
from tiproxy.workers.shared import SESSIONS, SharedCounts

if TYPE_CHECKING:
    from tiproxy.control.cluster import Cluster
    from tiproxy.traffic.sink import Deliver
    from tiproxy.workers.control import WorkerSlot


@dataclasses.dataclass
class Retired:
    """Counters of workers that have died: they must not go back."""

    counts: DataPlaneCounts = dataclasses.field(default_factory=DataPlaneCounts)
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    rejected: Counter[str] = dataclasses.field(default_factory=Counter)
    history: MoveHistory = dataclasses.field(default_factory=MoveHistory)

    def add(self, stats: m.Stats) -> None:
        self.counts.add(stats.counts)
        self.history.add(stats.history)
        self.errors.update(stats.errors)
        self.rejected.update(stats.rejected)


class SummedViews:
    """Mixed into Workers (workers/control.py), whose attributes it uses."""

    cluster: Cluster
    count: int
    counts: SharedCounts
    errors: Counter[str]
    _workers: list[WorkerSlot]
    _retired: Retired
    _capture: Deliver | None
    _capture_dropped: Counter[int]
    _memory_high: str

    if TYPE_CHECKING:  # provided by Workers: for the type checker only
        def _recount(self) -> None: ...
        def _broadcast(self, message: object) -> None: ...

    async def _ask_all(self, what: str, arg: Any = None) -> list[tuple[WorkerSlot, Any]]:
        live = [w for w in self._workers if w.live and w.link is not None]
        answers = await asyncio.gather(*(w.link.ask(what, arg) for w in live
                                         if w.link is not None),
                                       return_exceptions=True)
        return [(w, a) for w, a in zip(live, answers, strict=True)
                if not isinstance(a, BaseException)]

    async def refresh(self) -> None:
        """The workers' counters as of now (the API reads them right after what it checks)."""
        for worker, stats in await self._ask_all("stats"):
            if isinstance(stats, m.Stats):
                worker.stats = stats
        self._recount()
        self._retired.counts.forget(self.cluster.router.backends)

    async def session_views(self) -> list[SessionView]:
        views = [v for _, answer in await self._ask_all("sessions") for v in answer or ()]
        return sorted(views, key=lambda v: v.id)

    async def redirect_all(self) -> int:
        return sum(n or 0 for _, n in await self._ask_all("redirect"))

    def connection_count(self) -> int:
        return self.counts.total(SESSIONS)

    def _live_stats(self) -> list[m.Stats]:
        return [w.stats for w in self._workers if w.stats is not None]

    def data_plane_counts(self) -> DataPlaneCounts:
        """The workers' counters as last reported, and those of workers that died."""
        counts = DataPlaneCounts()
        counts.add(self._retired.counts)
        for stats in self._live_stats():
            counts.add(stats.counts)
        return counts

    def session_gauges(self) -> SessionGauges:
        gauges = SessionGauges({}, {})
        for stats in self._live_stats():
            if stats.gauges is not None:
                gauges += stats.gauges
        return gauges

    def migration_stats(self) -> MigrationStats:
        history = MoveHistory.merged([self._retired.history,
                                      *(stats.history for stats in self._live_stats())])
        return migration_summary(self.data_plane_counts(), history)

    def data_plane_processes(self) -> int:
        return self.count

    def server_errors(self) -> dict[str, int]:
        errors = self.errors + self._retired.errors
        for stats in self._live_stats():
            errors.update(stats.errors)
        return dict(errors)

    def rejected_connections(self) -> dict[str, int]:
        rejected = Counter(self._retired.rejected)
        for stats in self._live_stats():
            rejected.update(stats.rejected)
        return dict(rejected)

    async def start_capture(self, deliver: Deliver) -> None:
        """Returns once every live worker records: the API's "capture started" is then true
        of the next command any session sends. A worker (re)started later gets CaptureStart
        with its setup."""
        self._capture = deliver
        self._capture_dropped = Counter()
        await self._ask_all("capture_start")

    async def stop_capture(self) -> int:
        for worker, dropped in await self._ask_all("capture_stop"):
            self._capture_dropped[worker.index] = int(dropped or 0)
        self._capture = None
        return self.capture_dropped()

    def capture_dropped(self) -> int:
        return sum(self._capture_dropped.values())

    def set_memory_high(self, reason: str) -> None:
        self._memory_high = reason
        self._broadcast(m.MemoryHigh(reason))

    def pids(self) -> list[int]:
        return [os.getpid(), *(w.proc.pid for w in self._workers if w.live and w.proc)]
