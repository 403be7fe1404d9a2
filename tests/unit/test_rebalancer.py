"""The rebalancer's decisions from counts, alone and with other proxies sharing the balance
through etcd (each proxy moves only its own sessions, its share of the excess; no sockets)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tiproxy.balance import balancer
from tiproxy.balance.balancer import SETTLE, MoveOrder, Rebalancer, share
from tiproxy.balance.router import Router
from tiproxy.config import parse_config
from tiproxy.discovery.base import DiscoveredBackend

BACKENDS = ("b1:1", "b2:1", "b3:1", "b4:1")
FAST = "[balance]\npolicy = \"connection\"\n[balance.conn-count]\nmigrations-per-second = 1000\n"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(balancer, "time", fake)
    return fake


class Proxy:
    """One proxy's router and rebalancer, holding `sessions` per backend (all movable)."""

    def __init__(self, name: str, sessions: dict[str, int], toml: str = FAST) -> None:
        self.name = name
        self.router = Router()
        self.router.configure(parse_config(toml))
        self.router.update("static", {a: DiscoveredBackend(a) for a in BACKENDS})
        for addr, n in sessions.items():
            self.router.backends[addr].connections = n
        self.rebalancer = Rebalancer(self.router, parse_config(toml))
        self.moved = 0

    @property
    def sessions(self) -> dict[str, int]:
        return {a: b.connections for a, b in self.router.backends.items()}

    def sees(self, *others: Proxy) -> None:
        """What discovery/peers.py hands the router: the others' counts, as published."""
        self.router.set_peers(self.name, {o.name: o.sessions for o in others})

    def carry_out(self, orders: list[MoveOrder]) -> None:
        for order in orders:
            self.router.backends[order.source].connections -= order.count
            self.router.backends[order.target].connections += order.count
            self.moved += order.count

    def round(self) -> list[MoveOrder]:
        if not self.rebalancer.sources():
            return []
        return self.rebalancer.plan(self.sessions)


def totals(*proxies: Proxy) -> dict[str, int]:
    total: Counter[str] = Counter()
    for p in proxies:
        total.update(p.sessions)
    return {a: total[a] for a in BACKENDS}


@given(st.integers(0, 200), st.dictionaries(st.sampled_from("abcdef"), st.integers(0, 100),
                                            min_size=1))
def test_the_shares_add_up_to_what_must_leave(total: int, holdings: dict[str, int]) -> None:
    parts = {p: share(total, holdings, p) for p in holdings}
    assert sum(parts.values()) == min(total, sum(holdings.values()))
    assert all(0 <= parts[p] <= holdings[p] for p in holdings)


def test_a_remainder_goes_to_one_proxy_only() -> None:
    holdings = {"10.0.0.2:6000": 5, "10.0.0.1:6000": 5}
    assert share(1, holdings, "10.0.0.1:6000") == 1  # the lower name breaks the tie
    assert share(1, holdings, "10.0.0.2:6000") == 0
    assert share(3, {"a": 1, "b": 9}, "b") == 3
    assert share(3, {"a": 1, "b": 9}, "a") == 0


def test_one_proxy_alone_evens_out_its_sessions(clock: Clock) -> None:
    alone = Proxy("a", {"b1:1": 40, "b2:1": 40, "b3:1": 40, "b4:1": 0})
    alone.carry_out(alone.round())
    assert alone.sessions["b4:1"] >= 25  # within count-ratio-threshold of the average (30)
    assert alone.round() == []


def test_proxies_whose_sessions_are_even_together_move_nothing(clock: Clock) -> None:
    """Each proxy alone would move half its sessions; together the backends are even."""
    a = Proxy("a", {"b1:1": 20, "b2:1": 20})
    b = Proxy("b", {"b3:1": 20, "b4:1": 20})
    assert a.round() and b.round()  # on their own numbers, both would move
    a.sees(b)
    b.sees(a)
    assert a.round() == [] and b.round() == []


def test_two_proxies_move_the_excess_once_between_them(clock: Clock) -> None:
    """A fourth backend is back: the sessions it should get come from both proxies, in
    proportion to what each holds, and add up to what evens the cluster, not twice that."""
    a = Proxy("a", {"b1:1": 17, "b2:1": 17, "b3:1": 16})
    b = Proxy("b", {"b1:1": 16, "b2:1": 16, "b3:1": 18})
    a.sees(b)
    b.sees(a)
    a_orders, b_orders = a.round(), b.round()  # the same picture, at the same time
    a.carry_out(a_orders)
    b.carry_out(b_orders)
    assert {o.target for o in a_orders + b_orders} == {"b4:1"}
    assert totals(a, b) == dict.fromkeys(BACKENDS, 25)
    assert a.moved + b.moved == 25
    assert abs(a.moved - b.moved) <= 1
    clock.now += SETTLE
    a.sees(b)
    b.sees(a)
    assert a.round() == [] and b.round() == []


def test_a_proxy_waits_for_the_others_to_publish_after_it_moved(clock: Clock) -> None:
    """Until the others' counts include its moves, a proxy would see an excess it already
    took care of: it does not judge again for SETTLE seconds."""
    a = Proxy("a", {"b1:1": 30, "b2:1": 10})
    b = Proxy("b", {"b1:1": 30, "b2:1": 10})
    a.sees(b)
    b.sees(a)
    a.carry_out(a.round())
    assert a.moved == 20  # its half of the 40 that b1 holds over the average of 20
    assert a.rebalancer.plan(a.sessions) == []  # b still looks as it did: wait
    b.carry_out(b.round())  # b moves its own share, from the same picture
    clock.now += SETTLE
    a.sees(b)
    b.sees(a)
    assert a.round() == [] and b.round() == []
    assert totals(a, b) == dict.fromkeys(BACKENDS, 20)


def test_counts_published_late_do_not_swing_sessions_back(clock: Clock) -> None:
    """Rounds at different times, each proxy's counts reaching the other a second after they
    changed (its publishing round): no session ever moves away from the backend that fills,
    and the cluster ends even."""
    a = Proxy("a", {"b1:1": 30, "b2:1": 20, "b3:1": 22, "b4:1": 0})
    b = Proxy("b", {"b1:1": 18, "b2:1": 28, "b3:1": 26, "b4:1": 0})
    published = {p.name: [(clock.now, p.sessions)] for p in (a, b)}
    targets: set[str] = set()
    for step in range(60):  # 30 s in half seconds; a acts on even steps, b on odd ones
        clock.now += 0.5
        me, other = (a, b) if step % 2 == 0 else (b, a)
        seen = [c for t, c in published[other.name] if t <= clock.now - 1.0] or \
            [published[other.name][0][1]]
        me.router.set_peers(me.name, {other.name: seen[-1]})
        orders = me.round()
        targets |= {o.target for o in orders}
        me.carry_out(orders)
        published[me.name].append((clock.now, me.sessions))
    assert targets == {"b4:1"}
    cluster = totals(a, b)
    assert cluster["b4:1"] >= 36 / 1.2 and max(cluster.values()) <= 36 * 1.2, cluster
    assert a.moved + b.moved == cluster["b4:1"]
