"""A rolling restart of a 3-node Galera cluster under load: through the proxy no client notices.

The acceptance test of connection migration. Eight clients (support/workload.py) hold session
state and run write transactions and reads without pause. Each Galera node in turn is drained
through the proxy's API (its sessions move to the other nodes at their next safe point), stopped,
started again (it rejoins and is Synced), and undrained; the workload runs on between
nodes. Through the proxy every client must see no error, no lost state and no lost row, on the
one connection it opened, and must make progress in every phase.

The same workload behind HAProxy (TCP mode, leastconn, plain `check`) during the same restarts,
without a drain (HAProxy has none), is the contrast: its clients reconnect when their connection
dies, as an application's pool would, and lose their session state each time. Its figures are
reported beside the proxy's (printed, with -s, and as the `rolling_restart` property), never
asserted to be zero; that test fails only if it could not run.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymysql
import pytest

from support.backends import ADMIN_TOML, APP
from support.galera_runs import (
    check_rows,
    connections,
    log_about,
    log_tail,
    migrations,
    sessions,
)
from support.haproxy import HAProxyProcess
from support.proxy import ProxyFactory, ProxyProcess
from support.workload import Workload
from tiproxy.playground.galera import GaleraCluster

pytestmark = pytest.mark.integration

CLIENTS = 8
READ_TIMEOUT = 30  # seconds: a client stuck behind a node that hangs fails instead of hanging
PHASE_MIN = 1.0  # seconds every phase lasts at least, so that every client can show progress
SETTLE = 2.0  # seconds the workload runs between two nodes and before the first
DRAIN_TIMEOUT = 20.0


@dataclass
class Phase:
    name: str
    seconds: float
    progress: list[int]  # commits per client during the phase


@dataclass
class Run:
    """One rolling restart: its phases, in order."""

    workload: Workload
    phases: list[Phase] = field(default_factory=list)
    _mark: list[int] = field(default_factory=list)
    _since: float = 0.0

    def begin(self) -> None:
        self._mark, self._since = self.workload.commits(), time.monotonic()

    def end(self, name: str) -> None:
        elapsed = time.monotonic() - self._since
        if elapsed < PHASE_MIN:
            time.sleep(PHASE_MIN - elapsed)
        now = self.workload.commits()
        self.phases.append(Phase(name, time.monotonic() - self._since,
                                 [b - a for a, b in zip(self._mark, now, strict=True)]))
        self.begin()

    def stalled(self) -> list[str]:
        """The phases in which some client committed nothing."""
        return [f"{p.name} ({p.seconds:.1f}s): {p.progress}" for p in self.phases
                if min(p.progress) == 0]

    def describe(self) -> str:
        return "; ".join(f"{p.name} {p.seconds:.1f}s +{sum(p.progress)}" for p in self.phases)


def rolling_restart(cluster: GaleraCluster, run: Run, *, take_out: Callable[[int], None],
                    put_back: Callable[[int], None],
                    stopping: Callable[[int], None] = lambda i: None) -> None:
    """Restart every node in turn while the workload runs, recording each phase; `stopping`
    is called right before each stop."""
    time.sleep(SETTLE)
    run.end("warm-up")
    for i in range(cluster.size):
        take_out(i)
        run.end(f"node{i} taken out")
        stopping(i)
        cluster.stop_node(i)
        cluster.start_node(i)
        run.end(f"node{i} stopped+rejoined")
        put_back(i)
        time.sleep(SETTLE)
        run.end(f"node{i} back")


class ProxyDrain:
    """Takes a node out through the proxy's API (drain, wait for its last session to leave)
    and puts it back (undrain)."""

    def __init__(self, proxy: ProxyProcess, cluster: GaleraCluster) -> None:
        self.proxy, self.addrs = proxy, cluster.addrs
        self.seconds: list[float] = []  # how long each drain took

    def take_out(self, i: int) -> None:
        addr, asked = self.addrs[i], time.monotonic()
        self._post(addr, "drain")
        while (left := connections(self.proxy, addr)) > 0:
            assert time.monotonic() < asked + DRAIN_TIMEOUT, (
                f"{left} sessions still on {addr} after {DRAIN_TIMEOUT}s: "
                f"{json.dumps(sessions(self.proxy, addr))}\n{log_tail(self.proxy)}")
            time.sleep(0.02)
        self.seconds.append(time.monotonic() - asked)

    def put_back(self, i: int) -> None:
        self._post(self.addrs[i], "undrain")

    def _post(self, addr: str, action: str) -> None:
        status, body = self.proxy.api(f"/api/admin/backends/{addr}/{action}", method="POST",
                                      body=b"")
        assert status == 200, body


def assert_unnoticed(workload: Workload, first_ids: list[int], proxy: ProxyProcess,
                     context: str) -> None:
    """No client saw an error or lost anything, each on the one session it opened."""
    figures = workload.figures()
    assert not any(c.broken for c in workload.clients), context
    assert (figures.errors, figures.lost_state, figures.row_mismatches) == (0, 0, 0), context
    assert (figures.reconnects, figures.unknown_commits) == (0, 0), context
    for client, first in zip(workload.clients, first_ids, strict=True):
        assert client.conn is not None and client.conn.open, client.table
        assert client.thread_ids == [first] == [client.conn.thread_id()], client.table
    assert sorted(s["id"] for s in sessions(proxy)) == sorted(first_ids)
    # every session moved at least once, as each node was drained in turn
    assert all(len(c.ports) >= 2 for c in workload.clients), [c.ports for c in workload.clients]


def test_rolling_restart_through_the_proxy(
    workload_cluster: GaleraCluster, proxy_factory: ProxyFactory, side_by_side: dict[str, str],
    record_property: Callable[[str, object], None],
) -> None:
    cluster, report = workload_cluster, side_by_side
    started = time.monotonic()
    proxy = proxy_factory(cluster.addrs, ADMIN_TOML)
    workload = Workload(lambda: proxy.connect(autocommit=True, read_timeout=READ_TIMEOUT,
                                              write_timeout=READ_TIMEOUT), "proxy", CLIENTS)
    run, drain = Run(workload), ProxyDrain(proxy, cluster)
    try:
        try:
            workload.start()
            first_ids = [c.thread_ids[0] for c in workload.clients]
            run.begin()
            rolling_restart(cluster, run, take_out=drain.take_out, put_back=drain.put_back)
        finally:
            workload.stop()
        moves = migrations(proxy)
        line = (f"{workload.figures().summary()} moves={moves['succeed']} "
                f"failed_moves={moves['fail']} "
                f"drains={'/'.join(f'{d:.2f}' for d in drain.seconds)}s "
                f"({time.monotonic() - started:.0f}s)")
        report["proxy"] = line
        record_property("rolling_restart", f"proxy {line}")
        print(f"\nproxy: {line}\nphases: {run.describe()}")
        problems = "\n".join(workload.problems()[:40])
        context = f"{line}\n{problems}\n{log_about(proxy, workload)}"
        assert_unnoticed(workload, first_ids, proxy, context)
        assert not run.stalled(), f"no progress: {run.stalled()}"
        assert check_rows(cluster, workload) == {}
    finally:
        workload.close()


def test_rolling_restart_through_haproxy(
    workload_cluster: GaleraCluster, tmp_path: Path, side_by_side: dict[str, str],
    record_property: Callable[[str, object], None],
) -> None:
    """The contrast: errors and lost state are counted and reported, not asserted away."""
    cluster, report = workload_cluster, side_by_side
    started = time.monotonic()
    haproxy = HAProxyProcess(tmp_path, cluster.addrs, check=True).start()

    def log_in() -> pymysql.connections.Connection[Any]:
        return pymysql.connect(host="127.0.0.1", port=haproxy.port, user=APP.name,
                               password=APP.password, database=APP.database, autocommit=True,
                               connect_timeout=5, read_timeout=READ_TIMEOUT,
                               write_timeout=READ_TIMEOUT)

    workload = Workload(log_in, "haproxy", CLIENTS, reconnect=True)
    run = Run(workload)
    try:
        try:
            workload.start()
            run.begin()
            rolling_restart(cluster, run, take_out=lambda i: None, put_back=lambda i: None)
        finally:
            workload.stop()
        figures = workload.figures()
        wrong_rows = check_rows(cluster, workload)
        seconds = time.monotonic() - started
        wrong = sum(sum(pair) for tables in wrong_rows.values() for pair in tables.values())
        line = f"{figures.summary()} wrong_rows={wrong} ({seconds:.0f}s)"
        report["haproxy"] = line
        record_property("rolling_restart", f"haproxy {line}")
        kinds = ", ".join(f"{k} x{n}" for k, n in figures.error_kinds.most_common())
        print(f"\nhaproxy: {line}\nphases: {run.describe()}\nerrors: {kinds}")
        # It must have run: every client worked, and none gave up or hit a bug of the workload.
        assert all(n > 0 for n in workload.commits()), workload.commits()
        assert not any(c.broken for c in workload.clients), workload.problems()
    finally:
        workload.close()
        haproxy.stop()


def test_rolling_restart_by_stop_and_start_only(
    workload_cluster: GaleraCluster, proxy_factory: ProxyFactory, side_by_side: dict[str, str],
    record_property: Callable[[str, object], None],
) -> None:
    """No drain, no config change: the proxy must notice each node leaving by its health
    checks. A session whose node stops under it loses its connection (TiProxy's behaviour: one
    error, the client reconnects); every other session goes on, and nothing acknowledged is lost.
    The figures are reported; the errors are bounded by the sessions the stopped nodes held."""
    cluster, report = workload_cluster, side_by_side
    started = time.monotonic()
    health = '\n[health]\ninterval = "0.5s"\ntimeout = "1s"\nfailure-threshold = 2'
    proxy = proxy_factory(cluster.addrs, health + ADMIN_TOML)
    workload = Workload(lambda: proxy.connect(autocommit=True, read_timeout=READ_TIMEOUT,
                                              write_timeout=READ_TIMEOUT),
                        "stopstart", CLIENTS, reconnect=True)
    run = Run(workload)
    # Sessions on each node from right before it was stopped until the proxy took it out of
    # service, at most: the rebalancer may still move one there while the node shuts down.
    held: list[int] = []
    errors_before: list[int] = []  # the clients' errors so far, at each stop
    samplers: list[threading.Thread] = []

    def note(i: int) -> None:
        errors_before.append(workload.figures().errors)
        held.append(connections(proxy, cluster.addrs[i]))

        def sample() -> None:
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while time.monotonic() < deadline:
                backend = {b["addr"]: b for b in proxy.backends()}[cluster.addrs[i]]
                if backend["status"] != "healthy":
                    return
                held[i] = max(held[i], int(backend["connections"]))
                time.sleep(0.05)

        samplers.append(threading.Thread(target=sample, daemon=True))
        samplers[-1].start()

    def readmitted(i: int) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while {b["addr"]: b["status"] for b in proxy.backends()}[cluster.addrs[i]] != "healthy":
            assert time.monotonic() < deadline, proxy.backends()
            time.sleep(0.05)

    try:
        try:
            workload.start()
            run.begin()
            rolling_restart(cluster, run, take_out=note, put_back=readmitted)
        finally:
            workload.stop()
            for sampler in samplers:
                sampler.join()
        figures = workload.figures()
        noticed = sum(f"backend {a} unhealthy" in proxy.log() for a in cluster.addrs)
        errors_by_stop = [b - a for a, b in zip(errors_before, [*errors_before[1:], figures.errors],
                                                strict=True)]
        line = (f"{figures.summary()} sessions_on_stopped_nodes={'/'.join(map(str, held))} "
                f"errors_by_stop={'/'.join(map(str, errors_by_stop))} "
                f"noticed_by_health={noticed}/3 ({time.monotonic() - started:.0f}s)")
        report["proxy_stop_start"] = line
        record_property("rolling_restart", f"proxy stop/start only {line}")
        kinds = ", ".join(f"{k} x{n}" for k, n in figures.error_kinds.most_common())
        print(f"\nproxy, stop/start only: {line}\nerrors: {kinds}")
        assert noticed == 3, log_tail(proxy)
        # each session on a stopping node sees one error; a client that reconnects lands elsewhere
        assert all(e <= h for e, h in zip(errors_by_stop, held, strict=True)), line
        assert all(n > 0 for n in workload.commits()), workload.commits()
        assert check_rows(cluster, workload) == {}
    finally:
        workload.close()


