"""The rebalance loop: move sessions from the most to the least loaded backend, gently.

Once a second, per namespace, among the backends that take sessions:
- location (`[balance] label-name` set, policy resource or location): sessions on a backend whose
  label differs from the proxy's own move to one that matches, if one exists;
- load (policy resource): when the busiest backend is at least two load steps above the idlest,
  sessions move from it to the idlest, at `[balance.cpu] migrations-per-second`;
- connections (every policy): when the most used backend holds more than `count-ratio-threshold`
  times the average, or the least used less than the average divided by it, and they differ by
  two sessions or more, sessions move from the most to the least used, at
  `[balance.conn-count] migrations-per-second`.
Hysteresis: a session moved by the balancer is not moved by it again for `COOLDOWN` seconds, and
only sessions at a safe point are picked, so a move never waits and nothing bounces. Moves that
drain a backend (health, API, config) are not limited here: they happen in the sessions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from tiproxy.balance.router import Backend, Router

if TYPE_CHECKING:
    from tiproxy.config import Config

log = logging.getLogger("tiproxy.balance")

INTERVAL = 1.0
COOLDOWN = 60.0  # no session is moved by the balancer twice within this
DEFAULT_CONN_RATE = 10.0  # sessions per second, when the config says 0 (TiProxy's "default")
DEFAULT_LOAD_RATE = 2.0
DEFAULT_LOCATION_RATE = 5.0
DEFAULT_RATIO = 1.2
LOAD_GAP = 2  # load steps between busiest and idlest before the balancer acts


class Movable(Protocol):
    backend: Backend | None
    balanced_at: float

    def wait_reason(self) -> str: ...
    def request_move(self, reason: str, target: Backend | None = None) -> None: ...
    @property
    def moving(self) -> bool: ...


class Rebalancer:
    def __init__(self, router: Router, config: Config) -> None:
        self.router = router
        self.config = config
        self._budget: dict[str, float] = {}  # reason -> moves allowed now (a token bucket)

    def tick(self, sessions: Iterable[Movable]) -> int:
        """One round; returns how many moves it asked for."""
        self._refill()
        by_backend: dict[str, list[Movable]] = {}
        for s in sessions:
            if s.backend is not None:
                by_backend.setdefault(s.backend.addr, []).append(s)
        asked = 0
        for namespace in {b.namespace for b in self.router.backends.values()}:
            backends = [b for b in self.router.backends.values()
                        if b.namespace == namespace and not b.draining and not b.down
                        and not b.doubt]
            if len(backends) < 2:
                continue
            asked += self._location(backends, by_backend)
            if self.router.policy == "resource":
                asked += self._load(backends, by_backend)
            asked += self._connections(backends, by_backend)
        return asked

    def _refill(self) -> None:
        balance = self.config.balance
        rates = {
            "conn": balance.conn_count.migrations_per_second or DEFAULT_CONN_RATE,
            "load": balance.cpu.migrations_per_second or DEFAULT_LOAD_RATE,
            "location": balance.location.migrations_per_second or DEFAULT_LOCATION_RATE,
        }
        for reason, rate in rates.items():
            self._budget[reason] = min(rate, self._budget.get(reason, 0.0) + rate * INTERVAL)

    def _location(self, backends: list[Backend], by_backend: dict[str, list[Movable]]) -> int:
        router = self.router
        want = router.own_labels.get(router.label_name) if router.label_name else None
        if want is None or router.policy not in ("resource", "location"):
            return 0
        good = [b for b in backends if b.labels.get(router.label_name) == want]
        if not good:
            return 0
        asked = 0
        for b in backends:
            if b in good:
                continue
            for s in by_backend.get(b.addr, []):
                target = min(good, key=lambda g: g.connections)
                if self._move(s, target, "location"):
                    asked += 1
        return asked

    def _load(self, backends: list[Backend], by_backend: dict[str, list[Movable]]) -> int:
        sampled = [b for b in backends if b.load.sampled]
        if len(sampled) < 2:
            return 0
        busiest = max(sampled, key=lambda b: b.load_step)
        idlest = min(sampled, key=lambda b: (b.load_step, b.connections))
        if busiest.load_step - idlest.load_step < LOAD_GAP:
            return 0
        return self._move_some(by_backend.get(busiest.addr, []), idlest, "load", limit=1)

    def _connections(self, backends: list[Backend], by_backend: dict[str, list[Movable]]) -> int:
        counts = {b.addr: b.connections for b in backends}
        total = sum(counts.values())
        if total == 0:
            return 0
        ratio = self.config.balance.conn_count.count_ratio_threshold or DEFAULT_RATIO
        average = total / len(backends)
        asked = 0
        if self.router.policy == "resource":
            # Load comes first: never fill a busier backend to even out counts.
            lowest = min(b.load_step for b in backends)
            backends = [b for b in backends if b.load_step == lowest] or backends
        while True:
            most = max(backends, key=lambda b: counts[b.addr])
            least = min(backends, key=lambda b: counts[b.addr])
            even = counts[most.addr] <= average * ratio and counts[least.addr] >= average / ratio
            if even or counts[most.addr] - counts[least.addr] < 2:
                return asked
            if not self._move_some(by_backend.get(most.addr, []), least, "conn", limit=1):
                return asked
            counts[most.addr] -= 1
            counts[least.addr] += 1
            asked += 1

    def _move_some(self, sessions: list[Movable], target: Backend, reason: str,
                   limit: int) -> int:
        asked = 0
        for s in sessions:
            if asked >= limit:
                break
            if self._move(s, target, reason):
                asked += 1
        return asked

    def _move(self, s: Movable, target: Backend, reason: str) -> bool:
        if self._budget.get(reason, 0.0) < 1.0:
            return False
        if s.moving or s.wait_reason() or time.monotonic() - s.balanced_at < COOLDOWN:
            return False
        self._budget[reason] -= 1.0
        s.balanced_at = time.monotonic()
        source = s.backend.addr if s.backend else "?"
        log.debug("rebalance (%s): a session %s -> %s", reason, source, target.addr)
        s.request_move(reason, target)
        return True
