"""The proxy as its users run it: `python -m tiproxy --config FILE`, as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pymysql

from support.backends import APP
from support.net import wait_for_port
from tiproxy.playground.mariadb import AppUser

# The data plane's processes of every proxy the tests start: 1 (everything in one process) unless
from tiproxy.playground.ports import free_port

# TIPROXY_TEST_WORKERS says otherwise.
WORKERS = int(os.environ.get("TIPROXY_TEST_WORKERS", "1"))


class ProxyProcess:
    """One proxy on free ports with a log file; stop() is safe to call twice.

    `api_host` is where the API listens and `sql_host` the SQL port (127.0.0.1 unless a test
    needs another interface; connect() uses 127.0.0.1 for "0.0.0.0"); `api_token_file` becomes
    `[api] auth-token-file`, and `api()` sends `api_token`, if given, as the bearer token;
    `api_toml` is more lines of `[api]`; `command_prefix` runs the proxy through another
    command (a shell that joins a cgroup first, `ip netns exec`); `args` are more flags of
    `tiproxy`; `env`, more environment variables; `reach_host` is where this process reaches
    the SQL port, when not at `sql_host` (a proxy in another network namespace); `port`, the
    SQL port, is a free one unless given.
    """

    def __init__(self, workdir: Path, backend_addrs: Sequence[str], extra_toml: str = "", *,
                 api_host: str = "127.0.0.1", api_token_file: Path | None = None,
                 api_token: str | None = None, sql_host: str = "127.0.0.1",
                 command_prefix: Sequence[str] = (), api_toml: str = "",
                 args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 reach_host: str | None = None, port: int | None = None) -> None:
        self.workdir = workdir
        self.command_prefix = list(command_prefix)  # e.g. a shell that joins a cgroup first
        self.args = list(args)
        self.env = {**os.environ, **env} if env else None
        self.sql_host = sql_host
        self.local_host = reach_host or ("127.0.0.1" if sql_host == "0.0.0.0" else sql_host)
        self.port = port or free_port()
        self.api_host = api_host
        self.api_port = free_port()
        while self.api_port == self.port:  # the kernel may hand the same free port out twice
            self.api_port = free_port()
        self.api_token = api_token
        self.config_path = workdir / "proxy.toml"
        self.log_path = workdir / "proxy.log"
        addrs = ", ".join(f'"{a}"' for a in backend_addrs)
        proxy_extra, _, rest = extra_toml.partition("\n[")
        if "workers" not in proxy_extra:  # the suite runs in both modes (.ci/run)
            proxy_extra += f"\nworkers = {WORKERS}"
        self.config_path.write_text(
            "[proxy]\n"
            f'addr = "{sql_host}:{self.port}"\n'
            f"backend-addrs = [{addrs}]\n"
            f"{proxy_extra}\n"
            "[api]\n"
            f'addr = "{api_host}:{self.api_port}"\n'
            + (f'auth-token-file = "{api_token_file}"\n' if api_token_file else "")
            + (f"{api_toml}\n" if api_toml else "") +
            "[log]\n"
            'level = "info"\n' + (f"[{rest}\n" if rest else "")
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> ProxyProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*self.command_prefix, sys.executable, "-m", "tiproxy", "--config",
             str(self.config_path), *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.proc.returncode}:\n{self.log()}")
            try:
                wait_for_port(self.api_host, self.api_port, timeout=0.2)
                wait_for_port(self.local_host, self.port, timeout=0.2)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
            else:
                return self

    def stop(self) -> None:
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

    def wait_log(self, text: str, timeout: float = 5.0) -> None:
        """Until the log has `text` (a worker's lines reach it through the control process)."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert time.monotonic() < deadline, f"{text!r} not logged:\n{self.log()[-2000:]}"
            time.sleep(0.05)

    def rss_kb(self) -> int:
        """The resident memory of the proxy's processes (the control process and its workers)."""
        assert self.proc is not None
        total, pending = 0, [self.proc.pid]
        while pending:
            pid = pending.pop()
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                pending += map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
            except OSError:  # gone meanwhile
                continue
            total += next(int(line.split()[1]) for line in status.splitlines()
                          if line.startswith("VmRSS:"))
        return total

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def connect(self, user: AppUser = APP, **kwargs: Any) -> pymysql.connections.Connection[Any]:
        kwargs.setdefault("database", user.database)
        kwargs.setdefault("connect_timeout", 10)
        kwargs.setdefault("read_timeout", 120)
        return pymysql.connect(
            host=self.local_host, port=self.port, user=user.name, password=user.password,
            **kwargs
        )

    def api(self, path: str, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {self.api_token}"} if self.api_token else {}
        req = urllib.request.Request(
            f"http://{self.api_host}:{self.api_port}{path}", data=body, method=method,
            headers=headers,
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def sessions(self) -> list[dict[str, Any]]:
        status, body = self.api("/api/admin/sessions")
        assert status == 200, body
        result: list[dict[str, Any]] = json.loads(body)
        return result

    def wait_sessions(self, at_most: int, timeout: float = 10) -> None:
        """Until the proxy holds at most `at_most` sessions: a client's close reaches the proxy
        a moment after the client returns, and on a loaded machine later than any fixed sleep."""
        deadline = time.monotonic() + timeout
        while len(self.sessions()) > at_most:
            assert time.monotonic() < deadline, self.sessions()
            time.sleep(0.02)

    def session(self, conn_id: int) -> dict[str, Any]:
        for s in self.sessions():
            if s["id"] == conn_id:
                return s
        raise AssertionError(f"session {conn_id} not listed")

    def redirect(self) -> None:
        """TiProxy's /api/debug/redirect: every session is asked to move."""
        status, body = self.api("/api/debug/redirect", method="POST", body=b"")
        assert status == 200, body

    def wait_moved(self, conn_id: int, old_backend: str, timeout: float = 10) -> str:
        """Wait until the session sits on another backend with no move pending; its backend."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.session(conn_id)
            if s["backend"] != old_backend and not s["moving"]:
                return str(s["backend"])
            time.sleep(0.01)
        raise AssertionError(f"session {conn_id} did not move: {self.session(conn_id)}")

    def move(self, conn_id: int) -> str:
        """Redirect every session and wait until this one sits on another backend; that one."""
        old = self.session(conn_id)["backend"]
        self.redirect()
        return self.wait_moved(conn_id, old)

    def waits(self, conn_id: int, reason: str, timeout: float = 5) -> None:
        """Redirect; the session stays where it is and says `reason` is why."""
        before = self.session(conn_id)["backend"]
        self.redirect()
        deadline = time.monotonic() + timeout
        while reason not in self.session(conn_id)["waiting"]:
            assert time.monotonic() < deadline, self.session(conn_id)
            time.sleep(0.05)
        assert self.session(conn_id)["backend"] == before

    def backends(self) -> list[dict[str, Any]]:
        status, body = self.api("/api/admin/backends")
        assert status == 200, body
        result: list[dict[str, Any]] = json.loads(body)
        return result


class ProxyFactory:
    """The callable the `proxy_factory` fixture returns (a Protocol in spirit)."""

    def __call__(self, backend_addrs: Sequence[str], extra_toml: str = "",
                 **options: Any) -> ProxyProcess:  # options: ProxyProcess's keywords
        raise NotImplementedError
