"""The relay's compiled per-query path (net/_hotpath.c) stands in for the Python path only where
nothing tells them apart: the same workload through a proxy with it, one with it but without its
direct reader (net/_direct.c, `TIPROXY_DIRECT_RELAY=0`: the event loop's transports read every
chunk) and one without it (`TIPROXY_COMPILED_RELAY=0`) gets the same answers, and the proxies
count the same commands, bytes and packets, to the byte. The workload mixes what the compiled path takes (plain text
queries, prepared executes, pings) with what it must leave to Python (errors, multi-statements,
results over several reads, procedures with several results, statements that change the
session, executes sent right behind their prepare)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import mariadb
import mysql.connector
import pymysql
import pytest

from support.backends import APP
from support.metrics import Scrape, scrape
from support.proxy import ProxyFactory, ProxyProcess
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

OFF = {"TIPROXY_COMPILED_RELAY": "0"}
LOOP = {"TIPROXY_DIRECT_RELAY": "0"}
EXECUTES = 24  # prepared executes per connector: enough for the direct reader to take over
ROWS = 3000  # a result larger than one read


def test_the_compiled_path_is_built() -> None:
    """Without it every query takes the slower Python path: the build must not skip it."""
    from tiproxy.net import _hotpath, relay  # noqa: PLC0415 - the point of the test

    assert relay._fast_command is _hotpath.command
    assert relay._fast_response is _hotpath.response


def _prepare_tables(server: MariaDBServer, names: tuple[str, ...]) -> None:
    for name in names:
        server.sql(
            f"DROP TABLE IF EXISTS test.{name}; "
            f"CREATE TABLE test.{name} (id INT PRIMARY KEY, v VARCHAR(40), n DOUBLE); "
            f"INSERT INTO test.{name} SELECT seq, CONCAT('row ', seq), seq / 7 "
            f"FROM seq_1_to_{ROWS}; "
            f"DROP PROCEDURE IF EXISTS test.{name}_two;\n"
            "DELIMITER //\n"
            f"CREATE PROCEDURE test.{name}_two() "
            f"BEGIN SELECT COUNT(*) FROM test.{name}; SELECT MAX(v) FROM test.{name}; END//\n"
            "DELIMITER ;\n",
            database="test",
        )


def _text(proxy: ProxyProcess, table: str, direct: list[bool]) -> list[Any]:
    """Says in `direct` whether its session was read directly after its first selects (as
    _connector_prepared does: mysql-connector resets each statement before it executes it,
    and COM_STMT_RESET is compiled too. Connector/Python's binary cursors do not get there.)"""
    got: list[Any] = []
    conn = pymysql.connect(host="127.0.0.1", port=proxy.port, user=APP.name, password=APP.password,
                           database="test", client_flag=pymysql.constants.CLIENT.MULTI_STATEMENTS)
    with conn, conn.cursor() as cur:
        for i in range(1, EXECUTES):
            cur.execute(f"SELECT id, v, n FROM {table} WHERE id = %s", (i,))
            got.append(cur.fetchall())
        direct.append(proxy.session(conn.thread_id())["direct"])
        cur.execute(f"UPDATE {table} SET v = 'changed' WHERE id = 1")
        got.append(cur.rowcount)
        cur.execute(f"SELECT id, v FROM {table} ORDER BY id")  # several reads' worth
        got.append(len(cur.fetchall()))
        with pytest.raises(pymysql.err.ProgrammingError) as missing:
            cur.execute(f"SELECT * FROM {table}_missing")
        got.append(missing.value.args[0])
        cur.execute(f"SELECT 1; SELECT v FROM {table} WHERE id = 2")
        got.append(cur.fetchall())
        cur.nextset()
        got.append(cur.fetchall())
        cur.execute(f"CALL {table}_two()")
        got.append(cur.fetchall())
        cur.nextset()
        got.append(cur.fetchall())
        cur.execute("SET @marker = 5")
        cur.execute("SELECT @marker")
        got.append(cur.fetchall())
        conn.ping(reconnect=False)
        cur.execute(f"SELECT v FROM {table} WHERE id = 1")
        got.append(cur.fetchall())
    return got


def _connector_prepared(proxy: ProxyProcess, table: str, direct: list[bool]) -> list[Any]:
    got: list[Any] = []
    conn = mysql.connector.connect(host="127.0.0.1", port=proxy.port, user=APP.name,
                                   password=APP.password, database="test", use_pure=True)
    try:
        cur = conn.cursor(prepared=True)
        # One string: the cursor prepares again for another object, and for the same one
        # sends COM_STMT_RESET before each execute.
        select = f"SELECT id, v, n FROM {table} WHERE id = %s"
        for i in range(EXECUTES):
            cur.execute(select, (i + 10,))
            got.append(cur.fetchall())
        direct.append(proxy.session(conn.connection_id)["direct"])
        for i in range(3):
            cur.execute(f"UPDATE {table} SET n = %s WHERE id = %s", (i * 1.5, i + 20))
            got.append(cur.rowcount)
        conn.commit()
    finally:
        conn.close()
    return got


def _mariadb_prepared(proxy: ProxyProcess, table: str, direct: list[bool]) -> list[Any]:
    """MariaDB Connector/C underneath: cached metadata, as sysbench's own executes."""
    got: list[Any] = []
    conn = mariadb.connect(host="127.0.0.1", port=proxy.port, user=APP.name, password=APP.password,
                           database="test")
    try:
        # Binary cursors (Connector/C's execute_direct); one per statement: Connector/Python
        # 1.1 crashes (SIGSEGV, without the proxy too) when a prepared cursor that read a
        # result is given another statement.
        with conn.cursor(prepared=True, binary=True) as cur:
            for i in range(EXECUTES):
                cur.execute(f"SELECT id, v, n FROM {table} WHERE id BETWEEN ? AND ?",
                            (i, i + 2))
                got.append(cur.fetchall())
        with conn.cursor(binary=True) as cur:
            cur.execute(f"SELECT id FROM {table} WHERE id < ?", (2000,))  # several reads
            got.append(len(cur.fetchall()))
        with conn.cursor(binary=True) as cur, pytest.raises(mariadb.Error) as missing:
            cur.execute(f"SELECT id FROM {table}_missing WHERE id = ?", (1,))
        got.append(missing.value.errno)
        conn.commit()
    finally:
        conn.close()
    return got


WORKLOADS: tuple[Callable[[ProxyProcess, str, list[bool]], list[Any]], ...] = (
    _text, _connector_prepared, _mariadb_prepared)

# What each proxy counted, by series: commands by type, their durations' count, traffic.
SERIES = ("tiproxy_session_query_total", "tiproxy_session_query_duration_seconds_count",
          "tiproxy_traffic_inbound_bytes", "tiproxy_traffic_inbound_packets",
          "tiproxy_traffic_outbound_bytes", "tiproxy_traffic_outbound_packets",
          "tiproxy_session_query_time_since_conn_creation_seconds_count")


def _counted(now: Scrape) -> dict[tuple[str, str], float]:
    counted: dict[tuple[str, str], float] = {}
    for name in SERIES:
        for labels, value in now.find(name):
            counted[(name, labels.get("cmd_type", ""))] = value
    return counted


def _settled(proxy: ProxyProcess) -> dict[tuple[str, str], float]:
    """The counts once they stop changing (workers report theirs once a second)."""
    proxy.wait_sessions(0)
    last = _counted(scrape(proxy))
    deadline = time.monotonic() + 10
    while True:
        time.sleep(1.2)
        now = _counted(scrape(proxy))
        if now == last or time.monotonic() > deadline:
            return now
        last = now


def test_the_same_answers_and_counts_with_and_without_the_compiled_path(
        backends: list[MariaDBServer], proxy_factory: ProxyFactory) -> None:
    server = backends[0]
    # Two tables whose names are as long as each other: the same statements in bytes
    tables = {"on": "hp_on", "loop": "hp_lp", "off": "hp_no"}
    _prepare_tables(server, tuple(tables.values()))
    proxies = {"on": proxy_factory([server.addr]),
               "loop": proxy_factory([server.addr], env=LOOP),
               "off": proxy_factory([server.addr], env=OFF)}
    proxies["off"].wait_log("compiled relay path off")
    proxies["loop"].wait_log("direct relay off")
    assert "relay path off" not in proxies["on"].log()
    assert "direct relay off" not in proxies["on"].log()
    direct: dict[str, list[bool]] = {side: [] for side in proxies}
    answers = {side: [work(proxies[side], tables[side], direct[side]) for work in WORKLOADS]
               for side in proxies}
    # the first proxy's compiled path read that session straight from its sockets
    assert direct == {"on": [True, True], "loop": [False, False], "off": [False, False]}
    assert answers["on"] == answers["off"]
    assert answers["loop"] == answers["off"]
    counted = {side: _settled(proxy) for side, proxy in proxies.items()}
    assert counted["on"] == counted["off"]
    assert counted["loop"] == counted["off"]
    # and what they counted is what was sent: Connector/Python's executes (the loop, the
    # large result, the missing table's: execute_direct sends it behind its prepare) and
    # mysql-connector's (the loop, the updates)
    executes = counted["on"][("tiproxy_session_query_total", "StmtExecute")]
    assert executes == (EXECUTES + 2) + (EXECUTES + 3), counted["on"]
