"""`[proxy] transaction-replay = true` (net/replay.py) against real MariaDB servers: a deadlock
victim's transaction is run again and the client never sees 1213, unless an answer would
differ; an open transaction whose backend is killed goes on on the other one; off, the errors
come through as they are.
"""

from __future__ import annotations

import time
from typing import Any

import pymysql
import pytest

from support.backends import ADMIN_TOML, BACKEND_ARGS, BACKEND_USERS, MariaDBFactory
from support.proxy import ProxyFactory, ProxyProcess
from support.sleeper import StatementThread
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

ER_LOCK_DEADLOCK = 1213
REPLAY = "transaction-replay = true"


@pytest.fixture
def pair(mariadb_factory: MariaDBFactory) -> list[MariaDBServer]:
    servers = [mariadb_factory(BACKEND_ARGS, BACKEND_USERS) for _ in range(2)]
    for server in servers:
        server.sql("CREATE DATABASE rp; CREATE TABLE rp.t (id INT PRIMARY KEY, v INT);\n"
                   "INSERT INTO rp.t VALUES (1, 0), (2, 0);\nGRANT ALL ON rp.* TO app;")
    return servers


def _waiting_for_lock(server: MariaDBServer, count: int) -> None:
    deadline = time.monotonic() + 10
    while int(server.sql("SELECT COUNT(*) FROM information_schema.INNODB_TRX "
                         "WHERE trx_state = 'LOCK WAIT'").strip()) < count:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _deadlock(proxy: ProxyProcess, server: MariaDBServer, before: str = "") -> tuple[Any, Any]:
    """Two sessions on `server` about to deadlock, `b` being the victim InnoDB will choose (it
    changed fewer rows): `a` holds rows 1 and 3-6 and waits for row 2 (in `a.blocked`), `b`
    holds row 2 (after running `before`). Returns (a, b); b's UPDATE of row 1 closes the cycle."""
    # Rows enough that InnoDB reads the ones named by their key (a full scan would lock them
    # all, in REPEATABLE READ).
    server.sql("DELETE FROM rp.t; INSERT INTO rp.t SELECT seq, 0 FROM rp.seq_1_to_1000")
    a, b = (proxy.connect(database="rp", autocommit=True) for _ in range(2))
    with a.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute("UPDATE t SET v = v + 1 WHERE id IN (1, 3, 4, 5, 6)")
    with b.cursor() as cur:
        cur.execute("BEGIN")
        if before:
            cur.execute(before)
            cur.fetchall()
        cur.execute("UPDATE t SET v = v + 10 WHERE id = 2")
    a.blocked = StatementThread(a, "UPDATE t SET v = v + 1 WHERE id = 2")
    _waiting_for_lock(server, 1)
    return a, b


def test_a_deadlock_victim_is_replayed_and_never_sees_1213(
        pair: list[MariaDBServer], proxy_factory: ProxyFactory) -> None:
    server = pair[0]
    proxy = proxy_factory([server.addr], REPLAY)
    a, b = _deadlock(proxy, server)
    victim = StatementThread(b, "UPDATE t SET v = v + 10 WHERE id = 1")
    a.blocked.join(20)  # b was rolled back: a got row 2
    assert a.blocked.error is None, a.blocked.error
    assert victim.is_alive()  # b's replay waits for a's locks
    with a.cursor() as cur:
        cur.execute("COMMIT")
    victim.join(20)
    assert victim.error is None, victim.error  # no 1213: its transaction was run again
    with b.cursor() as cur:
        cur.execute("COMMIT")
        cur.execute("SELECT id, v FROM t WHERE id <= 2 ORDER BY id")
        assert cur.fetchall() == ((1, 11), (2, 11))  # both transactions, each once
    proxy.wait_log("transaction replayed after deadlock")  # a worker's line comes by its link
    _, metrics = proxy.api("/metrics")
    assert b'tiproxy_session_transaction_replay_total{reason="deadlock",replay_res="succeed"} 1' \
        in metrics
    a.close()
    b.close()


