"""The Galera launcher: nodes replicate, leave, rejoin and catch up, and report their wsrep state."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pymysql
import pytest

from support.backends import APP, connect
from tiproxy.playground.galera import SYNCED, GaleraCluster
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

DESYNCED = 2  # wsrep_local_state of a node with wsrep_desync=ON ("Donor/Desynced")


def _connect(node: MariaDBServer) -> pymysql.connections.Connection[Any]:
    # wsrep_sync_wait=1: a read waits until the node has applied everything committed before it
    # anywhere in the cluster, so a row written on another node is there without polling.
    return connect(node, autocommit=True, init_command="SET SESSION wsrep_sync_wait = 1")


def _values(node: MariaDBServer, table: str) -> list[int]:
    with _connect(node) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT v FROM {table} ORDER BY v")
        return [row[0] for row in cur.fetchall()]


def _insert(node: MariaDBServer, table: str, *values: int) -> None:
    with _connect(node) as conn, conn.cursor() as cur:
        cur.executemany(f"INSERT INTO {table} (v) VALUES (%s)", [(v,) for v in values])


@pytest.fixture
def table(galera_cluster: GaleraCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh table (with the primary key Galera wants) named after the test."""
    name = request.node.name.removeprefix("test_")[:60]
    node = galera_cluster.nodes[0]
    node.sql(
        f"DROP TABLE IF EXISTS {name}; "
        f"CREATE TABLE {name} (id INT AUTO_INCREMENT PRIMARY KEY, v INT NOT NULL)",
        database=APP.database,
    )
    yield name
    for node in galera_cluster.nodes:
        if node.running:
            node.sql(f"DROP TABLE IF EXISTS {name}", database=APP.database)
            break


@pytest.fixture
def restore_nodes(galera_cluster: GaleraCluster) -> Iterator[None]:
    """Start again whatever node a failing test left stopped, so the cluster stays whole."""
    yield
    for i, node in enumerate(galera_cluster.nodes):
        if not node.running:
            galera_cluster.start_node(i)


def test_every_node_is_synced_in_one_cluster(galera_cluster: GaleraCluster) -> None:
    assert len(set(galera_cluster.addrs)) == 3
    for i, node in enumerate(galera_cluster.nodes):
        assert galera_cluster.node_state(i) == ("ON", SYNCED)
        assert node.sql("SELECT @@wsrep_on, @@binlog_format").split() == ["1", "ROW"]
        status = node.sql("SHOW GLOBAL STATUS LIKE 'wsrep_cluster_size'")
        assert status.split() == ["wsrep_cluster_size", "3"]


def test_app_user_logs_in_on_every_node(galera_cluster: GaleraCluster) -> None:
    for node in galera_cluster.nodes:
        with connect(node) as conn, conn.cursor() as cur:
            cur.execute("SELECT CURRENT_USER(), DATABASE()")
            assert cur.fetchone() == ("app@%", "test")


def test_write_on_node_0_is_read_on_node_2(galera_cluster: GaleraCluster, table: str) -> None:
    _insert(galera_cluster.nodes[0], table, 1, 2, 3)
    assert _values(galera_cluster.nodes[2], table) == [1, 2, 3]


@pytest.mark.usefixtures("restore_nodes")
def test_stopped_node_rejoins_and_catches_up(galera_cluster: GaleraCluster, table: str) -> None:
    nodes = galera_cluster.nodes
    _insert(nodes[0], table, 1)
    addr = nodes[1].addr
    galera_cluster.stop_node(1)
    assert not nodes[1].running
    _insert(nodes[0], table, 2)  # the cluster carries on without node 1
    _insert(nodes[2], table, 3)
    assert nodes[0].sql("SHOW GLOBAL STATUS LIKE 'wsrep_cluster_size'").split()[1] == "2"
    galera_cluster.start_node(1)
    assert nodes[1].addr == addr
    assert galera_cluster.node_state(1) == ("ON", SYNCED)
    assert _values(nodes[1], table) == [1, 2, 3]
    _insert(nodes[1], table, 4)
    assert _values(nodes[0], table) == [1, 2, 3, 4]


@pytest.mark.usefixtures("restore_nodes")
def test_bootstrap_node_rejoins_without_new_cluster(
    galera_cluster: GaleraCluster, table: str
) -> None:
    nodes = galera_cluster.nodes
    galera_cluster.stop_node(0)
    _insert(nodes[1], table, 5)
    galera_cluster.start_node(0)
    assert "--wsrep-new-cluster" not in nodes[0].extra_args
    # Had it bootstrapped, node 0 would be a cluster of its own, without the row.
    assert nodes[0].sql("SHOW GLOBAL STATUS LIKE 'wsrep_cluster_size'").split()[1] == "3"
    assert _values(nodes[0], table) == [5]


def test_desync_shows_in_node_state(galera_cluster: GaleraCluster) -> None:
    node = galera_cluster.nodes[2]
    node.sql("SET GLOBAL wsrep_desync = ON")
    try:
        assert galera_cluster.node_state(2) == ("ON", DESYNCED)
        assert galera_cluster.node_state(0) == ("ON", SYNCED)
    finally:
        node.sql("SET GLOBAL wsrep_desync = OFF")
    galera_cluster.wait_synced(2, timeout=30)
    assert galera_cluster.node_state(2) == ("ON", SYNCED)


def test_single_node_cluster_as_context_manager() -> None:
    with GaleraCluster(size=1) as cluster:
        basedir = cluster.basedir
        assert cluster.node_state(0) == ("ON", SYNCED)
        assert cluster.nodes[0].sql("SELECT @@wsrep_cluster_name").strip() == cluster.name
    assert not cluster.nodes[0].running
    assert not basedir.exists()
