"""The rebalance loop: move sessions from the most to the least loaded backend, gently.

Once a second, per namespace, among the backends that take sessions:
- location (`[balance] label-name` set, policy resource or location): sessions on a backend whose
  label differs from the proxy's own move to one that matches, if one exists;
- load (policy resource): when the busiest backend is at least two load steps above the idlest,
  sessions move from it to the idlest, at `[balance.cpu] migrations-per-second`;
- connections (every policy): when the most used backend holds more than `count-ratio-threshold`
  times the average, or the least used less than the average divided by it, and they differ by
  two sessions or more, sessions move from the most used backends that can give one to the
  least used, at `[balance.conn-count] migrations-per-second`.
Hysteresis: a session moved by the balancer is not moved by it again for `COOLDOWN` seconds, and
only sessions at a safe point are picked, so a move never waits and nothing bounces.
The decision needs counts only (sessions and movable sessions per backend, summed over the
processes that hold sessions); it comes out as MoveOrders, which the holder of the sessions
carries out (carry_out), so it works the same with one process or with workers. Moves that
drain a backend (health, API, config) are not limited here: they happen in the sessions.

Several proxies as one (discovery/peers.py): with other proxies' sessions per backend known,
load and connections are judged on the cluster's counts (ours plus theirs), but a proxy can
move only its own sessions. If each moved the whole excess, two proxies would together move it
twice and then move back. So the sessions that must leave a backend for the counts to be even
are split among the proxies that hold sessions there, in proportion to what each holds
(`share`, the same split for every proxy that sees the same counts), and each moves at most its
part; after a round that moved, a proxy waits `SETTLE` seconds, until the others have published
counts that include its moves, before it judges again. Location is each proxy's own preference
(its own `[labels]`) and moves its own sessions as without peers.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
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
# After a round that moved sessions while other proxies share the balance: two of their
# publishing rounds (discovery/peers.py ROUND), so that their counts include our moves.
SETTLE = 2.5


@dataclass(frozen=True)
class MoveOrder:
    """Move `count` sessions from `source` to `target`: what a round decides, by backend
    address, so that whoever holds the sessions (this process or a worker) carries it out."""

    source: str
    target: str
    reason: str  # "conn", "load" or "location"
    count: int


class Movable(Protocol):
    backend: Backend | None
    balanced_at: float

    def at_safe_point(self) -> bool: ...
    def request_move(self, reason: str, target: Backend | None = None) -> None: ...
    @property
    def moving(self) -> bool: ...


def movable(s: Movable, now: float) -> bool:
    """At a safe point, no move asked for, and not moved by the balancer lately."""
    return not s.moving and now - s.balanced_at >= COOLDOWN and s.at_safe_point()


def count_movable(sessions: Iterable[Movable], sources: Container[str]) -> Counter[str]:
    """Sessions the balancer may pick on the backends `sources`, by backend address."""
    now = time.monotonic()
    return Counter(s.backend.addr for s in sessions
                   if s.backend is not None and s.backend.addr in sources and movable(s, now))


def carry_out(order: MoveOrder, sessions: Iterable[Movable], target: Backend) -> int:
    """Ask up to `order.count` movable sessions on `order.source` to move; returns how many."""
    now = time.monotonic()
    asked = 0
    for s in sessions:
        if asked >= order.count:
            break
        if s.backend is not None and s.backend.addr == order.source and movable(s, now):
            s.balanced_at = now
            s.request_move(order.reason, target)
            asked += 1
    if asked:
        log.debug("rebalance (%s): %d sessions %s -> %s", order.reason, asked, order.source,
                  order.target)
    return asked


def share(total: int, holdings: Mapping[str, int], me: str) -> int:
    """`me`'s part of `total` sessions that must leave one backend, `holdings` being what each
    proxy holds there (`me` included): in proportion, the remainder going one each to the
    largest fractions (ties: the larger holding, then the lower name). Every proxy that sees the
    same counts computes the same split, and the parts add up to `total`."""
    held = sum(n for n in holdings.values() if n > 0)
    if total <= 0 or holdings.get(me, 0) <= 0:
        return 0
    total = min(total, held)
    left = total - sum(total * n // held for n in holdings.values() if n > 0)
    ranked = sorted((p for p, n in holdings.items() if n > 0),
                    key=lambda p: (-(total * holdings[p] % held), -holdings[p], p))
    return total * holdings[me] // held + (1 if me in ranked[:left] else 0)


class Rebalancer:
    """Decides from counts alone: the backends' sessions (every process's, summed, and the other
    proxies' as published) and how many of this proxy's are movable now. It never sees a
    session."""

    def __init__(self, router: Router, config: Config) -> None:
        self.router = router
        self.config = config
        self._budget: dict[str, float] = {}  # reason -> moves allowed now (a token bucket)
        self._movable: Counter[str] = Counter()
        self._orders: Counter[tuple[str, str, str]] = Counter()
        # reason -> backend -> moves from it this proxy may still make this round; no entry:
        # no limit (no other proxy shares the balance, or the reason is location)
        self._quota: dict[str, Counter[str]] = {}
        self._settle_until = 0.0

    def sources(self) -> set[str]:
        """The backends this round would move sessions from if every session were movable:
        only theirs need to be looked at (none, while the backends are balanced)."""
        if time.monotonic() < self._settle_until:
            return set()
        budget = dict(self._budget)
        try:
            self._refill()
            orders = self._plan({b.addr: b.connections for b in self.router.backends.values()})
        finally:
            self._budget = budget
        return {order.source for order in orders}

    def plan(self, movable_counts: Mapping[str, int]) -> list[MoveOrder]:
        """One round: the moves to make, given the movable sessions by backend address."""
        self._refill()
        if time.monotonic() < self._settle_until:
            return []
        orders = self._plan(movable_counts)
        if orders and self.router.peer_sessions:
            self._settle_until = time.monotonic() + SETTLE
        return orders

    def _plan(self, movable_counts: Mapping[str, int]) -> list[MoveOrder]:
        self._movable = Counter(movable_counts)
        self._orders = Counter()
        self._quota = {}
        for namespace in {b.namespace for b in self.router.backends.values()}:
            backends = [b for b in self.router.backends.values()
                        if b.namespace == namespace and not b.draining and not b.down
                        and not b.doubt]
            if len(backends) < 2:
                continue
            counts = {b.addr: b.connections + b.peers for b in backends}  # the cluster's
            self._location(backends, counts)
            if self.router.policy == "resource":
                self._load(backends, counts)
            self._connections(backends, counts)
        return [MoveOrder(source, target, reason, n)
                for (source, target, reason), n in self._orders.items()]

    def _refill(self) -> None:
        balance = self.config.balance
        rates = {
            "conn": balance.conn_count.migrations_per_second or DEFAULT_CONN_RATE,
            "load": balance.cpu.migrations_per_second or DEFAULT_LOAD_RATE,
            "location": balance.location.migrations_per_second or DEFAULT_LOCATION_RATE,
        }
        for reason, rate in rates.items():
            self._budget[reason] = min(rate, self._budget.get(reason, 0.0) + rate * INTERVAL)

    def _limit(self, reason: str, leaving: Mapping[str, int]) -> None:
        """With other proxies sharing the balance: of the sessions that must leave each
        backend for `reason`, this proxy moves its share only."""
        router = self.router
        if not router.peer_sessions:
            return
        quota = self._quota.setdefault(reason, Counter())
        for addr, total in leaving.items():
            holdings = {p: counts.get(addr, 0) for p, counts in router.peer_sessions.items()}
            holdings[router.me] = router.backends[addr].connections
            quota[addr] = share(total, holdings, router.me)

    def _location(self, backends: list[Backend], counts: dict[str, int]) -> None:
        router = self.router
        want = router.own_labels.get(router.label_name) if router.label_name else None
        if want is None or router.policy not in ("resource", "location"):
            return
        good = [b for b in backends if b.labels.get(router.label_name) == want]
        if not good:
            return
        for b in backends:
            if b in good:
                continue
            while self._take(b, min(good, key=lambda g: counts[g.addr]), "location", counts):
                pass

    def _load(self, backends: list[Backend], counts: dict[str, int]) -> None:
        sampled = [b for b in backends if b.load.sampled]
        if len(sampled) < 2:
            return
        busiest = max(sampled, key=lambda b: b.load_step)
        idlest = min(sampled, key=lambda b: (b.load_step, counts[b.addr]))
        if busiest.load_step - idlest.load_step >= LOAD_GAP:
            self._limit("load", {busiest.addr: 1})
            self._take(busiest, idlest, "load", counts)

    def _connections(self, backends: list[Backend], counts: dict[str, int]) -> None:
        total = sum(counts[b.addr] for b in backends)
        if total == 0:
            return
        ratio = self.config.balance.conn_count.count_ratio_threshold or DEFAULT_RATIO
        average = total / len(backends)
        if self.router.policy == "resource":
            # Load comes first: never fill a busier backend to even out counts.
            lowest = min(b.load_step for b in backends)
            backends = [b for b in backends if b.load_step == lowest] or backends
        self._limit("conn", {b.addr: counts[b.addr] - math.ceil(average) for b in backends
                             if counts[b.addr] > math.ceil(average)})
        givers = list(backends)
        while givers:
            most = max(backends, key=lambda b: counts[b.addr])
            least = min(backends, key=lambda b: counts[b.addr])
            if counts[most.addr] <= average * ratio and counts[least.addr] >= average / ratio:
                return  # even enough
            giver = max(givers, key=lambda b: counts[b.addr])
            if counts[giver.addr] - counts[least.addr] < 2:
                return
            if not self._take(giver, least, "conn", counts):
                givers.remove(giver)  # nothing it may give: the next most used may

    def _take(self, source: Backend, target: Backend, reason: str,
              counts: dict[str, int]) -> bool:
        """One session from source to target, if the budget, a movable session and this
        proxy's share allow."""
        quota = self._quota.get(reason)
        if self._budget.get(reason, 0.0) < 1.0 or self._movable[source.addr] < 1 \
                or (quota is not None and quota[source.addr] < 1):
            return False
        self._budget[reason] -= 1.0
        self._movable[source.addr] -= 1
        if quota is not None:
            quota[source.addr] -= 1
        self._orders[(source.addr, target.addr, reason)] += 1
        counts[source.addr] -= 1
        counts[target.addr] += 1
        return True
