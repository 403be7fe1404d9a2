"""A Galera node killed with SIGKILL under the eight-client stateful workload (support/workload.py).

Through the proxy every client keeps the one session it opened: the sessions that were on the
killed node are rebuilt on the others with their state (the clients' checks compare it after
every transaction), and nothing acknowledged is lost. What a client may see is an error for a
statement whose backend died under it: without `transaction-replay`, the open transaction is
gone and its next statement says so; with it, the transaction is replayed on another node and
only a COMMIT whose outcome nobody can know may fail. Through HAProxy, the same kill is the
contrast: its clients reconnect and lose their session state; its figures are reported beside
the proxy's, never asserted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pymysql
import pytest

from support.backends import ADMIN_TOML, APP
from support.galera_runs import check_rows, connections, log_about
from support.haproxy import HAProxyProcess
from support.proxy import ProxyFactory
from support.workload import Workload
from tiproxy.playground.galera import GaleraCluster

pytestmark = pytest.mark.integration

CLIENTS = 8
READ_TIMEOUT = 30
SETTLE = 2.0  # seconds of workload before the kill
AFTER = 10.0  # and after it (Galera takes 5 s to leave a dead node out: evs.suspect_timeout)
LATE = 20.0  # at most this much longer, until every client has committed since the kill


def _kill_busiest(cluster: GaleraCluster, held: Callable[[str], int]) -> tuple[int, int]:
    """Kill the node holding the most sessions; (its index, its sessions)."""
    counts = [held(addr) for addr in cluster.addrs]
    victim = max(range(cluster.size), key=lambda i: counts[i])
    cluster.kill_node(victim)
    return victim, counts[victim]


@pytest.mark.parametrize("replay", [False, True], ids=["plain", "transaction-replay"])
def test_a_killed_node_through_the_proxy(
    workload_cluster: GaleraCluster, proxy_factory: ProxyFactory,
    side_by_side: dict[str, str], record_property: Callable[[str, object], None],
    replay: bool,
) -> None:
    cluster = workload_cluster
    proxy = proxy_factory(cluster.addrs, f"transaction-replay = {str(replay).lower()}"
                          f"{ADMIN_TOML}")
    workload = Workload(lambda: proxy.connect(autocommit=True, read_timeout=READ_TIMEOUT,
                                              write_timeout=READ_TIMEOUT), "kill", CLIENTS)
    try:
        try:
            workload.start()
            first_ids = [c.thread_ids[0] for c in workload.clients]
            time.sleep(SETTLE)
            before = workload.commits()
            _, held = _kill_busiest(cluster, lambda addr: connections(proxy, addr))
            time.sleep(AFTER)
            # On a loaded machine Galera's new view can take longer: the rebuilt sessions go on
            # once it is there (the assertion below says whether they did).
            deadline = time.monotonic() + LATE
            while time.monotonic() < deadline and not all(
                    b > a for a, b in zip(before, workload.commits(), strict=True)):
                time.sleep(0.2)
        finally:
            workload.stop()
        figures = workload.figures()
        line = f"{figures.summary()} sessions_on_killed_node={held}"
        name = "proxy_replay" if replay else "proxy"
        side_by_side[name] = line
        record_property("galera_kill", f"{name} {line}")
        kinds = ", ".join(f"{k} x{n}" for k, n in figures.error_kinds.most_common())
        print(f"\n{name}: {line}\nerrors: {kinds}")
        context = f"{line}\n{kinds}\n" + "\n".join(workload.problems()[:20]) + \
            "\n" + log_about(proxy, workload)
        assert held > 0, context
        # Every client on the session it opened, with its state, and going on after the kill.
        assert not any(c.broken for c in workload.clients), context
        assert [c.thread_ids for c in workload.clients] == [[i] for i in first_ids], context
        assert (figures.lost_state, figures.row_mismatches, figures.reconnects) == (0, 0, 0), \
            context
        assert all(b > a for a, b in zip(before, workload.commits(), strict=True)), context
        # The errors: at most one per session on the killed node, each the proxy's own word
        # on a statement its backend died under; with replay, only COMMITs of unknown outcome.
        assert figures.errors <= held, context
        assert all(kind.startswith("1105 TiProxy: backend") for kind in figures.error_kinds), \
            context
        if replay:
            assert figures.errors == figures.unknown_commits, context
        assert check_rows(cluster, workload) == {}
    finally:
        workload.close()


def test_a_killed_node_through_haproxy(
    workload_cluster: GaleraCluster, tmp_path: Path, side_by_side: dict[str, str],
    record_property: Callable[[str, object], None],
) -> None:
    """The contrast: reconnects and lost state are counted and reported, not asserted."""
    cluster = workload_cluster
    haproxy = HAProxyProcess(tmp_path, cluster.addrs, check=True).start()

    def log_in() -> pymysql.connections.Connection[Any]:
        return pymysql.connect(host="127.0.0.1", port=haproxy.port, user=APP.name,
                               password=APP.password, database=APP.database, autocommit=True,
                               connect_timeout=5, read_timeout=READ_TIMEOUT,
                               write_timeout=READ_TIMEOUT)

    workload = Workload(log_in, "hakill", CLIENTS, reconnect=True)
    try:
        try:
            workload.start()
            time.sleep(SETTLE)
            cluster.kill_node(0)
            time.sleep(AFTER)
        finally:
            workload.stop()
        figures = workload.figures()
        line = f"{figures.summary()}"
        side_by_side["haproxy"] = line
        record_property("galera_kill", f"haproxy {line}")
        kinds = ", ".join(f"{k} x{n}" for k, n in figures.error_kinds.most_common())
        print(f"\nhaproxy: {line}\nerrors: {kinds}")
        assert all(n > 0 for n in workload.commits()), workload.commits()
        assert not any(c.broken for c in workload.clients), workload.problems()
    finally:
        workload.close()
        haproxy.stop()
