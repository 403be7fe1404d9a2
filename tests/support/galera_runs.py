"""What the tests that break a Galera cluster under the stateful workload share: putting every
node back, and the checks of rows and of what the proxy holds and logged. (The fixtures,
`workload_cluster` and `side_by_side`, are in tests/conftest.py.)"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

from support.backends import connect
from support.proxy import ProxyProcess
from support.workload import Workload
from tiproxy.playground.galera import GaleraCluster

_MIGRATE_SAMPLE = re.compile(r"^tiproxy_balance_migrate_total\{(.*)\} (\S+)$", re.MULTILINE)


def restore(cluster: GaleraCluster) -> None:
    for i, node in enumerate(cluster.nodes):
        if not node.running:
            cluster.start_node(i)


def check_rows(cluster: GaleraCluster, workload: Workload) -> dict[str, dict[str, tuple[int, int]]]:
    """Per running node: the tables whose rows are not exactly the acknowledged commits."""
    result = {}
    for i, node in enumerate(cluster.nodes):
        if not node.running:
            continue  # killed by the test: its successors hold the rows
        with connect(node, autocommit=True,
                     init_command="SET SESSION wsrep_sync_wait = 1") as conn:
            wrong = workload.missing_rows(conn)
        if wrong:
            result[f"node{i}"] = wrong
    return result


def migrations(proxy: ProxyProcess) -> Counter[str]:
    """The proxy's moves so far by result ("succeed", "fail"), from its /metrics."""
    status, body = proxy.api("/metrics")
    assert status == 200, body
    counts: Counter[str] = Counter()
    for labels, value in _MIGRATE_SAMPLE.findall(body.decode()):
        result = re.search(r'migrate_res="([^"]*)"', labels)
        counts[result.group(1) if result else "?"] += int(float(value))
    return counts


def sessions(proxy: ProxyProcess, backend: str | None = None) -> list[dict[str, Any]]:
    status, body = proxy.api("/api/admin/sessions")
    assert status == 200, body
    listed: list[dict[str, Any]] = json.loads(body)
    return [s for s in listed if backend is None or s["backend"] == backend]


def connections(proxy: ProxyProcess, addr: str) -> int:
    return int({b["addr"]: b["connections"] for b in proxy.backends()}[addr])


def log_about(proxy: ProxyProcess, workload: Workload, lines: int = 60) -> str:
    """The proxy's warnings and errors, and what it logged about the sessions that saw one."""
    troubled = {c.thread_ids[0] for c in workload.clients if c.broken or c.problems}
    patterns = [r"\[(WARNING|ERROR|CRITICAL)\]"]
    patterns += [rf"session {i}\b" for i in sorted(troubled)]
    wanted = re.compile("|".join(patterns))
    picked = [line for line in proxy.log().splitlines() if wanted.search(line)]
    return "--- proxy log (warnings, troubled sessions) ---\n" + "\n".join(picked[-lines:])


def log_tail(proxy: ProxyProcess, lines: int = 40) -> str:
    return "--- proxy log ---\n" + "\n".join(proxy.log().splitlines()[-lines:])
