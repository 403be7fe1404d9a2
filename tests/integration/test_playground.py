"""`tiproxy playground` as the README's first command runs it, and the demo it prints, for real.

The playground runs as a subprocess. The Galera test pastes the demo from the banner (its SQL
before the move, the redirect, its SQL after), so what the user is told to try is what is
checked: the moved session reads another port, its variables and the row it wrote. Pass or
fail, the playground is stopped the way a user stops it (SIGINT; SIGKILL after a timeout), and
it must leave neither its directory nor a process running from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

from support.net import port_accepts
from tiproxy.cli.playground import DEFAULT_PASSWORD, DEFAULT_USER
from tiproxy.playground.ports import HOST, free_port

pytestmark = pytest.mark.integration

START_TIMEOUT = 120.0  # a Galera start takes seconds to tens of seconds on a busy 2-core machine
STOP_TIMEOUT = 60.0  # sessions close (15 s at most), then every node shuts down in turn
MOVE_TIMEOUT = 30.0
_STARTING = re.compile(r"^starting .* in (\S+) \.\.\.$", re.MULTILINE)
_READY = "Ctrl-C stops everything."
_STOPPED = "playground stopped; its directory is removed"
_INDENT = "    "  # the banner indents what is to be pasted


class Playground:
    """`python -m tiproxy playground ARGS` on free ports, its output in a file."""

    def __init__(self, log_path: Path, *args: str) -> None:
        self.port = free_port()
        self.api_port = free_port()
        while self.api_port == self.port:  # the kernel may hand the same free port out twice
            self.api_port = free_port()
        self.log_path = log_path
        self.basedir: Path | None = None
        self.exit_code: int | None = None
        self.leftovers: list[str] = []  # command lines of processes still running from basedir
        self.left_basedir = False
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tiproxy", "playground", "--addr", f"{HOST}:{self.port}",
                 "--api-addr", f"{HOST}:{self.api_port}", *args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until the banner is out and the proxy and its API accept connections."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.output()
            if self.basedir is None and (match := _STARTING.search(out)):
                self.basedir = Path(match[1])
            if _READY in out and port_accepts(HOST, self.port) and \
                    port_accepts(HOST, self.api_port):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"playground exited with {self.proc.returncode}:\n{out}")
            if time.monotonic() > deadline:
                raise AssertionError(f"playground not up in {timeout} s:\n{out}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGINT, SIGKILL after STOP_TIMEOUT; then note, and remove, whatever it left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.exit_code = self.proc.returncode
        if self.basedir is None:
            return
        left = processes_running_from(self.basedir)
        self.leftovers = list(left.values())
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.left_basedir = self.basedir.exists()
        shutil.rmtree(self.basedir, ignore_errors=True)

    def assert_clean_stop(self) -> None:
        assert self.exit_code == 0, self.output()
        assert _STOPPED in self.output()
        assert self.basedir is not None
        assert self.leftovers == []
        assert not self.left_basedir, f"{self.basedir} is still there"

    def connect(self) -> pymysql.connections.Connection[Any]:
        """Log in through the proxy as the banner's connect line does (autocommit, as that client)."""
        return pymysql.connect(host=HOST, port=self.port, user=DEFAULT_USER,
                               password=DEFAULT_PASSWORD, database="test", autocommit=True,
                               connect_timeout=10, read_timeout=60)

    def api(self, path: str, method: str = "GET") -> Any:
        request = urllib.request.Request(f"http://{HOST}:{self.api_port}{path}", method=method,
                                         data=b"" if method == "POST" else None)
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
            return json.loads(response.read())

    def session(self, session_id: int) -> dict[str, Any]:
        for session in self.api("/api/admin/sessions"):
            if session["id"] == session_id:
                return dict(session)
        raise AssertionError(f"session {session_id} not listed")

    def wait_moved(self, session_id: int, old_backend: str) -> str:
        """Wait until the session sits on another backend with no move pending; its backend."""
        deadline = time.monotonic() + MOVE_TIMEOUT
        while time.monotonic() < deadline:
            session = self.session(session_id)
            if session["backend"] != old_backend and not session["moving"]:
                return str(session["backend"])
            time.sleep(0.05)
        raise AssertionError(f"session did not move: {self.session(session_id)}")


def processes_running_from(basedir: Path) -> dict[int, str]:
    """pid -> command line of every process that names basedir (mariadbd, the SST's rsync)."""
    found: dict[int, str] = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it exited meanwhile
            continue
        if str(basedir) in args:
            found[int(cmdline.parent.name)] = args
    return found


@contextlib.contextmanager
def running_playground(tmp_path: Path, *args: str) -> Iterator[Playground]:
    playground = Playground(tmp_path / "playground.log", *args)
    try:
        playground.wait_ready()
        yield playground
    finally:
        playground.stop()


def demo(output: str) -> tuple[list[str], str, list[str]]:
    """The banner's demo: the SQL before the move, the shell command, the SQL after it."""
    block = output.split("try a migration", 1)[1].split(_READY, 1)[0]
    pasted = [line.strip() for line in block.splitlines() if line.startswith(_INDENT)]
    shell = [line for line in pasted if not line.endswith(";")]
    assert len(shell) == 1, block
    at = pasted.index(shell[0])
    return pasted[:at], shell[0], pasted[at + 1:]


def test_galera_playground_session_moves_with_its_data(tmp_path: Path) -> None:
    with running_playground(tmp_path) as playground:
        out = playground.output()
        assert "a 3-node MariaDB Galera cluster" in out
        assert f"mariadb -h{HOST} -P{playground.port} -u{DEFAULT_USER} -p{DEFAULT_PASSWORD} test" \
            in out
        before, shell, after = demo(out)
        assert shell.endswith(f"tiproxyctl --addr {HOST}:{playground.api_port} redirect")
        with playground.connect() as conn, conn.cursor() as cur:
            for statement in before:  # the last one is SELECT @@port
                cur.execute(statement)
            (port_before,) = cur.fetchone()
            cur.execute("SET SESSION sql_mode = 'ANSI_QUOTES'")
            session_id = conn.thread_id()
            old_backend = playground.session(session_id)["backend"]
            assert old_backend == f"{HOST}:{port_before}"

            assert playground.api("/api/debug/redirect", method="POST") == {"sessions": 1}
            new_backend = playground.wait_moved(session_id, old_backend)

            (statement,) = after
            cur.execute(statement)
            port_after, greeting, note = cur.fetchone()
            assert new_backend == f"{HOST}:{port_after}"
            assert port_after != port_before
            assert (greeting, note) == ("kept", "written before the move")
            cur.execute("SELECT @@SESSION.sql_mode, @@GLOBAL.sql_mode = @@SESSION.sql_mode")
            assert cur.fetchone() == ("ANSI_QUOTES", 0)
    playground.assert_clean_stop()


def test_plain_playground_starts_independent_servers(tmp_path: Path) -> None:
    with running_playground(tmp_path, "--plain", "2") as playground:
        assert "2 independent MariaDB servers" in playground.output()
        assert len(playground.api("/api/admin/backends")) == 2
        with playground.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    playground.assert_clean_stop()
