"""`[proxy] workers = 2`: one proxy seen from outside, whichever worker holds a session.

A session's worker is known from its id (worker i hands out ids i+1 modulo the worker count),
so each test checks that its sessions really are spread over both workers before it relies on
that. The rest of the suite runs in this mode too when .ci/run sets TIPROXY_TEST_WORKERS=2.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pymysql
import pytest

from support.backends import ADMIN_TOML
from support.proxy import ProxyFactory, ProxyProcess
from support.sleeper import SleepingQuery
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

WORKERS_TOML = "workers = 2"


def _worker_of(conn: pymysql.connections.Connection[Any]) -> int:
    return (conn.thread_id() - 1) % 2


def _spread(proxy: ProxyProcess, n: int) -> list[pymysql.connections.Connection[Any]]:
    """At least `n` sessions, with sessions on both workers (the kernel picks the worker by the
    connection's ports, so a few more may be needed)."""
    conns = [proxy.connect() for _ in range(n)]
    while len({_worker_of(c) for c in conns}) < 2:
        assert len(conns) < n + 40, "every session landed on one worker"
        conns.append(proxy.connect())
    return conns


def _workers(proxy: ProxyProcess) -> list[int]:
    assert proxy.proc is not None
    children = Path(f"/proc/{proxy.proc.pid}/task/{proxy.proc.pid}/children").read_text().split()
    return [int(p) for p in children
            if "tiproxy.workers.worker" in Path(f"/proc/{p}/cmdline").read_text()]


def _pid_of_index(proxy: ProxyProcess, index: int) -> int:
    started = re.findall(rf"\[worker {index}\] started \(pid (\d+)\)", proxy.log())
    assert started, proxy.log()
    return int(started[-1])


def _metric(proxy: ProxyProcess, name: str) -> float:
    _, body = proxy.api("/metrics")
    match = re.search(rf"^{re.escape(name)} (\S+)$", body.decode(), re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_sessions_and_counts_are_summed_over_workers(
        backends: list[MariaDBServer], proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory([b.addr for b in backends], WORKERS_TOML)
    assert len(_workers(proxy)) == 2
    conns = _spread(proxy, 10)
    for conn in conns:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
    ids = sorted(c.thread_id() for c in conns)
    assert len(set(ids)) == len(ids)  # unique across workers
    assert sorted(s["id"] for s in proxy.sessions()) == ids
    assert sum(b["connections"] for b in proxy.backends()) == len(conns)
    assert _metric(proxy, "tiproxy_server_connections") == len(conns)
    time.sleep(1.5)  # query counters come with the workers' once-a-second stats
    _, body = proxy.api("/metrics")
    queries = sum(float(v) for v in re.findall(
        r'^tiproxy_session_query_total\{[^}]*cmd_type="Query"[^}]*\} (\S+)$', body.decode(),
        re.MULTILINE))
    assert queries >= len(conns)  # each ran a SELECT 1, whichever worker holds it
    for conn in conns:
        conn.close()
    deadline = time.monotonic() + 5
    while proxy.sessions() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proxy.sessions() == []
    assert _metric(proxy, "tiproxy_server_connections") == 0


def test_hundred_sessions_spread_evenly_whichever_worker_took_them(
        backends: list[MariaDBServer], proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory([b.addr for b in backends[:2]], WORKERS_TOML)
    conns = [proxy.connect() for _ in range(100)]
    per_worker = Counter(_worker_of(c) for c in conns)
    assert len(per_worker) == 2, per_worker
    ports: Counter[int] = Counter()
    for conn in conns:
        with conn.cursor() as cur:
            cur.execute("SELECT @@port")
            ports[cur.fetchone()[0]] += 1
    assert sorted(ports.values()) == [50, 50], (ports, per_worker)
    assert sorted(b["connections"] for b in proxy.backends()) == [50, 50]
    for conn in conns:
        conn.close()


def test_a_few_sessions_are_spread_evenly_too(
        backends: list[MariaDBServer], proxy_factory: ProxyFactory) -> None:
    """The kernel's hash puts four connections two and two only 3 times in 8; a worker that
    accepts one while the other holds fewer sessions passes it over (workers/handoff.py)."""
    proxy = proxy_factory([backends[0].addr], WORKERS_TOML)
    for worker in (0, 1):  # the port answers once the control process listens; a worker that
        proxy.wait_log(f"[worker {worker}] started", timeout=20)  # is still starting is not chosen
    for _ in range(5):
        conns = []
        for i in range(5):
            conns.append(proxy.connect())
            per_worker = Counter(_worker_of(c) for c in conns)
            assert max(per_worker.values()) - min(per_worker.get(w, 0) for w in (0, 1)) <= 1, \
                (i, per_worker)
        for conn in conns:  # and they work where they went
            with conn.cursor() as cur:
                cur.execute("SELECT 'served'")
                assert cur.fetchall() == (("served",),)
            conn.close()
        proxy.wait_sessions(0)
    assert "Traceback" not in proxy.log()


def test_new_connections_go_to_the_other_worker_while_one_is_down(
        backends: list[MariaDBServer], proxy_factory: ProxyFactory) -> None:
    """The kernel keeps putting some new connections in a dead worker's queue until it is
    started again; the control process takes them from there and passes them on (Cover in
    workers/handoff.py), so none waits for the restart."""
    proxy = proxy_factory([backends[0].addr], WORKERS_TOML)

    def starts() -> int:
        return proxy.log().count("[worker 0] started")

    proxy.wait_log("[worker 0] started", timeout=20)
    for deaths in (1, 2):  # a second death in a row: started again only after 2 s
        os.kill(_pid_of_index(proxy, 0), signal.SIGKILL)
        deadline = time.monotonic() + 20
        while proxy.log().count("worker 0 (pid") < deaths:
            assert time.monotonic() < deadline, proxy.log()[-2000:]
            time.sleep(0.01)
        if deaths == 1:
            deadline = time.monotonic() + 20
            while starts() < 2:
                assert time.monotonic() < deadline, proxy.log()[-2000:]
                time.sleep(0.01)
    down, conns = starts(), []
    while len(conns) < 16:
        conn = proxy.connect()
        if starts() != down:  # back already: this one may have waited for it
            conn.close()
            break
        conns.append(conn)
    # The kernel puts a new connection in worker 0's queue one time in two: without Cover the
    # first of those would wait there for the restart, and end the loop early. (And with 12 or
    # more, all of them going to worker 1's queue by chance, passing none, is 1 in 4,096.)
    assert len(conns) >= 12, (len(conns), proxy.log()[-2000:])
    assert {_worker_of(c) for c in conns} == {1}
    for conn in conns:
        with conn.cursor() as cur:
            cur.execute("SELECT 'served'")
            assert cur.fetchall() == (("served",),)
        conn.close()
    proxy.wait_log("new connections went to other workers while worker 0 was down", timeout=10)
    proxy.wait_sessions(0)
    fresh = _spread(proxy, 2)  # and worker 0 serves again
    assert {_worker_of(c) for c in fresh} == {0, 1}
    for conn in fresh:
        conn.close()
    assert "Traceback" not in proxy.log()


def test_max_connections_is_global(backends: list[MariaDBServer],
                                   proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory([backends[0].addr], f"{WORKERS_TOML}\nmax-connections = 4")
    held = [proxy.connect() for _ in range(4)]
    for _ in range(40):  # the four on both workers: the limit is not per worker
        if len({_worker_of(c) for c in held}) == 2:
            break
        held.pop().close()
        proxy.wait_sessions(len(held))
        held.append(proxy.connect())
    assert len({_worker_of(c) for c in held}) == 2
    for _ in range(6):  # whichever worker the kernel hands each one to
        with pytest.raises(pymysql.err.OperationalError) as info:
            proxy.connect()
        assert info.value.args[0] == 1040
    held.pop().close()
    proxy.wait_sessions(len(held))
    proxy.connect().close()  # room again, on either worker
    for conn in held:
        conn.close()


def test_kill_finds_the_session_on_another_worker(
        backends: list[MariaDBServer], proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory([b.addr for b in backends], f"{WORKERS_TOML}{ADMIN_TOML}")
    conns = _spread(proxy, 4)
    killer = conns[0]
    victims = [c for c in conns if _worker_of(c) != _worker_of(killer)]
    # One victim on the killer's backend (the KILL is rewritten there) if there is one, and
    # one on another backend (killed there as the killer's user): both across workers.
    for victim in victims[:2]:
        sleeping = SleepingQuery(victim)
        with killer.cursor() as cur:
            cur.execute(f"KILL QUERY {victim.thread_id()}")
        assert sleeping.wait(), "KILL QUERY did not reach the session on the other worker"
        assert sleeping.codes == [1317]  # Query execution was interrupted
        with victim.cursor() as cur:  # KILL QUERY leaves the session alive
            cur.execute("SELECT 'alive'")
            assert cur.fetchall() == (("alive",),)
        with killer.cursor() as cur:
            cur.execute(f"KILL {victim.thread_id()}")
        time.sleep(0.3)
        with pytest.raises(pymysql.err.OperationalError), victim.cursor() as cur:
            cur.execute("SELECT 1")
    with killer.cursor() as cur, pytest.raises(pymysql.err.OperationalError) as info:
        cur.execute("KILL 999998")  # nobody's: the owner worker says so
    assert info.value.args[0] == 1094
    for conn in conns:
        conn.close()


def test_a_killed_worker_loses_only_its_sessions_and_comes_back(
        backends: list[MariaDBServer], proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory([b.addr for b in backends], WORKERS_TOML)
    conns = _spread(proxy, 6)
    pids = _workers(proxy)
    assert len(pids) == 2
    owner = {c.thread_id(): _worker_of(c) for c in conns}
    doomed_index = 0  # its sessions have odd ids
    doomed_pid = _pid_of_index(proxy, doomed_index)
    assert doomed_pid in pids
    os.kill(doomed_pid, signal.SIGKILL)
    time.sleep(0.5)
    for conn in conns:
        if owner[conn.thread_id()] == doomed_index:
            with pytest.raises(pymysql.err.OperationalError), conn.cursor() as cur:
                cur.execute("SELECT 1")
        else:
            with conn.cursor() as cur:
                cur.execute("SELECT 'still here'")
                assert cur.fetchall() == (("still here",),)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = _workers(proxy)
        if len(now) == 2 and doomed_pid not in now:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the worker did not come back: {_workers(proxy)}")
    assert "worker 0" in proxy.log() and "exited with signal 9" in proxy.log()
    assert re.search(r'tiproxy_server_err\{type="worker_died"\} 1\.0',
                     proxy.api("/metrics")[1].decode())
    fresh = _spread(proxy, 4)  # both workers take sessions again
    assert len({_worker_of(c) for c in fresh}) == 2
    for conn in fresh + [c for c in conns if owner[c.thread_id()] != doomed_index]:
        conn.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_proxy_on_a_port_in_use_does_not_start(
        workers: int, backends: list[MariaDBServer], proxy_factory: ProxyFactory) -> None:
    """Two proxies must never share a port without a word: with workers the listening sockets
    are an SO_REUSEPORT group, which a second proxy of the same user could join, and the kernel
    would hand it half the new connections."""
    first = proxy_factory([backends[0].addr], f"workers = {workers}")
    with pytest.raises(RuntimeError, match="in use"):
        proxy_factory([backends[0].addr], f"workers = {workers}", port=first.port)
    assert first.alive  # and serves on
    conn = first.connect()
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    conn.close()
