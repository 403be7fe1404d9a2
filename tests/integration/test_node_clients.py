"""Node.js clients through the proxy: mysql2 and MariaDB's own connector (tests/support/node).

Each client runs the same workload (workload.js) twice, directly against a MariaDB server and
through the proxy, and every step's result must be the same. Through the proxy the session is
moved at the points the workload names, between the proxy's two backends, which are two addresses
of that one server (as in test_migration_stress.py): the tables are the same, every move is a real
one. What the workloads exercise that the Python drivers do not: mysql2's statement cache (an id
kept across moves), the mariadb connector's pipelining (commands sent before the first answer,
also right after a move), its batches (COM_STMT_BULK_EXECUTE), streams, COM_CHANGE_USER and
COM_RESET_CONNECTION followed by a move.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from support.backends import ADMIN_TOML, APP, BACKEND_ARGS, BACKEND_USERS, MariaDBFactory
from support.proxy import ProxyFactory
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

NODE_DIR = Path(__file__).resolve().parent.parent / "support" / "node"


@pytest.fixture(scope="module")
def server(mariadb_factory: MariaDBFactory) -> MariaDBServer:
    return mariadb_factory(BACKEND_ARGS, BACKEND_USERS)


def run_workload(client: str, port: int, on_move: Callable[[str, int], None],
                 ) -> list[dict[str, Any]]:
    """The workload's results, step by step; `on_move("MOVE" or "REDIRECT", connection id)`
    where it may move."""
    node = shutil.which("node")
    assert node is not None, "Node.js is missing (scripts/setup.sh installs it)"
    assert (NODE_DIR / "node_modules" / client).is_dir(), "scripts/setup.sh installs the clients"
    env = {**os.environ, "TIPROXY_HOST": "127.0.0.1", "TIPROXY_PORT": str(port),
           "TIPROXY_USER": APP.name, "TIPROXY_PASSWORD": APP.password, "TIPROXY_DATABASE": "test"}
    proc = subprocess.Popen([node, str(NODE_DIR / "workload.js"), client], cwd=NODE_DIR, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    results: list[dict[str, Any]] = []
    moves = 0
    try:
        for line in proc.stdout:
            if line.startswith(("MOVE ", "REDIRECT ")):
                what, conn_id = line.split()
                on_move(what, int(conn_id))
                moves += 1
                proc.stdin.write("ok\n")
                proc.stdin.flush()
            elif line.startswith("R "):
                results.append(json.loads(line[2:]))
        code = proc.wait(timeout=60)
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, f"{client} failed after {len(results)} steps:\n{stderr}"
    assert moves >= 3
    return results


@pytest.mark.parametrize("client", ["mysql2", "mariadb"])
def test_a_node_client_gets_through_the_proxy_what_it_gets_directly(
    server: MariaDBServer, proxy_factory: ProxyFactory, client: str,
) -> None:
    direct = run_workload(client, server.port, lambda what, conn_id: None)
    proxy = proxy_factory([server.addr, f"localhost:{server.port}"], ADMIN_TOML)
    backends_seen: set[str] = set()
    redirected_from: list[str] = []

    def move(what: str, conn_id: int) -> None:
        before = proxy.session(conn_id)["backend"]
        if redirected_from:  # the commands after the redirect moved it
            assert before != redirected_from.pop(), "the redirect before this did not move it"
        if what == "REDIRECT":
            redirected_from.append(before)
            proxy.redirect()
        else:
            backends_seen.add(proxy.move(conn_id))

    through = run_workload(client, proxy.port, move)
    assert not redirected_from
    assert len(backends_seen) == 2  # it really went back and forth
    assert [r["step"] for r in through] == [r["step"] for r in direct]
    for want, got in zip(direct, through, strict=True):
        assert got == want, want["step"]
    metrics = proxy.api("/metrics")[1].decode()
    assert 'migrate_res="fail"' not in metrics
