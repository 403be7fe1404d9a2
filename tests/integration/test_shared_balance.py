"""Several proxies as one: two proxies in front of the same four MariaDB servers, registered in
a real etcd, share their sessions per backend there, so that the backends are even for the
cluster as a whole (counted by the servers themselves, in their processlists), and a proxy that
stops or dies takes its registration and its counts with it."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeAlias

import pymysql
import pytest

from support.backends import APP, BACKEND_ARGS, MariaDBFactory
from support.etcdkeys import keys_under, lease_ttl
from support.proxy import ProxyFactory, ProxyProcess
from tiproxy.discovery.peers import COUNTS_TTL, PEER_PREFIX, ROUND
from tiproxy.discovery.registration import SESSION_TTL, TIPROXY_TOPOLOGY_PREFIX
from tiproxy.playground.etcd import EtcdServer
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

WAIT = 20.0
Conn: TypeAlias = "pymysql.connections.Connection[Any]"


@pytest.fixture(scope="module")
def five(mariadb_factory: MariaDBFactory) -> list[MariaDBServer]:
    return [mariadb_factory(BACKEND_ARGS, (APP,)) for _ in range(5)]


@pytest.fixture
def four(five: list[MariaDBServer]) -> list[MariaDBServer]:
    return five[:4]


@pytest.fixture
def users_file(five: list[MariaDBServer], tmp_path: Path) -> Path:
    """The app user's stored hash, so that sessions can move (a reusable credential)."""
    path = tmp_path / "users"
    path.write_text(five[0].sql("SELECT User, authentication_string FROM mysql.user "
                                "WHERE User = 'app'"))
    return path


@pytest.fixture
def clients() -> Iterator[list[Conn]]:
    opened: list[Conn] = []
    yield opened
    for conn in opened:
        conn.close()


