"""The control plane as a worker's sessions see it: the backend table as pushed, and the link.

The control process owns the router (discovery, health checks, drains, the rebalancer); a
worker routes on its replica of it (ReplicaRouter), which takes every field of each pushed Table
except the session counts: a backend's count there is this worker's cell of the shared memory
table and its `elsewhere` the sum of the other workers' cells (SharedBackend, workers/shared.py).
What the sessions learn that the control plane acts on (a backend refusing connections or
accepting them again, a doubt, a login no stored hash verifies, a lasting move problem) goes up
the link as an event (ReplicaRouter, LinkedControl); the greeting template the control process
probes comes back down it (LinkedControl.probe_template).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tiproxy.balance.router import DRAIN_REMOVED, Backend, Router, split_addr
from tiproxy.client.leg import CONNECT_TIMEOUT
from tiproxy.workers import messages as m

if TYPE_CHECKING:
    from tiproxy.protocol.packets import Greeting
    from tiproxy.workers.shared import SharedCounts


class SharedBackend(Backend):
    """A replica's backend: its session count is this worker's cell of the shared table, and
    `elsewhere` the sum of the other workers' cells."""

    def __init__(self, addr: str, host: str, port: int, *, counts: SharedCounts, worker: int,
                 slot: int) -> None:
        self._counts, self._worker, self.slot = counts, worker, slot
        super().__init__(addr, host, port)

    @property
    def connections(self) -> int:
        return self._counts.get(self._worker, self.slot)

    @connections.setter
    def connections(self, value: int) -> None:
        self._counts.set(self._worker, self.slot, value)

    @property
    def elsewhere(self) -> int:
        return self._counts.others(self._worker, self.slot)

    @elsewhere.setter
    def elsewhere(self, value: int) -> None:
        pass  # read from the table, never set


class ReplicaRouter(Router):
    """The control process's router as last pushed; connect results also go up."""

    def __init__(self, link: m.Link, counts: SharedCounts, worker: int) -> None:
        super().__init__()
        self._link = link
        self._counts = counts
        self._worker = worker

    def succeeded(self, backend: Backend, greeting: Greeting | None) -> None:
        if backend.failures:
            self._link.send(m.Succeeded(backend.addr))
        super().succeeded(backend, greeting)

    def failed(self, backend: Backend, reason: str) -> None:
        self._link.send(m.Failed(backend.addr, reason))
        super().failed(backend, reason)

    def apply(self, table: m.Table) -> list[str]:
        """Take the pushed table; returns the backends that stopped draining."""
        if table.template is not None:
            self.template = table.template
        undrained = []
        listed = set()
        for state in table.backends:
            listed.add(state.addr)
            backend = self.backends.get(state.addr)
            if backend is None:
                host, port = split_addr(state.addr)
                backend = SharedBackend(state.addr, host, port, counts=self._counts,
                                        worker=self._worker, slot=state.slot)
                backend.static_labels = self.static_labels.get(state.addr, {})
                self.backends[state.addr] = backend
            elif backend.draining and not state.drained_by:
                undrained.append(state.addr)
            backend.namespace = state.namespace
            backend.sources = dict(state.sources)
            backend.drained_by = set(state.drained_by)
            backend.health = state.health
            backend.doubt = state.doubt
            backend.failures = state.failures
            backend.retry_at = state.retry_at
            backend.last_error = state.last_error
            backend.load = state.load
            backend.galera = state.galera
            backend.keep_unfit = state.keep_unfit
            if state.offers_tls is not None:
                backend.offers_tls = state.offers_tls
            if state.mariadb_capabilities is not None:
                backend.mariadb_capabilities = state.mariadb_capabilities
            backend.move_problem = state.move_problem
            backend.peers = state.peers
        for addr, backend in self.backends.items():
            if addr not in listed:  # gone from every source; sessions here still move away
                backend.drained_by.add(DRAIN_REMOVED)
        self.forget_empty()
        return undrained


class LinkedControl:
    """The ControlPlane of a worker's sessions: the control process, through the link."""

    def __init__(self, link: m.Link, router: Router, health_enabled: Callable[[], bool]) -> None:
        self._link = link
        self._router = router
        self._health_enabled = health_enabled

    def doubt(self, backend: Backend, why: str) -> None:
        if self._health_enabled():
            self._router.doubt(backend, why)  # at once here; the table confirms it
            self._link.send(m.Doubt(backend.addr, why))

    def lasting_problem(self, backend: Backend, problem: str) -> None:
        if backend.move_problem != problem:
            backend.move_problem = problem
            self._link.send(m.LastingProblem(backend.addr, problem))

    def sync_soon(self, prefer: str = "") -> None:
        self._link.send(m.SyncNow(prefer))

    async def probe_template(self) -> None:
        """No greeting known yet: the control process probes once for every worker."""
        template = await self._link.ask_or_none("template", timeout=CONNECT_TIMEOUT + 1)
        if template is not None and self._router.template is None:
            self._router.template = template
