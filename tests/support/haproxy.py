"""HAProxy as the tests' point of comparison: TCP mode, one thread, `balance leastconn`.

The configuration is the one bench/sysbench.py writes (one thread, TCP mode, long client and
server timeouts, leastconn), with any number of servers and, if asked, HAProxy's plain TCP health
check (`check`: a connect every 2 s; 3 failures mark a server down, 2 successes up again).
HAProxy has no notion of a MySQL session: it forwards bytes, so a client whose server goes away
loses its connection and whatever state it held.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from support.net import wait_for_port
from tiproxy.playground.ports import HOST, free_port


def haproxy_config(port: int, servers: Sequence[str], *, check: bool = False) -> str:
    """An haproxy.cfg listening on HOST:port that forwards to servers ("host:port" each)."""
    lines = [
        "global",
        "    nbthread 1",
        "    maxconn 4000",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 1h",
        "    timeout server 1h",
        "listen mysql",
        f"    bind {HOST}:{port}",
        "    balance leastconn",
    ]
    lines += [f"    server db{i} {addr}{' check' if check else ''}" for i, addr in enumerate(servers)]
    return "\n".join(lines) + "\n"


class HAProxyProcess:
    """One HAProxy in the foreground (-db) on a free port, its output in a log file."""

    def __init__(self, workdir: Path, servers: Sequence[str], *, check: bool = False) -> None:
        self.port = free_port()
        self.config_path = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        self.config_path.write_text(haproxy_config(self.port, servers, check=check))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> HAProxyProcess:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [binary, "-f", str(self.config_path), "-db"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n{self.log()}")
            try:
                wait_for_port(HOST, self.port, timeout=0.2)
            except TimeoutError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
            else:
                return self

    def stop(self) -> None:
        """Stop HAProxy; safe to call twice."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