def until(what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def start(proxy_factory: ProxyFactory, etcd: EtcdServer, servers: list[MariaDBServer],
          users: Path) -> ProxyProcess:
    return proxy_factory([s.addr for s in servers],
                         f'pd-addrs = ["{etcd.endpoint}"]\n'
                         f'[security]\nusers-file = "{users}"')


def name(proxy: ProxyProcess) -> str:
    return f"127.0.0.1:{proxy.port}"  # what it registers: its listen host is 127.0.0.1


def on_servers(servers: list[MariaDBServer]) -> list[int]:
    """The app user's connections on each server, as the server itself lists them."""
    return [int(s.sql("SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                      "WHERE USER = 'app'").strip()) for s in servers]


def peers_seen(proxy: ProxyProcess) -> int:
    return sum(b["peer_connections"] for b in proxy.backends())


def own(proxy: ProxyProcess) -> dict[str, int]:
    return {b["addr"]: b["connections"] for b in proxy.backends()}


def open_sessions(proxy: ProxyProcess, n: int, into: list[Conn]) -> None:
    for _ in range(n):
        conn = proxy.connect(APP, autocommit=True)
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        into.append(conn)


def balancer_moves(proxy: ProxyProcess) -> Counter[tuple[str, str]]:
    """(from, to) -> sessions the rebalancer moved (reason conn or load)."""
    status, body = proxy.api("/api/admin/migrations")
    assert status == 200, body
    return Counter({(t["from"], t["to"]): t["count"] for t in json.loads(body)["totals"]
                    if t["reason"] in ("conn", "load") and t["result"] == "succeed"})


def test_two_proxies_keep_four_backends_even_together(
        etcd_server: EtcdServer, four: list[MariaDBServer], users_file: Path,
        proxy_factory: ProxyFactory, clients: list[Conn]) -> None:
    a = start(proxy_factory, etcd_server, four, users_file)
    b = start(proxy_factory, etcd_server, four, users_file)
    for proxy in (a, b):
        until(f"{name(proxy)} registered and publishing",
              lambda p=proxy: {f"{TIPROXY_TOPOLOGY_PREFIX}{name(p)}/info",
                               f"{TIPROXY_TOPOLOGY_PREFIX}{name(p)}/ttl",
                               f"{PEER_PREFIX}{name(p)}"} <= set(keys_under(etcd_server, "/")))
    open_sessions(a, 50, clients)
    until("b has a's 50 sessions", lambda: peers_seen(b) == 50)
    open_sessions(b, 50, clients)
    until("each backend holds 25 in total", lambda: on_servers(four) == [25] * 4)
    per_proxy = [own(a), own(b)]
    assert all(sum(p.values()) == 50 for p in per_proxy)
    assert [per_proxy[0][s.addr] + per_proxy[1][s.addr] for s in four] == [25] * 4
    until("b published them", lambda: json.loads(keys_under(etcd_server, PEER_PREFIX)[
        f"{PEER_PREFIX}{name(b)}"][0]) == {"backends": {s.addr: per_proxy[1][s.addr]
                                                        for s in four}}, timeout=5)

    until("a has b's 50 sessions", lambda: peers_seen(a) == 50)
    open_sessions(a, 40, clients)  # through one proxy only
    until("each backend holds 35 in total", lambda: on_servers(four) == [35] * 4)
    assert balancer_moves(a) == {} and balancer_moves(b) == {}  # routing did it all

    # b stops cleanly: its sessions close, then its registration and its counts leave etcd.
    counts_lease = keys_under(etcd_server, PEER_PREFIX)[f"{PEER_PREFIX}{name(b)}"][1]
    assert lease_ttl(etcd_server, counts_lease)[1] == COUNTS_TTL
    assert b.proc is not None
    b.proc.send_signal(signal.SIGTERM)
    assert b.proc.wait(30) == 0
    left = keys_under(etcd_server, "/")
    assert not [k for k in left if name(b) in k], left
    until("a forgot b's sessions", lambda: peers_seen(a) == 0, timeout=2 * COUNTS_TTL)
    until("a's 90 sessions are what is left", lambda: sum(on_servers(four)) == 90)


def test_a_killed_proxy_leaves_its_counts_to_a_short_lease(
        etcd_server: EtcdServer, four: list[MariaDBServer], users_file: Path,
        proxy_factory: ProxyFactory, clients: list[Conn]) -> None:
    a = start(proxy_factory, etcd_server, four, users_file)
    b = start(proxy_factory, etcd_server, four, users_file)
    open_sessions(b, 8, clients)
    until("a has b's sessions", lambda: peers_seen(a) == 8)
    keys = keys_under(etcd_server, "/")
    registration_lease = keys[f"{TIPROXY_TOPOLOGY_PREFIX}{name(b)}/ttl"][1]
    assert b.proc is not None
    b.proc.kill()
    b.proc.wait()
    assert f"{PEER_PREFIX}{name(b)}" in keys_under(etcd_server, PEER_PREFIX)  # nobody removed it
    until("b's counts expired", lambda: f"{PEER_PREFIX}{name(b)}" not in
          keys_under(etcd_server, PEER_PREFIX), timeout=COUNTS_TTL + 5)
    until("a no longer counts b's sessions", lambda: peers_seen(a) == 0, timeout=5)
    assert lease_ttl(etcd_server, registration_lease)[0] > 0  # the registration stays...
    until("b's registration expired",  # ...for TiProxy's 45 seconds
          lambda: not [k for k in keys_under(etcd_server, "/") if name(b) in k],
          timeout=SESSION_TTL + 10)
    assert lease_ttl(etcd_server, registration_lease)[0] == -1


def test_proxies_even_together_move_nothing_and_share_a_rebalance(
        etcd_server: EtcdServer, five: list[MariaDBServer], users_file: Path,
        proxy_factory: ProxyFactory, clients: list[Conn]) -> None:
    """a's sessions are on two backends, b's on the other two: each alone would move half of
    them, together they are even and nothing moves. Then an empty fifth backend joins both:
    the sessions that fill it come from both proxies, each its share, and add up to what evens
    the cluster, not twice that; no session moves any other way."""
    four, fifth = five[:4], five[4]
    a = start(proxy_factory, etcd_server, four[:2], users_file)
    b = start(proxy_factory, etcd_server, four[2:], users_file)
    open_sessions(a, 40, clients)
    open_sessions(b, 40, clients)
    assert on_servers(four) == [20] * 4
    until("both published", lambda: [sum(json.loads(v)["backends"].values()) for k, (v, _)
                                      in keys_under(etcd_server, PEER_PREFIX).items()
                                      if k.endswith((name(a), name(b)))] == [40, 40])
    time.sleep(2 * ROUND)  # and both read it: each reads every proxy's counts once a ROUND
    reconfigure(a, four)
    reconfigure(b, four)
    until("both see each other", lambda: peers_seen(a) == 40 and peers_seen(b) == 40)
    time.sleep(5)  # five rebalance rounds with every backend known to both
    assert balancer_moves(a) == {} and balancer_moves(b) == {}
    assert on_servers(four) == [20] * 4

    everyone = [*four, fifth]
    reconfigure(a, everyone)
    reconfigure(b, everyone)
    until("the fifth backend filled", lambda: on_servers(everyone)[4] >= 16 / 1.2)
    time.sleep(5)  # let any further round happen
    moves = balancer_moves(a) + balancer_moves(b)
    assert {to for _, to in moves} == {fifth.addr}, moves
    assert balancer_moves(a) and balancer_moves(b)  # both proxies took part
    assert sum(moves.values()) <= 17, moves  # the excess (16) once, not twice
    final = on_servers(everyone)
    assert max(final) <= 16 * 1.2 and min(final) >= 16 / 1.2, final


def reconfigure(proxy: ProxyProcess, servers: list[MariaDBServer]) -> None:
    addrs = ", ".join(f'"{s.addr}"' for s in servers)
    status, body = proxy.api("/api/admin/config", "PUT",
                             f"[proxy]\nbackend-addrs = [{addrs}]".encode())
    assert status == 200, body
