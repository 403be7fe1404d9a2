"""Clients in other languages, each driven by a workload script: run directly, then through the
proxy while the session moves, and compared step by step.

A workload writes each step's result as a line `R <json>`. Where the session may move it writes
`MOVE <connection id>` (the test moves it and waits until it is on the other backend) or
`REDIRECT <id>` (the test only asks for the move, which happens when a later command arrives),
then waits for a line `ok` on stdin. Directly, every request is answered at once. The proxy's two
backends are two addresses of one server (as in test_migration_stress.py): the tables are the
same, every move is a real one.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from support.backends import ADMIN_TOML, APP
from support.proxy import ProxyFactory
from tiproxy.playground.mariadb import MariaDBServer


def run_workload(command: list[str], cwd: Path, port: int, on_move: Callable[[str, int], None],
                 timeout: float = 120) -> list[dict[str, Any]]:
    """The workload's results, step by step, calling `on_move("MOVE" or "REDIRECT", id)`."""
    env = {**os.environ, "TIPROXY_HOST": "127.0.0.1", "TIPROXY_PORT": str(port),
           "TIPROXY_USER": APP.name, "TIPROXY_PASSWORD": APP.password, "TIPROXY_DATABASE": "test"}
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
        code = proc.wait(timeout=timeout)
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, f"{command} failed ({code}) after {len(results)} steps:\n{stderr}"
    assert moves >= 3
    return results


def same_through_moves(server: MariaDBServer, proxy_factory: ProxyFactory, command: list[str],
                       cwd: Path) -> None:
    """The workload gets through the proxy, moving back and forth, what it gets directly."""
    direct = run_workload(command, cwd, server.port, lambda what, conn_id: None)
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

    through = run_workload(command, cwd, proxy.port, move)
    assert not redirected_from
    assert len(backends_seen) == 2  # it really went back and forth
    assert [r["step"] for r in through] == [r["step"] for r in direct]
    for want, got in zip(direct, through, strict=True):
        assert got == want, want["step"]
    metrics = proxy.api("/metrics")[1].decode()
    assert 'migrate_res="fail"' not in metrics
