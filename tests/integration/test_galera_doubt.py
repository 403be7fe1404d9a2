"""A Galera node that leaves the primary component: the first session to hear of it tells the
proxy, which checks that node at once instead of at its next interval; the statement, which did
not run there, runs on another node, where the session goes on (net/recovery.py); inside a
transaction (without transaction-replay) the client gets the node's error.

The node is cut off with `gmcast.isolate=1` (Galera's own switch: it drops its group links and
becomes non-primary, answering queries with 1047 "WSREP has not yet prepared node for
application use") and joins again with `gmcast.isolate=0`. The health interval is long, so only
the session's error can explain a verdict within seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pymysql
import pytest

from support.backends import ADMIN_TOML
from support.proxy import ProxyFactory, ProxyProcess
from tiproxy.playground.galera import GaleraCluster
from tiproxy.playground.install import LauncherError

pytestmark = pytest.mark.integration

HEALTH = '\n[health]\ninterval = "60s"\ntimeout = "2s"\nfailure-threshold = 1'


def _backend(proxy: ProxyProcess, addr: str) -> dict[str, object]:
    return {b["addr"]: b for b in proxy.backends()}[addr]


@pytest.fixture
def isolate(galera_cluster: GaleraCluster) -> Iterator[list[int]]:
    """The nodes a test cut off; each joins again afterwards and is Synced."""
    cut: list[int] = []
    yield cut
    for i in cut:
        galera_cluster.nodes[i].sql("SET GLOBAL wsrep_provider_options = 'gmcast.isolate=0'")
    for i in cut:
        try:
            galera_cluster.wait_synced(i, 60)
        except LauncherError:  # a node that cannot rejoin is restarted
            galera_cluster.stop_node(i)
            galera_cluster.start_node(i)


def test_a_session_hearing_1047_gets_its_node_checked_at_once(
    galera_cluster: GaleraCluster, proxy_factory: ProxyFactory, isolate: list[int],
) -> None:
    proxy = proxy_factory(galera_cluster.addrs, HEALTH + ADMIN_TOML)
    deadline = time.monotonic() + 10
    while not all(b["galera"] for b in proxy.backends()):  # the first round of checks
        assert time.monotonic() < deadline, proxy.backends()
        time.sleep(0.05)
    conn = proxy.connect(autocommit=True)
    addr = proxy.session(conn.thread_id())["backend"]
    i = galera_cluster.addrs.index(addr)
    with conn.cursor() as cur:
        cur.execute("SET @mine = 'kept'")
    fillers = []  # kept open, so that the next new session lands on that node too
    in_trans = proxy.connect(autocommit=True)
    while proxy.session(in_trans.thread_id())["backend"] != addr:
        assert len(fillers) < 10
        fillers.append(in_trans)
        in_trans = proxy.connect(autocommit=True)
    with in_trans.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute("SELECT COUNT(*) FROM mysql.db")

    isolate.append(i)
    galera_cluster.nodes[i].sql("SET GLOBAL wsrep_provider_options = 'gmcast.isolate=1'")
    deadline = time.monotonic() + 20
    while galera_cluster.node_state(i)[0] != "OFF":
        assert time.monotonic() < deadline, galera_cluster.node_state(i)
        time.sleep(0.05)
    with conn.cursor() as cur:  # it did not run there: it runs elsewhere
        cur.execute("SELECT @mine, @@port, COUNT(*) FROM mysql.db")
        mine, port, _ = cur.fetchone()
    assert mine == "kept" and f"127.0.0.1:{port}" != addr
    assert proxy.session(conn.thread_id())["backend"] != addr
    with pytest.raises(pymysql.err.MySQLError) as failed, in_trans.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM mysql.db")
    assert failed.value.args[0] == 1047, failed.value.args  # its transaction was there

    # Within the 60 s interval only the session's report can have started this check.
    deadline = time.monotonic() + 10
    while _backend(proxy, addr)["status"] != "unhealthy":
        assert time.monotonic() < deadline, (_backend(proxy, addr), proxy.log()[-3000:])
        time.sleep(0.05)
    assert "in doubt until its next health check" in proxy.log()
    others = [a for a in galera_cluster.addrs if a != addr]
    for _ in range(4):  # new sessions go elsewhere
        with proxy.connect() as fresh:
            assert proxy.session(fresh.thread_id())["backend"] in others
    for other in (conn, in_trans, *fillers):
        other.close()
