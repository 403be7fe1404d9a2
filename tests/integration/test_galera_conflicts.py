"""A Galera write-conflict storm: clients update the same rows through different nodes, so
certification fails some of their transactions with a deadlock (1213). With
`transaction-replay` the proxy runs each such transaction again (net/replay.py) and the client
sees the error only when a replay could not match; without it every conflict comes through.
The rows' sums show that each acknowledged transaction counted once.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pymysql
import pytest

from support.backends import ADMIN_TOML
from support.proxy import ProxyFactory, ProxyProcess
from support.workload import DATABASE
from tiproxy.playground.galera import GaleraCluster

pytestmark = pytest.mark.integration

CLIENTS = 6
ROWS = 3  # few rows: the clients collide often
SECONDS = 6.0
ER_LOCK_DEADLOCK = 1213


class _Writer(threading.Thread):
    """BEGIN; two increments of random hot rows; COMMIT, until stopped; what it saw."""

    def __init__(self, conn: Any, seed: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.conn, self.stop = conn, stop
        self.rng = random.Random(seed)
        self.committed: Counter[int] = Counter()  # increments acknowledged, by row
        self.errors: Counter[int] = Counter()  # error codes seen
        self.start()

    def run(self) -> None:
        with self.conn.cursor() as cur:
            while not self.stop.is_set():
                rows = [self.rng.randint(1, ROWS) for _ in range(2)]
                try:
                    cur.execute("BEGIN")
                    for row in rows:
                        cur.execute("UPDATE hot SET v = v + 1 WHERE id = %s", (row,))
                    cur.execute("COMMIT")
                except pymysql.err.OperationalError as e:
                    self.errors[e.args[0]] += 1
                    cur.execute("ROLLBACK")
                else:
                    self.committed.update(rows)


def _storm(cluster: GaleraCluster, proxy: ProxyProcess) -> tuple[Counter[int], Counter[int]]:
    cluster.nodes[0].sql(f"CREATE TABLE IF NOT EXISTS {DATABASE}.hot (id INT PRIMARY KEY, v INT);"
                         f"DELETE FROM {DATABASE}.hot;"
                         f"INSERT INTO {DATABASE}.hot VALUES " +
                         ", ".join(f"({i}, 0)" for i in range(1, ROWS + 1)))
    conns = [proxy.connect(database=DATABASE, autocommit=True) for _ in range(CLIENTS)]
    ports = set()
    for conn in conns:
        with conn.cursor() as cur:
            cur.execute("SELECT @@port")
            ports.add(cur.fetchone()[0])
    assert len(ports) == len(cluster.nodes)  # writes through every node: they conflict
    stop = threading.Event()
    writers = [_Writer(conn, seed, stop) for seed, conn in enumerate(conns)]
    time.sleep(SECONDS)
    stop.set()
    for writer in writers:
        writer.join(30)
    committed: Counter[int] = Counter()
    errors: Counter[int] = Counter()
    for writer in writers:
        committed.update(writer.committed)
        errors.update(writer.errors)
    with conns[0].cursor() as cur:
        cur.execute("SET SESSION wsrep_sync_wait = 1")
        cur.execute("SELECT id, v FROM hot ORDER BY id")
        rows = dict(cur.fetchall())
    assert rows == {i: committed[i] for i in range(1, ROWS + 1)}  # each commit counted once
    for conn in conns:
        conn.close()
    return committed, errors


def _replays(proxy: ProxyProcess) -> tuple[int, int]:
    log = proxy.log()
    return (log.count("transaction replayed after deadlock"),
            log.count("transaction not replayed after deadlock"))


@pytest.mark.parametrize("replay", [False, True], ids=["plain", "transaction-replay"])
def test_a_write_conflict_storm(workload_cluster: GaleraCluster, proxy_factory: ProxyFactory,
                                side_by_side: dict[str, str],
                                record_property: Callable[[str, object], None],
                                replay: bool) -> None:
    proxy = proxy_factory(workload_cluster.addrs,
                          f"transaction-replay = {str(replay).lower()}{ADMIN_TOML}")
    committed, errors = _storm(workload_cluster, proxy)
    replayed, refused = _replays(proxy)
    line = (f"commits={sum(committed.values()) // 2} deadlocks_seen={errors[ER_LOCK_DEADLOCK]} "
            f"other_errors={sum(errors.values()) - errors[ER_LOCK_DEADLOCK]} "
            f"replayed={replayed} replays_refused={refused}")
    name = "replay" if replay else "plain"
    side_by_side[name] = line
    record_property("conflict_storm", f"{name} {line}")
    print(f"\n{name}: {line}")
    assert set(errors) <= {ER_LOCK_DEADLOCK}, errors
    if replay:
        assert replayed > 0, line  # the storm made conflicts, and replays carried them
        # A client sees a deadlock only where a replay could not match, or kept losing.
        assert errors[ER_LOCK_DEADLOCK] <= refused, line
    else:
        assert errors[ER_LOCK_DEADLOCK] > 0 and replayed == 0, line
