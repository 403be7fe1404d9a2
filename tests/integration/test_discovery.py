"""The proxy following TiDB's topology in a real etcd: scale out, lease expiry, no client error."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pytest

from support.backends import ADMIN_TOML, BACKEND_ARGS, BACKEND_USERS, MariaDBFactory
from support.proxy import ProxyFactory
from tiproxy.playground.etcd import EtcdServer

pytestmark = pytest.mark.integration



def port_of(conn: Any) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT @@port")
        return int(cur.fetchone()[0])


def test_sessions_follow_the_topology(etcd_server: EtcdServer, mariadb_factory: MariaDBFactory,
                                      proxy_factory: ProxyFactory) -> None:
    servers = [mariadb_factory(BACKEND_ARGS, BACKEND_USERS) for _ in range(3)]
    info = {"version": "8.0.11-TiDB-v7.5.0", "git_hash": "test", "labels": {"zone": "z1"}}
    registered = []
    try:
        for s in servers[:2]:
            etcd_server.register_tidb(s.addr, info, ttl_seconds=3)
            registered.append(s.addr)
        proxy = proxy_factory(
            [], f'pd-addrs = ["{etcd_server.endpoint}"]\n[balance]\npolicy = "connection"'
            + ADMIN_TOML)
        deadline = time.monotonic() + 15
        while {b["addr"] for b in proxy.backends()} != {s.addr for s in servers[:2]}:
            assert time.monotonic() < deadline, proxy.backends()
            time.sleep(0.1)
        assert all(b["sources"] == ["etcd"] and b["labels"] == {"zone": "z1"}
                   for b in proxy.backends())
        _, health = proxy.api("/api/debug/health")
        assert json.loads(health)["discovery"] == {"etcd": "ok", "registration": "ok", "peers": "ok"}
        conns = [proxy.connect() for _ in range(100)]
        for i, c in enumerate(conns):
            with c.cursor() as cur:
                cur.execute(f"SET @me = {i}")
        assert Counter(port_of(c) for c in conns) == {servers[0].port: 50, servers[1].port: 50}

        etcd_server.register_tidb(servers[2].addr, info, ttl_seconds=3)  # scale out
        registered.append(servers[2].addr)
        deadline = time.monotonic() + 30
        while True:
            counts = {b["addr"]: b["connections"] for b in proxy.backends()}
            if len(counts) == 3 and all(25 <= n <= 40 for n in counts.values()):
                break
            assert time.monotonic() < deadline, f"not spread within 30 s: {counts}"
            time.sleep(0.2)
        with proxy.connect() as newcomer:  # new connections reach the new backend
            assert port_of(newcomer) == servers[2].port
        for i, c in enumerate(conns):  # moved by migration: same connection, same state
            with c.cursor() as cur:
                cur.execute("SELECT @me")
                assert cur.fetchone()[0] == i

        etcd_server.expire(servers[0].addr)  # its lease runs out: it has left
        registered.remove(servers[0].addr)
        deadline = time.monotonic() + 30
        while servers[0].addr in {b["addr"] for b in proxy.backends()}:
            assert time.monotonic() < deadline, proxy.backends()
            time.sleep(0.2)
        for i, c in enumerate(conns):  # zero client errors
            assert port_of(c) != servers[0].port
            with c.cursor() as cur:
                cur.execute("SELECT @me")
                assert cur.fetchone()[0] == i
        for c in conns:
            c.close()
    finally:
        for addr in registered:
            etcd_server.deregister(addr)
