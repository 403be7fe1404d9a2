"""`tiproxyctl upgrade` under load: a new proxy process takes the listeners and every session over
(control/upgrade.py, net/handover.py), and no client notices.

The proxy runs from a copy of the package in a directory of the test's own; once it serves,
the test changes the copy's version on disk, as installing a new release would, so that the
process started by the upgrade is a new version. Eight stateful clients (support/workload.py,
which check their session state after every transaction) and sysbench oltp_read_write with
eight threads (which stops at the first error) run through the upgrade. Through HAProxy, the
contrast is its own reload (`-sf`, with `hard-stop-after`): the old process finishes only when
its connections end, or cuts them; its figures are reported beside the proxy's.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

import tiproxy
from support.backends import ADMIN_TOML, APP, BACKEND_ARGS, BACKEND_USERS, MariaDBFactory
from support.certs import make_pki
from support.haproxy import HAProxyProcess
from support.proxy import WORKERS, ProxyFactory, ProxyProcess
from support.workload import DATABASE, Workload
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

CLIENTS = 8
NEW_VERSION = "9.9.9-upgraded"
SYSBENCH_SECONDS = 12


@pytest.fixture(scope="module")
def pair(mariadb_factory: MariaDBFactory) -> list[MariaDBServer]:
    """Two servers with the workload's database; sysbench's tables are made by each run."""
    servers = [mariadb_factory(BACKEND_ARGS, BACKEND_USERS) for _ in range(2)]
    for server in servers:
        server.sql(f"CREATE DATABASE {DATABASE}; CREATE DATABASE sbtest;\n"
                   f"GRANT ALL ON {DATABASE}.* TO app; GRANT ALL ON sbtest.* TO app;")
    return servers


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A copy of the installed package, for the test to change on disk."""
    root = tmp_path / "pkg"
    shutil.copytree(Path(tiproxy.__file__).parent, root / "tiproxy",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return root


class Sysbench(threading.Thread):
    """sysbench oltp_read_write through `port` for SYSBENCH_SECONDS; it stops at an error.
    Its tables are made on each of `servers` directly (they hold data of their own)."""

    def __init__(self, port: int, servers: list[MariaDBServer]) -> None:
        super().__init__(daemon=True)
        self.args = ["sysbench", "oltp_read_write", "--db-driver=mysql", "--mysql-host=127.0.0.1",
                     f"--mysql-user={APP.name}", f"--mysql-password={APP.password}",
                     "--mysql-db=sbtest", "--tables=2", "--table-size=1000", "--threads=8",
                     f"--time={SYSBENCH_SECONDS}", "--report-interval=0"]
        for server in servers:
            at = [*self.args, f"--mysql-port={server.port}"]
            subprocess.run([*at, "cleanup"], capture_output=True, check=False, timeout=60)
            subprocess.run([*at, "prepare"], capture_output=True, check=True, timeout=120)
        self.args.append(f"--mysql-port={port}")
        self.result: subprocess.CompletedProcess[str] | None = None
        self.start()

    def run(self) -> None:
        self.result = subprocess.run([*self.args, "run"], capture_output=True, text=True,
                                     check=False, timeout=SYSBENCH_SECONDS + 120)

    def figures(self) -> str:
        assert self.result is not None
        out = self.result.stdout
        found = {k: re.search(rf"{k}:\s+(\d+)", out) for k in ("transactions", "ignored errors",
                                                               "reconnects")}
        return " ".join(f"sysbench_{k.replace(' ', '_')}={m.group(1) if m else '?'}"
                        for k, m in found.items())


@pytest.fixture
def new_processes() -> Iterator[list[int]]:
    """Proxies an upgrade started: not the fixture's children, so stopped here."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0


def _ctl(proxy: ProxyProcess, *argv: str) -> str:
    out = subprocess.run([sys.executable, "-m", "tiproxy.cli.ctl", "--host", "127.0.0.1",
                          "--port", str(proxy.api_port), *argv], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_upgrade_under_load_drops_no_one(
        pair: list[MariaDBServer], proxy_factory: ProxyFactory, package: Path,
        new_processes: list[int], side_by_side: dict[str, str]) -> None:
    # One backend: the servers hold data of their own, and the clients' tables are on one.
    proxy = proxy_factory([pair[0].addr], ADMIN_TOML, env={"PYTHONPATH": str(package)})
    old = proxy.proc
    assert old is not None
    workload = Workload(lambda: proxy.connect(autocommit=True, read_timeout=60,
                                              write_timeout=60), "upgrade", CLIENTS)
    try:
        sysbench = Sysbench(proxy.port, pair[:1])
        workload.start()
        first_ids = [c.thread_ids[0] for c in workload.clients]
        time.sleep(2)
        init = package / "tiproxy" / "__init__.py"
        init.write_text(re.sub(r'__version__ = "[^"]*"', f'__version__ = "{NEW_VERSION}"',
                               init.read_text()))
        started = time.monotonic()
        answer = _ctl(proxy, "upgrade")
        new_pid = int(re.search(r"new proxy process (\d+)", answer).group(1))  # type: ignore[union-attr]
        new_processes.append(new_pid)
        assert old.wait(60) == 0  # every session handed over: the old process ended
        took = time.monotonic() - started
        before = workload.commits()
        time.sleep(2)  # the workload goes on in the new process
        assert all(b > a for a, b in zip(before, workload.commits(), strict=True))
        sysbench.join(SYSBENCH_SECONDS + 120)
    finally:
        workload.stop()
    figures = workload.figures()
    assert sysbench.result is not None
    line = f"{figures.summary()} {sysbench.figures()} upgrade_took={took:.1f}s"
    side_by_side["proxy"] = line
    print(f"\nproxy upgrade: {line}")
    log = proxy.log()
    context = f"{line}\n" + "\n".join(workload.problems()[:20]) + "\n" + log[-3000:]
    assert sysbench.result.returncode == 0, sysbench.result.stdout[-2000:] + \
        sysbench.result.stderr[-2000:] + context
    assert not any(c.broken for c in workload.clients), context
    assert (figures.errors, figures.lost_state, figures.row_mismatches,
            figures.reconnects) == (0, 0, 0, 0), context
    assert [c.thread_ids for c in workload.clients] == [[i] for i in first_ids], context
    # The new version serves: its API, its log, the sessions it took over.
    assert proxy.api("/api/debug/health")[1].find(NEW_VERSION.encode()) >= 0
    assert f"tiproxy {NEW_VERSION} (pid {new_pid})" in log
    assert sorted(s["id"] for s in proxy.sessions()) == sorted(first_ids)
    assert log.count("taken over from the previous process") >= CLIENTS
    if WORKERS > 1:  # each old worker handed over to its successor
        assert re.search(r"\[worker 1\] session \d+ taken over", log), context
    workload.close()


def test_haproxy_reload_for_contrast(
        pair: list[MariaDBServer], tmp_path: Path, side_by_side: dict[str, str],
        record_property: Callable[[str, object], None]) -> None:
    """HAProxy's own reload: `-sf` with `hard-stop-after 5s`: the old process stops listening
    and, five seconds on, cuts the connections it still serves; its clients reconnect."""
    haproxy = HAProxyProcess(tmp_path, [pair[0].addr])
    config = haproxy.config_path.read_text().replace("global\n",
                                                     "global\n    hard-stop-after 5s\n")
    haproxy.config_path.write_text(config)
    haproxy.start()

    def log_in() -> pymysql.connections.Connection[Any]:
        return pymysql.connect(host="127.0.0.1", port=haproxy.port, user=APP.name,
                               password=APP.password, database=APP.database, autocommit=True,
                               connect_timeout=5, read_timeout=60, write_timeout=60)

    workload = Workload(log_in, "hareload", CLIENTS, reconnect=True)
    new: subprocess.Popen[bytes] | None = None
    try:
        workload.start()
        time.sleep(2)
        assert haproxy.proc is not None
        with haproxy.log_path.open("ab") as out:
            new = subprocess.Popen([shutil.which("haproxy") or "/usr/sbin/haproxy", "-f",
                                    str(haproxy.config_path), "-db", "-sf",
                                    str(haproxy.proc.pid)], stdout=out, stderr=subprocess.STDOUT)
        time.sleep(8)
    finally:
        workload.stop()
        if new is not None:
            new.terminate()
            new.wait(10)
        haproxy.stop()
    figures = workload.figures()
    line = figures.summary()
    side_by_side["haproxy_reload"] = line
    record_property("upgrade", f"haproxy {line}")
    print(f"\nhaproxy reload: {line}")
    assert all(n > 0 for n in workload.commits()), workload.problems()
    workload.close()


def test_a_tls_session_stays_with_the_old_process_until_the_timeout(
        pair: list[MariaDBServer], proxy_factory: ProxyFactory, tmp_path: Path,
        new_processes: list[int]) -> None:
    """A TLS client leg cannot travel (its keys are in the old process's OpenSSL): that session
    stays, the new process's API says where, and graceful-close-conn-timeout ends it."""
    pki = make_pki(tmp_path / "pki")
    proxy = proxy_factory([pair[0].addr], "graceful-close-conn-timeout = 3\n"
                          f'[security.server-tls]\ncert = "{pki.server.cert}"\n'
                          f'key = "{pki.server.key}"\n')
    old = proxy.proc
    assert old is not None
    plain = proxy.connect(autocommit=True, ssl_disabled=True)  # (PyMySQL prefers TLS)
    tls = proxy.connect(autocommit=True, ssl_ca=str(pki.ca), ssl_verify_cert=True)
    for conn in (plain, tls):
        with conn.cursor() as cur:
            cur.execute("SET @mine = 'kept'")
    new_processes.append(int(re.search(r"new proxy process (\d+)",  # type: ignore[union-attr]
                                       _ctl(proxy, "upgrade")).group(1)))
    deadline = time.monotonic() + 30
    while "stays with the previous process" not in proxy.log():
        assert time.monotonic() < deadline, proxy.log()[-2000:]
        time.sleep(0.1)
    staying = proxy.session(tls.thread_id())  # listed by the new process's API
    assert "stays with the previous process" in staying["waiting"]
    assert "TLS" in staying["waiting"]
    assert "stays" not in proxy.session(plain.thread_id())["waiting"]
    with plain.cursor() as cur:  # in the new process, with its state
        cur.execute("SELECT @mine")
        assert cur.fetchone() == ("kept",)
    with tls.cursor() as cur:  # still served, by the old process, until the timeout
        cur.execute("SELECT @mine")
        assert cur.fetchone() == ("kept",)
    assert old.wait(30) == 0
    with pytest.raises(pymysql.err.OperationalError), tls.cursor() as cur:
        cur.execute("SELECT 1")
    assert all(s["id"] != tls.thread_id() for s in proxy.sessions())
    with plain.cursor() as cur:  # the old process's end is none of its business
        cur.execute("SELECT @mine")
        assert cur.fetchone() == ("kept",)
    plain.close()


def test_the_idle_clock_a_move_keeps_goes_on_in_the_new_process(
        pair: list[MariaDBServer], proxy_factory: ProxyFactory,
        new_processes: list[int]) -> None:
    """A move restarts the server's idle count, so the proxy keeps the old one (the session is
    closed once idle for its wait_timeout since its last answer). The new process of an upgrade
    goes on counting: idle 10 s in all, the session is gone 2 s before the moved connection's
    own count would have run out."""
    proxy = proxy_factory([pair[0].addr, pair[1].addr], ADMIN_TOML)
    old = proxy.proc
    assert old is not None
    idle = proxy.connect(autocommit=True)
    with idle.cursor() as cur:
        cur.execute("SET SESSION wait_timeout = 10")
    answered = time.monotonic()
    time.sleep(2)
    proxy.move(idle.thread_id())  # the new connection's server would close it 10 s from now
    moved = time.monotonic()
    new_processes.append(int(re.search(r"new proxy process (\d+)",  # type: ignore[union-attr]
                                       _ctl(proxy, "upgrade")).group(1)))
    assert old.wait(30) == 0  # the idle session travelled
    assert time.monotonic() - answered < 9, "the upgrade took too long for this test to tell"
    proxy.wait_log("idle for its wait_timeout (10s) since its last answer", timeout=15)
    assert time.monotonic() - moved < 10  # before the moved connection's own count ran out
    with pytest.raises(pymysql.err.OperationalError), idle.cursor() as cur:
        cur.execute("SELECT 1")
