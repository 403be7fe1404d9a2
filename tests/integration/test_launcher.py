"""The MariaDB launcher: servers start, answer, keep data across restarts, crash and freeze."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pymysql
import pytest

from support.backends import APP, EDU, MariaDBFactory, connect
from support.net import port_refuses, split_addr
from tiproxy.playground.install import LauncherError
from tiproxy.playground.mariadb import MariaDBCluster, MariaDBServer

pytestmark = pytest.mark.integration


def _scalar(server: MariaDBServer, query: str, **kwargs: Any) -> object:
    with connect(server, **kwargs) as conn, conn.cursor() as cur:
        cur.execute(query)
        row = cur.fetchone()
        assert row is not None
        return row[0]


def test_backends_answer_select_1_over_tcp(backends: list[MariaDBServer]) -> None:
    assert len({server.addr for server in backends}) == 2
    for server in backends:
        assert split_addr(server.addr) == ("127.0.0.1", server.port)
        assert _scalar(server, "SELECT 1") == 1


def test_backends_allow_large_packets_and_local_infile(backends: list[MariaDBServer]) -> None:
    for server in backends:
        assert _scalar(server, "SELECT @@max_allowed_packet") == 64 * 1024 * 1024
        assert _scalar(server, "SELECT @@local_infile") == 1


def test_ed25519_user_logs_in(backends: list[MariaDBServer]) -> None:
    server = backends[0]
    assert server.sql("SELECT plugin FROM mysql.user WHERE user = 'edu'").strip() == "ed25519"
    assert _scalar(server, "SELECT CURRENT_USER()", user=EDU) == "edu@%"


def test_wrong_password_is_refused(backends: list[MariaDBServer]) -> None:
    with pytest.raises(pymysql.err.OperationalError) as info:
        pymysql.connect(host="127.0.0.1", port=backends[0].port, user="app", password="nope")
    assert info.value.args[0] == 1045  # ER_ACCESS_DENIED_ERROR


def test_restart_keeps_data_and_port(mariadb_factory: MariaDBFactory) -> None:
    server = mariadb_factory(users=(APP,))
    server.sql("CREATE TABLE t (v INT); INSERT INTO t VALUES (42);", database="test")
    addr = server.addr
    server.stop()
    assert not server.running
    assert port_refuses("127.0.0.1", server.port)
    server.stop()  # idempotent
    server.start()
    assert server.addr == addr
    assert _scalar(server, "SELECT v FROM t") == 42


def test_kill_makes_the_port_refuse_and_recovery_keeps_commits(
    mariadb_factory: MariaDBFactory,
) -> None:
    server = mariadb_factory(users=(APP,))
    with connect(server, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE t (v INT)")
        cur.execute("INSERT INTO t VALUES (7)")
    server.kill()
    assert not server.running
    assert port_refuses("127.0.0.1", server.port)
    server.start()  # InnoDB crash recovery
    assert _scalar(server, "SELECT v FROM t") == 7


def test_paused_server_does_not_answer_until_resumed(mariadb_factory: MariaDBFactory) -> None:
    server = mariadb_factory(users=(APP,))
    server.pause()
    try:
        # The kernel completes the TCP handshake; the server greeting never comes.
        with pytest.raises(pymysql.err.OperationalError):
            connect(server, connect_timeout=1, read_timeout=1)
    finally:
        server.resume()
    assert _scalar(server, "SELECT 1") == 1


def test_start_failure_reports_the_error_log(tmp_path: Path) -> None:
    server = MariaDBServer(tmp_path / "bad", extra_args=["--no-such-option=1"])
    with pytest.raises(LauncherError, match="no-such-option"):
        server.start(timeout=30)
    assert not server.running


def test_cluster_starts_servers_with_the_same_users_and_cleans_up() -> None:
    with MariaDBCluster(2, users=(APP,)) as cluster:
        assert len(set(cluster.addrs)) == 2
        for server in cluster.servers:
            assert _scalar(server, "SELECT DATABASE()") == "test"
        basedir = cluster.basedir
    assert not any(server.running for server in cluster.servers)
    assert not basedir.exists()