def test_a_replay_whose_answers_differ_gives_the_original_error(
        pair: list[MariaDBServer], proxy_factory: ProxyFactory) -> None:
    """b read row 7; another client changed it before the deadlock: run again, the read would
    answer otherwise, so b gets the deadlock error it would have had."""
    server = pair[0]
    proxy = proxy_factory([server.addr], REPLAY)
    a, b = _deadlock(proxy, server, before="SELECT v FROM t WHERE id = 7")
    with proxy.connect(database="rp", autocommit=True) as other, other.cursor() as cur:
        cur.execute("UPDATE t SET v = 99 WHERE id = 7")  # autocommit
    with b.cursor() as cur, pytest.raises(pymysql.err.OperationalError) as info:
        cur.execute("UPDATE t SET v = v + 10 WHERE id = 1")
    assert info.value.args[0] == ER_LOCK_DEADLOCK
    a.blocked.join(20)
    assert a.blocked.error is None
    with b.cursor() as cur:  # rolled back, as MariaDB left it
        cur.execute("SELECT @@in_transaction, v FROM t WHERE id = 2")
        assert cur.fetchone() == (0, 0)
    proxy.wait_log("transaction not replayed after deadlock: the answer to a SELECT is not the "
                   "one the client got")
    a.close()
    b.close()


def test_without_replay_the_deadlock_comes_through(
        pair: list[MariaDBServer], proxy_factory: ProxyFactory) -> None:
    server = pair[0]
    proxy = proxy_factory([server.addr])
    a, b = _deadlock(proxy, server)
    with b.cursor() as cur, pytest.raises(pymysql.err.OperationalError) as info:
        cur.execute("UPDATE t SET v = v + 10 WHERE id = 1")
    assert info.value.args[0] == ER_LOCK_DEADLOCK
    a.blocked.join(20)
    assert a.blocked.error is None
    a.close()
    b.close()


def test_an_open_transaction_goes_on_after_its_backend_is_killed(
        pair: list[MariaDBServer], proxy_factory: ProxyFactory) -> None:
    doomed, survivor = pair
    proxy = proxy_factory([s.addr for s in pair], f"{REPLAY}{ADMIN_TOML}")
    sessions: list[Any] = []
    on_doomed = []
    while len(on_doomed) < 2:  # least connections alternates: a few more than two at most
        assert len(sessions) < 20
        conn = proxy.connect(database="rp", autocommit=True)
        sessions.append(conn)
        with conn.cursor() as cur:
            cur.execute("SELECT @@port")
            if cur.fetchone()[0] == doomed.port:
                on_doomed.append(conn)
    idle, busy = on_doomed
    for n, conn in enumerate((idle, busy)):
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute(f"INSERT INTO t VALUES ({10 + n}, {n})")
            cur.execute("SELECT COUNT(*) FROM t")
            assert cur.fetchone() == (3,)
    in_flight = StatementThread(busy, "UPDATE t SET v = v + SLEEP(2) WHERE id = 11")
    deadline = time.monotonic() + 10
    while "SLEEP(2)" not in doomed.sql("SHOW PROCESSLIST"):
        assert time.monotonic() < deadline
        time.sleep(0.02)

    doomed.kill()

    in_flight.join(30)
    assert in_flight.error is None, in_flight.error  # replayed there, then run
    for n, conn in enumerate((idle, busy)):
        with conn.cursor() as cur:
            cur.execute("SELECT @@port, @@in_transaction")
            assert cur.fetchone() == (survivor.port, 1)  # the same transaction, on the survivor
            cur.execute(f"SELECT v FROM t WHERE id = {10 + n}")
            assert cur.fetchone() == (n,)
            cur.execute("COMMIT")
    assert survivor.sql("SELECT id, v FROM rp.t WHERE id >= 10 ORDER BY id").split() == \
        ["10", "0", "11", "1"]
    assert proxy.log().count("transaction replayed after backend lost") == 2
    for conn in sessions:
        conn.close()
