"""Health checks, balancing and namespaces against real MariaDB servers."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pymysql
import pytest

from support.backends import ADMIN_TOML, APP, BACKEND_ARGS, BACKEND_USERS, MariaDBFactory
from support.proxy import ProxyFactory, ProxyProcess
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

FAST_HEALTH = '\n[health]\ninterval = "0.5s"\ntimeout = "0.5s"\nfailure-threshold = 2\n' \
              'success-threshold = 2'


def fresh(factory: MariaDBFactory, n: int) -> list[MariaDBServer]:
    return [factory(BACKEND_ARGS, BACKEND_USERS) for _ in range(n)]


def backend_of(conn: Any) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT @@port")
        return int(cur.fetchone()[0])


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def status_of(proxy: ProxyProcess, addr: str) -> dict[str, Any]:
    return {b["addr"]: b for b in proxy.backends()}[addr]


def test_hung_backend_is_marked_unhealthy(mariadb_factory: MariaDBFactory,
                                          proxy_factory: ProxyFactory) -> None:
    servers = fresh(mariadb_factory, 2)
    proxy = proxy_factory([s.addr for s in servers], FAST_HEALTH + ADMIN_TOML)
    hung = servers[0]
    hung.pause()
    try:
        wait_for(lambda: status_of(proxy, hung.addr)["status"] == "unhealthy", 15,
                 "the hung backend to be marked unhealthy")
        assert "no answer" in status_of(proxy, hung.addr)["health"]
        for _ in range(4):  # new sessions avoid it, and do not hang on it
            with proxy.connect(read_timeout=10) as conn:
                assert backend_of(conn) == servers[1].port
    finally:
        hung.resume()
    wait_for(lambda: status_of(proxy, hung.addr)["status"] == "healthy", 15,
             "the backend to be healthy again")


def test_galera_node_desynced_is_drained(galera_cluster: Any, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(galera_cluster.addrs, FAST_HEALTH + ADMIN_TOML)
    conns = [proxy.connect() for _ in range(6)]
    node = galera_cluster.nodes[1]
    try:
        wait_for(lambda: status_of(proxy, node.addr)["connections"] == 2, 10, "sessions spread")
        node.sql("SET GLOBAL wsrep_desync = ON")
        wait_for(lambda: status_of(proxy, node.addr)["status"] == "unhealthy", 15,
                 "the desynced node to be unhealthy")
        assert "galera node not synced" in status_of(proxy, node.addr)["health"]
        wait_for(lambda: status_of(proxy, node.addr)["connections"] == 0, 15,
                 "the desynced node to be drained")
        for c in conns:
            assert backend_of(c) != node.port
        with proxy.connect() as c:
            assert backend_of(c) != node.port
    finally:
        node.sql("SET GLOBAL wsrep_desync = OFF")
        for c in conns:
            c.close()
    wait_for(lambda: status_of(proxy, node.addr)["status"] == "healthy", 15,
             "the node to be healthy again")


def test_scale_out_moves_sessions_onto_the_new_backend(mariadb_factory: MariaDBFactory,
                                                       proxy_factory: ProxyFactory) -> None:
    servers = fresh(mariadb_factory, 3)
    proxy = proxy_factory([s.addr for s in servers[:2]],
                          '\n[balance]\npolicy = "connection"' + ADMIN_TOML)
    conns = [proxy.connect() for _ in range(30)]
    try:
        for i, c in enumerate(conns):
            with c.cursor() as cur:
                cur.execute(f"SET @me = {i}")
        addrs = ", ".join(f'"{s.addr}"' for s in servers)
        status, body = proxy.api("/api/admin/config", method="PUT",
                                 body=f"[proxy]\nbackend-addrs = [{addrs}]\n".encode())
        assert status == 200, body
        wait_for(lambda: all(8 <= b["connections"] <= 12 for b in proxy.backends()), 30,
                 "the sessions to spread over three backends")
        for i, c in enumerate(conns):
            with c.cursor() as cur:
                cur.execute("SELECT @me")
                assert cur.fetchone()[0] == i
    finally:
        for c in conns:
            c.close()


def test_loaded_backend_gets_fewer_new_sessions_and_nothing_bounces(
    mariadb_factory: MariaDBFactory, proxy_factory: ProxyFactory
) -> None:
    servers = fresh(mariadb_factory, 3)
    proxy = proxy_factory([s.addr for s in servers], '\n[health]\ninterval = "0.5s"' + ADMIN_TOML)
    busy = servers[0]
    stop = threading.Event()

    def burn() -> None:
        conn = pymysql.connect(host="127.0.0.1", port=busy.port, user=APP.name,
                               password=APP.password, database="test")
        with conn.cursor() as cur:
            while not stop.is_set():
                cur.execute("SELECT BENCHMARK(3000000, MD5('x'))")
        conn.close()

    burners = [threading.Thread(target=burn) for _ in range(6)]
    for t in burners:
        t.start()
    conns = []
    try:
        wait_for(lambda: status_of(proxy, busy.addr)["load"]["threads_running"] >= 4, 15,
                 "the load to show")
        conns = [proxy.connect() for _ in range(12)]
        placed = Counter(backend_of(c) for c in conns)
        assert placed[busy.port] <= 1, placed
        # a minute of balancing under load: no session moves more than twice
        time.sleep(60)
        for s in proxy.sessions():
            assert s["moves"] <= 2, s
        assert all(backend_of(c) != busy.port for c in conns)
    finally:
        stop.set()
        for t in burners:
            t.join()
        for c in conns:
            c.close()


def test_namespaces_keep_users_apart(mariadb_factory: MariaDBFactory,
                                     proxy_factory: ProxyFactory) -> None:
    main, analytics = fresh(mariadb_factory, 2)
    analytics.sql("CREATE USER IF NOT EXISTS 'report'@'%' IDENTIFIED BY 'report-pass';"
                  "GRANT ALL PRIVILEGES ON *.* TO 'report'@'%';")
    proxy = proxy_factory(
        [main.addr],
        f'\n[namespaces.analytics]\nusers = ["report"]\nbackend-addrs = ["{analytics.addr}"]',
    )
    for _ in range(3):
        with proxy.connect() as c:
            assert backend_of(c) == main.port
        with pymysql.connect(host="127.0.0.1", port=proxy.port, user="report",
                             password="report-pass") as c:
            assert backend_of(c) == analytics.port
    listed = {b["addr"]: b["namespace"] for b in proxy.backends()}
    assert listed == {main.addr: "", analytics.addr: "analytics"}
