"""Benchmark the proxy against direct connections and HAProxy with the same sysbench workloads.

Theory of operation (DESIGN.md section 9): the machine is small, shared and noisy, so absolute
numbers mean little; ratios measured side by side mean more. One MariaDB server is started with
the project's launcher and sysbench's tables are prepared once. The proxy (`python -m tiproxy`)
and HAProxy (TCP mode, `balance leastconn`) both forward to that server; --workers N sets the
proxy's `[proxy] workers` and HAProxy's `nbthread` (default 1 each) so they use as many cores.
For each workload, each round runs sysbench once against every target, in an order that rotates
from round to round, so a slow spell of the machine hurts every target alike. Each run reports
queries/s and the 95th percentile latency; the CPU time of the proxy's and HAProxy's processes
over the run, divided by the queries the run made, gives their CPU seconds per 1,000 queries.
The table shows medians across rounds and the ratios proxy/direct and proxy/haproxy.

A failing target (the proxy is young) is reported with sysbench's error and the proxy's log lines
written during the run; the other targets still run. A proxy that died is restarted before its
next run. Everything started here is stopped, and the temporary directory removed, on exit,
error, Ctrl-C or SIGTERM.

With --tls every connection to MariaDB is TLS. A CA, a server certificate (127.0.0.1, localhost)
and a client certificate are made in the temporary directory with tiproxy.tls.autocert; MariaDB
runs with them and `require_secure_transport = ON`, so a plaintext connection is refused rather
than measured. sysbench connects with `--mysql-ssl=on` (sysbench 1.0 has no CA option: it reads
cacert.pem, client-cert.pem and client-key.pem from its working directory, which is a directory
of its own here) to the same three targets: MariaDB; the proxy, with TLS on both legs
(`[security.server-tls]` with the server certificate, `[security.sql-tls]` with the CA,
`require-backend-tls = true`); and HAProxy, which in TCP mode passes the client's TLS through to
MariaDB untouched. Before measuring, each target is checked: sysbench's own connection must have
a cipher (its debug trace), and `SHOW SESSION STATUS LIKE 'Ssl_cipher'` through it, which runs on
MariaDB and so describes the proxy's backend leg, must not be empty; a plaintext leg stops the
benchmark with an error.

    .venv/bin/python bench/sysbench.py --quick
    .venv/bin/python bench/sysbench.py --time 30 --rounds 3 --json results.json
    .venv/bin/python bench/sysbench.py --tls --quick

With --capture a fourth target, "capture", is the same proxy with a traffic capture running
(`POST /api/traffic/capture` before the run, `/cancel` after it; compressed files in the
temporary directory): it rotates with the others, so capture/proxy is what capturing costs in
queries per second and in the proxy's CPU (its writer thread, or its control process with
--workers, included). Each capture run notes the commands captured and dropped.

    .venv/bin/python bench/sysbench.py --capture --workloads oltp_point_select,oltp_read_only

With --transaction-replay a target "replay" is the same proxy with `[proxy] transaction-replay
= true` (set through PUT /api/admin/config before the run, off after it; sysbench's sessions log
in at each run's start, when they read it): replay/proxy is what recording open transactions
costs. The proxy target itself always keeps what rebuilding a session without its backend needs
(net/recovery.py), so proxy/haproxy includes that.

    .venv/bin/python bench/sysbench.py --transaction-replay --workloads oltp_read_write

With --scrape one more target, "proxy_scraped", is the same proxy measured while its /metrics is
fetched every second (bench/scrape.py), as a Prometheus with `scrape_interval: 1s` would; its
QPS ratio to HAProxy's is shown beside the proxy's own, with the difference.

    .venv/bin/python bench/sysbench.py --scrape

With --bare-relay two more targets: "bare_relay" is bench/bare_relay.py, a Python relay on
uvloop that forwards bytes both ways and reads none of them (no TLS). proxy/bare_relay is what
the proxy's own reading of the protocol costs; bare_relay/haproxy what Python and uvloop cost
before any of it. "epoll_relay" is the same relay with its established pairs moved off uvloop's
streams (bare_relay.py --epoll: C reads and writes them from an epoll set of its own):
epoll_relay/haproxy is how near a Python process can come when its steady state leaves the
per-chunk transport machinery.

    .venv/bin/python bench/sysbench.py --bare-relay --db-ps-mode=auto --workloads oltp_point_select
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from scrape import Scraper

from tiproxy.playground.mariadb import MariaDBServer, create_app_user
from tiproxy.playground.ports import HOST, free_port
from tiproxy.tls.autocert import issue

USER = "sbtest"
PASSWORD = "sbtest-pass"  # a throwaway account on a throwaway server
DATABASE = "sbtest"
TARGETS = ("direct", "proxy", "haproxy")
CAPTURE_TARGETS = ("direct", "proxy", "capture", "haproxy")  # with --capture
REPLAY_TARGETS = ("direct", "proxy", "replay", "haproxy")  # with --transaction-replay
SCRAPED = "proxy_scraped"  # --scrape: the proxy while its /metrics is scraped every second
BARE = "bare_relay"  # --bare-relay: bench/bare_relay.py, bytes forwarded and never read
EPOLL = "epoll_relay"  # --bare-relay too: bench/bare_relay.py --epoll
YARDSTICKS = (BARE, EPOLL)

# Only the range query of oltp_read_only, 1,000 rows (about 120 KB) per result, no BEGIN/COMMIT.
_LARGE_RESULT_ARGS = (
    "--range_size=1000",
    "--skip_trx=on",
    "--point_selects=0",
    "--simple_ranges=1",
    "--sum_ranges=0",
    "--order_ranges=0",
    "--distinct_ranges=0",
)
# name -> (sysbench script, extra options)
WORKLOADS: dict[str, tuple[str, tuple[str, ...]]] = {
    "oltp_point_select": ("oltp_point_select", ()),
    "oltp_read_only": ("oltp_read_only", ()),
    "large_result": ("oltp_read_only", _LARGE_RESULT_ARGS),
    "oltp_read_write": ("oltp_read_write", ()),
}
DEFAULT_WORKLOADS = ("oltp_point_select", "oltp_read_only", "large_result")

_SERVER_ARGS = (
    "--innodb-buffer-pool-size=256M",  # the whole data set stays in memory
    "--max-connections=2000",
    # Port probes (connect, then close) count as connect errors; never block 127.0.0.1 for them.
    "--max-connect-errors=1000000",
)
_READY_TIMEOUT = 30.0
_STOP_TIMEOUT = 20.0
_RUN_GRACE = 60.0  # a run that takes this much longer than --time is hung: kill sysbench
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_QUERIES = re.compile(r"^\s*queries:\s+(\d+)\s+\(([\d.]+) per sec\.\)", re.MULTILINE)
_P95 = re.compile(r"^\s*95th percentile:\s+([\d.]+)", re.MULTILINE)
_TOTAL_TIME = re.compile(r"^\s*total time:\s+([\d.]+)s", re.MULTILINE)
_IGNORED = re.compile(r"^\s*(ignored errors|reconnects):\s+(\d+)", re.MULTILINE)
_TAIL_LINES = 15
_KEY_SIZE = 2048  # certificates for one run: quick to make, as fast to handshake as real ones
# Printed by sysbench's --mysql-debug=on trace after it connects with --mysql-ssl=on.
_SYSBENCH_CIPHER = re.compile(r'mysql_get_ssl_cipher\(con\): "([^"]*)"')


class BenchError(Exception):
    """A component of the benchmark could not be started or prepared."""


# --- CPU accounting -----------------------------------------------------------------------


def _proc_stats() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime+stime+cutime+cstime in ticks) for every process visible now."""
    stats: dict[int, tuple[int, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:  # the process exited meanwhile
            continue
        # Fields after the command name, which is in parentheses and may hold spaces.
        fields = text[text.rindex(")") + 2 :].split()
        ticks = sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
        stats[int(entry.name)] = (int(fields[1]), ticks)
    return stats


def tree_pids(pid: int, stats: dict[int, tuple[int, int]] | None = None) -> list[int]:
    """pid and all its descendants alive now."""
    stats = _proc_stats() if stats is None else stats
    children: dict[int, list[int]] = {}
    for child, (parent, _) in stats.items():
        children.setdefault(parent, []).append(child)
    pids, pending = [], [pid]
    while pending:
        current = pending.pop()
        if current in stats:
            pids.append(current)
            pending.extend(children.get(current, ()))
    return pids


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by pid and all its descendants (reaped ones via cutime/cstime)."""
    stats = _proc_stats()
    return sum(stats[member][1] for member in tree_pids(pid, stats)) / _CLK_TCK


# --- TLS ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """The bench's CA and the certificates it signed, as PEM files in the temporary directory."""

    ca: Path
    server_cert: Path  # for 127.0.0.1 and localhost: MariaDB's and the proxy's
    server_key: Path
    sysbench_dir: Path  # sysbench 1.0 reads cacert.pem, client-cert.pem, client-key.pem here

    def mariadb_args(self) -> list[str]:
        return [
            f"--ssl-ca={self.ca}",
            f"--ssl-cert={self.server_cert}",
            f"--ssl-key={self.server_key}",
            "--require-secure-transport=ON",  # a plaintext client is refused, not measured
        ]

    def proxy_toml(self) -> str:
        return (
            "[security]\n"
            "require-backend-tls = true\n"
            "[security.server-tls]\n"
            f'cert = "{self.server_cert}"\n'
            f'key = "{self.server_key}"\n'
            "[security.sql-tls]\n"
            f'ca = "{self.ca}"\n'
        )


def _write_pem(path: Path, data: bytes, secret: bool = False) -> Path:
    path.write_bytes(data)
    if secret:
        path.chmod(0o600)
    return path


def make_tls_files(workdir: Path) -> TlsFiles:
    """A CA, a server certificate and sysbench's client certificate, all signed by the CA."""
    tls_dir, sysbench_dir = workdir / "tls", workdir / "sysbench-tls"
    tls_dir.mkdir()
    sysbench_dir.mkdir()
    ca = issue("tiproxy bench CA", key_size=_KEY_SIZE, is_ca=True)
    server = issue("localhost", key_size=_KEY_SIZE, issuer=ca)
    client = issue("sysbench", key_size=_KEY_SIZE, issuer=ca)
    _write_pem(sysbench_dir / "cacert.pem", ca.cert_pem)
    _write_pem(sysbench_dir / "client-cert.pem", client.cert_pem)
    _write_pem(sysbench_dir / "client-key.pem", client.key_pem, secret=True)
    return TlsFiles(
        ca=_write_pem(tls_dir / "ca.pem", ca.cert_pem),
        server_cert=_write_pem(tls_dir / "server.pem", server.cert_pem),
        server_key=_write_pem(tls_dir / "server-key.pem", server.key_pem, secret=True),
        sysbench_dir=sysbench_dir,
    )


# --- child processes ----------------------------------------------------------------------


def wait_for_port(port: int, deadline: float, alive: ChildProcess | None = None) -> None:
    while time.monotonic() < deadline:
        if alive is not None and not alive.running:
            raise BenchError(f"{alive.name} exited with code {alive.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing accepts on {HOST}:{port}")


@dataclass
class ChildProcess:
    """A long-running program started in its own session, with stdout+stderr in one log file."""

    name: str
    cmd: list[str]
    log_path: Path
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def spawn(self) -> None:
        self._log = self.log_path.open("ab")
        # Its own session: Ctrl-C reaches only this script, which then stops the children.
        self._process = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._log is not None:
            self._log.close()
        self._process = self._log = None

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, offset: int) -> str:
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")


def start_proxy(
    workdir: Path, backend: str, tls: TlsFiles | None, proxy_keys: str = "", more_toml: str = ""
) -> tuple[ChildProcess, int]:
    """Start `python -m tiproxy` and wait for its health endpoint and SQL port.

    proxy_keys: more TOML lines for the [proxy] table (churn.py's `workers = N`); more_toml:
    whole tables at the end (churn.py's `[security]` with `--auth-sync`).
    """
    port, api_port = free_port(), free_port()
    config = workdir / "proxy.toml"
    config.write_text(
        "[proxy]\n"
        f'addr = "{HOST}:{port}"\n'
        f'backend-addrs = ["{backend}"]\n' + proxy_keys + "[api]\n"
        f'addr = "{HOST}:{api_port}"\n'
        "[log]\n"
        'level = "warn"\n' + (tls.proxy_toml() if tls else "") + more_toml
    )
    proxy = ChildProcess(
        "proxy", [sys.executable, "-m", "tiproxy", "--config", str(config)], workdir / "proxy.log"
    )
    proxy.spawn()
    try:
        _wait_for_proxy(proxy, port, f"http://{HOST}:{api_port}/api/debug/health")
    except BaseException:
        proxy.stop()
        raise
    return proxy, port


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:  # refused, or an HTTP error status
        return False


def _wait_for_proxy(proxy: ChildProcess, port: int, url: str) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT
    while True:
        if not proxy.running:
            raise BenchError(f"proxy exited with code {proxy.returncode}:\n{proxy.log_since(0)}")
        if _healthy(url):
            break
        if time.monotonic() > deadline:
            raise BenchError(f"proxy health {url} did not answer 200:\n{proxy.log_since(0)}")
        time.sleep(0.05)
    wait_for_port(port, deadline, proxy)


def workers_toml(workers: int) -> str:
    return f"workers = {workers}\n"


def start_haproxy(workdir: Path, backend: str, threads: int = 1) -> tuple[ChildProcess, int]:
    haproxy_bin = shutil.which("haproxy") or "/usr/sbin/haproxy"
    port = free_port()
    config = workdir / "haproxy.cfg"
    config.write_text(
        "global\n"
        f"    nbthread {threads}\n"
        "    maxconn 4000\n"
        "defaults\n"
        "    mode tcp\n"
        "    timeout connect 5s\n"
        "    timeout client 1h\n"
        "    timeout server 1h\n"
        "listen mysql\n"
        f"    bind {HOST}:{port}\n"
        "    balance leastconn\n"
        f"    server db0 {backend}\n"
    )
    haproxy = ChildProcess(
        "haproxy", [haproxy_bin, "-f", str(config), "-db"], workdir / "haproxy.log"
    )
    return _listening(haproxy, port)


def start_bare_relay(workdir: Path, backend: str, name: str) -> tuple[ChildProcess, int]:
    port = free_port()
    host, backend_port = backend.rsplit(":", 1)
    relay = ChildProcess(
        name,
        [sys.executable, str(Path(__file__).with_name("bare_relay.py")),
         *(["--epoll"] if name == EPOLL else []), str(port), host, backend_port],
        workdir / f"{name}.log",
    )
    return _listening(relay, port)


def _listening(process: ChildProcess, port: int) -> tuple[ChildProcess, int]:
    """Start `process` and wait until it accepts on `port`; stopped if it never does."""
    process.spawn()
    try:
        wait_for_port(port, time.monotonic() + _READY_TIMEOUT, process)
    except BaseException:
        process.stop()
        raise
    return process, port


def start_mariadb(
    workdir: Path, tls: TlsFiles | None = None, extra_args: Sequence[str] = ()
) -> MariaDBServer:
    """Start the one MariaDB server with the bench's account; extra_args win over the defaults."""
    server = MariaDBServer(
        workdir / "mariadb",
        extra_args=[*_SERVER_ARGS, *(tls.mariadb_args() if tls else ()), *extra_args],
    )
    server.start()
    create_app_user(server, USER, PASSWORD, database=DATABASE)  # as root, over the unix socket
    return server


def start_database(
    workdir: Path, tables: int, table_size: int, tls: TlsFiles | None
) -> MariaDBServer:
    server = start_mariadb(workdir, tls)
    print(f"preparing {tables} tables x {table_size} rows ...", flush=True)
    options = sysbench_options(server.port, tables, table_size, min(tables, 4), tls)
    result = subprocess.run(
        ["sysbench", "oltp_read_only", *options, "prepare"],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        cwd=sysbench_cwd(tls),
    )
    if result.returncode != 0:
        raise BenchError(f"sysbench prepare failed:\n{result.stdout}{result.stderr}")
    return server


# --- sysbench -----------------------------------------------------------------------------


def sysbench_options(
    port: int, tables: int, table_size: int, threads: int, tls: TlsFiles | None
) -> list[str]:
    return [
        "--db-driver=mysql",
        f"--mysql-host={HOST}",
        f"--mysql-port={port}",
        f"--mysql-user={USER}",
        f"--mysql-password={PASSWORD}",
        f"--mysql-db={DATABASE}",
        f"--tables={tables}",
        f"--table-size={table_size}",
        f"--threads={threads}",
        *(["--mysql-ssl=on"] if tls else []),
    ]


def sysbench_cwd(tls: TlsFiles | None) -> Path | None:
    """Where sysbench runs: with --mysql-ssl=on it reads its CA and client certificate there."""
    return tls.sysbench_dir if tls else None


@dataclass
class Run:
    """One sysbench run against one target."""

    workload: str
    target: str
    round: int
    seconds: float = 0.0
    queries: int = 0
    qps: float = 0.0
    p95_ms: float = 0.0
    cpu_seconds: float | None = None  # the proxy's or HAProxy's, None for direct
    captured: int | None = None  # target "capture": commands the capture wrote
    dropped: int | None = None  # and those it had no room for
    notes: list[str] = field(default_factory=list)  # ignored errors, log lines
    error: str = ""

    @property
    def cpu_per_1k(self) -> float | None:
        if self.cpu_seconds is None or self.queries == 0:
            return None
        return self.cpu_seconds / self.queries * 1000


def tail(text: str, lines: int = _TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def error_lines(text: str, lines: int = _TAIL_LINES) -> str:
    """The last distinct lines of a failed run: every sysbench thread repeats the same error."""
    distinct = dict.fromkeys(
        line for line in text.strip().splitlines() if not line.startswith("(last message")
    )
    return "\n".join(list(distinct)[-lines:])


def parse_sysbench(run: Run, output: str) -> None:
    queries, p95, total = _QUERIES.search(output), _P95.search(output), _TOTAL_TIME.search(output)
    if queries is None or p95 is None or total is None:
        run.error = "could not parse sysbench's output:\n" + tail(output)
        return
    run.queries, run.qps = int(queries.group(1)), float(queries.group(2))
    run.p95_ms, run.seconds = float(p95.group(1)), float(total.group(1))
    run.notes += [
        f"{m.group(1)}: {m.group(2)}" for m in _IGNORED.finditer(output) if m.group(2) != "0"
    ]


@dataclass
class Bench:
    """The targets and the sysbench settings every run shares."""

    args: argparse.Namespace
    workdir: Path
    ports: dict[str, int]
    processes: dict[str, ChildProcess]
    db_addr: str
    tls: TlsFiles | None = None

    def run(self, workload: str, target: str, round_: int, seconds: int) -> Run:
        run = Run(workload, target, round_)
        capturing, scraped = target == "capture", target == SCRAPED
        replaying = target == "replay"
        target = "proxy" if capturing or scraped or replaying else target
        if target == "proxy" and not self.processes["proxy"].running:
            try:
                self._restart_proxy(run)
            except BenchError as exc:
                run.error = f"could not restart the proxy: {exc}"
                return run
        if capturing:
            run.target = "capture"
            self._traffic("capture", output=str(self.workdir / f"capture-{workload}-{round_}"),
                          duration=f"{seconds + 600}s")
        if replaying:
            run.target = "replay"
            self._set_replay(True)
        try:
            if scraped:
                self._measure_scraped(run, workload, seconds)
            else:
                self._measure(run, target, workload, seconds)
        finally:
            if capturing:
                self._end_capture(run)
            if replaying:
                self._set_replay(False)
        return run

    def _set_replay(self, on: bool) -> None:
        """`[proxy] transaction-replay` through PUT /api/admin/config (read at each login)."""
        config = tomllib.loads((self.workdir / "proxy.toml").read_text())
        body = f"[proxy]\ntransaction-replay = {str(on).lower()}\n".encode()
        request = urllib.request.Request(f"http://{config['api']['addr']}/api/admin/config",
                                         data=body, method="PUT")
        with urllib.request.urlopen(request, timeout=30) as answer:
            answer.read()

    def _measure_scraped(self, run: Run, workload: str, seconds: int) -> None:
        """The proxy's run while /metrics is fetched every second (bench/scrape.py)."""
        config = tomllib.loads((self.workdir / "proxy.toml").read_text())
        with Scraper(f"http://{config['api']['addr']}/metrics") as scraper:
            self._measure(run, "proxy", workload, seconds)
        run.notes.append(scraper.summary())
        if scraper.errors:
            run.error += f"\n{len(scraper.errors)} scrapes failed: {scraper.errors[:3]}"

    def _measure(self, run: Run, target: str, workload: str, seconds: int) -> None:
        process = self.processes.get(target)
        script, extra = WORKLOADS[workload]
        cmd = [
            "sysbench",
            script,
            *sysbench_options(
                self.ports[target],
                self.args.tables,
                self.args.table_size,
                self.args.threads,
                self.tls,
            ),
            f"--time={seconds}",
            "--events=0",
            "--percentile=95",
            "--report-interval=0",
            *([f"--db-ps-mode={self.args.db_ps_mode}"] if self.args.db_ps_mode else []),
            *extra,
            "run",
        ]
        log_offset = process.log_size() if process else 0
        cpu_before = tree_cpu_seconds(process.pid) if process and process.running else None
        run.error = run_sysbench(run, cmd, seconds + _RUN_GRACE, sysbench_cwd(self.tls))
        if process is not None:
            if cpu_before is not None and process.running:
                run.cpu_seconds = tree_cpu_seconds(process.pid) - cpu_before
            elif not process.running:
                run.error += f"\n{target} exited with code {process.returncode} during the run"
            logged = tail(process.log_since(log_offset), 40)
            if logged:
                run.notes.append(f"{target} log during the run:\n{logged}")

    def _traffic(self, action: str, **fields: str) -> str:
        """POST /api/traffic/<action> to the proxy (its API address from its config)."""
        config = tomllib.loads((self.workdir / "proxy.toml").read_text())
        url = f"http://{config['api']['addr']}/api/traffic/{action}"
        data = urllib.parse.urlencode(fields).encode()
        with urllib.request.urlopen(url, data, timeout=60) as answer:
            return str(answer.read().decode())

    def _end_capture(self, run: Run) -> None:
        answer = self._traffic("cancel")
        config = tomllib.loads((self.workdir / "proxy.toml").read_text())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with urllib.request.urlopen(
                    f"http://{config['api']['addr']}/api/traffic/show", timeout=10) as shown:
                job = json.loads(shown.read())[-1]
            if job["status"] != "running":
                run.captured, run.dropped = job.get("captured_cmds"), job.get("dropped_cmds")
                run.notes.append(f"capture: {run.captured} commands captured, {run.dropped} "
                                 f"dropped, in {len(job.get('files', []))} files")
                return
            time.sleep(0.1)
        run.error += f"\nthe capture did not end: {answer}"

    def _restart_proxy(self, run: Run) -> None:
        proxy = self.processes["proxy"]
        run.notes.append(f"proxy had exited with code {proxy.returncode}; restarted")
        proxy.stop()
        new_proxy, port = start_proxy(self.workdir, self.db_addr, self.tls,
                                      workers_toml(self.args.workers))
        self.processes["proxy"], self.ports["proxy"] = new_proxy, port

    def sysbench_cipher(self, target: str) -> tuple[str, str]:
        """Connect to target once as the runs do, with sysbench's debug trace.

        Return the cipher of sysbench's own connection ("" if plaintext) and what went wrong
        ("" if sysbench ran).
        """
        cmd = [
            "sysbench",
            "oltp_point_select",
            *sysbench_options(
                self.ports[target], self.args.tables, self.args.table_size, 1, self.tls
            ),
            "--mysql-debug=on",
            "--events=1",
            "--time=0",
            "run",
        ]
        try:
            result = subprocess.run(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=60,
                check=False,
                cwd=sysbench_cwd(self.tls),
            )
        except subprocess.TimeoutExpired:
            return "", "sysbench timed out after 60 s"
        output = result.stdout.decode(errors="replace")
        match = _SYSBENCH_CIPHER.search(output)  # traced once connected, whatever fails later
        if match is None and result.returncode != 0:
            return "", f"sysbench exited with code {result.returncode}:\n{error_lines(output)}"
        return ("" if match is None or match.group(1) == "(null)" else match.group(1)), ""


def run_sysbench(run: Run, cmd: list[str], timeout: float, cwd: Path | None) -> str:
    """Run sysbench, fill in run's numbers; return what went wrong, or ""."""
    try:
        result = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired as exc:
        # The partial output of a killed run is bytes, whatever text= says.
        output = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        return f"sysbench hung (killed after {timeout:.0f} s):\n{error_lines(output)}"
    output = result.stdout.decode(errors="replace")
    if result.returncode != 0:
        return f"sysbench exited with code {result.returncode}:\n{error_lines(output)}"
    parse_sysbench(run, output)
    return run.error


def check_login(target: str, port: int, tls: TlsFiles | None) -> str:
    """Run SELECT 1 through target's port with the mariadb client; return the error, or "".

    With tls the client verifies the certificate it is shown against the bench's CA, and
    MariaDB's Ssl_cipher for the session (the proxy's backend leg, through the proxy) must not
    be empty: a plaintext connection to MariaDB raises BenchError.
    """
    query = "SELECT 1; SHOW SESSION STATUS LIKE 'Ssl_cipher'" if tls else "SELECT 1"
    tls_options = ["--ssl", f"--ssl-ca={tls.ca}", "--ssl-verify-server-cert"] if tls else []
    cmd = [
        "mariadb",
        "--no-defaults",
        f"-h{HOST}",
        f"-P{port}",
        f"-u{USER}",
        f"-p{PASSWORD}",
        *tls_options,
        "--batch",
        "--skip-column-names",
        "-e",
        query,
        DATABASE,
    ]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return f"{query} timed out after 20 s"
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    if result.returncode != 0 or not rows or rows[0] != ["1"]:
        return f"{query} failed: {(result.stdout + result.stderr).strip()}"
    if tls and (len(rows) < 2 or len(rows[1]) < 2 or not rows[1][1].strip()):
        raise BenchError(
            f"--tls: the connection through {target} (port {port}) reaches MariaDB in plaintext "
            f"(Ssl_cipher is empty): {result.stdout.strip()!r}"
        )
    return ""


def check_tls_login(bench: Bench, target: str) -> str:
    """Log in through target as sysbench and as the mariadb client; return the error, or "".

    Both legs must be TLS: sysbench's own connection (to the proxy, or end to end to MariaDB),
    and the connection MariaDB sees (the proxy's backend leg). A plaintext one raises BenchError;
    a target that cannot be reached at all is only reported, as without --tls.
    """
    cipher, error = bench.sysbench_cipher(target)
    if error:
        return f"sysbench could not connect: {error}"
    if not cipher:
        raise BenchError(f"--tls: sysbench's connection to {target} is not TLS")
    return check_login(target, bench.ports[target], bench.tls)


# --- report -------------------------------------------------------------------------------


def write_json(path: Path, args: argparse.Namespace, **sections: Any) -> None:
    """The run's settings and machine, then `sections`, as JSON (the benches' --json)."""
    settings = {key: str(value) if isinstance(value, Path) else value
                for key, value in vars(args).items()}
    machine = {"cpus": os.cpu_count(), "python": platform.python_version()}
    path.write_text(json.dumps({"settings": settings, "machine": machine, **sections}, indent=2))


def _median(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def summarize(runs: list[Run], workload: str,
              targets: Sequence[str] = TARGETS) -> dict[str, Any]:
    per_target: dict[str, dict[str, Any]] = {}
    for target in targets:
        ok = [
            run
            for run in runs
            if run.target == target and run.workload == workload and not run.error
        ]
        total = sum(1 for run in runs if run.target == target and run.workload == workload)
        per_target[target] = {
            "qps": _median([run.qps for run in ok]),
            "p95_ms": _median([run.p95_ms for run in ok]),
            "cpu_s_per_1k": _median([run.cpu_per_1k for run in ok]),
            "ok_runs": len(ok),
            "runs": total,
        }

    def ratio(key: str, top: str, bottom: str) -> float | None:
        a, b = per_target[top][key], per_target[bottom][key]
        return a / b if a is not None and b else None

    pairs = [("proxy", "direct"), ("proxy", "haproxy")]
    for variant in ("capture", "replay"):
        if variant in targets:
            pairs += [(variant, "proxy"), (variant, "haproxy")]
    if SCRAPED in targets:
        pairs += [(SCRAPED, "haproxy")]
    for yardstick in YARDSTICKS:
        if yardstick in targets:
            pairs += [("proxy", yardstick), (yardstick, "haproxy")]
    ratios = {
        f"{key}_{top}/{bottom}": ratio(key, top, bottom)
        for key in ("qps", "p95_ms", "cpu_s_per_1k")
        for top, bottom in pairs
        if not (key == "cpu_s_per_1k" and bottom == "direct")
    }
    return {"targets": per_target, "ratios": ratios}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(title: str, summary: dict[str, Any]) -> None:
    print(f"\n== {title} ==")
    width = max(9, *map(len, summary["targets"]))
    print(f"{'target':<{width}} {'QPS':>10} {'p95 ms':>8} {'CPU s/1k q':>11} {'runs ok':>8}")
    for target, row in summary["targets"].items():
        print(
            f"{target:<{width}} {_fmt(row['qps'], '.1f'):>10} {_fmt(row['p95_ms'], '.2f'):>8} "
            f"{_fmt(row['cpu_s_per_1k'], '.4f'):>11} {row['ok_runs']:>4}/{row['runs']}"
        )
    r = summary["ratios"]
    for top, bottom in (("proxy", "direct"), ("proxy", "haproxy"), ("capture", "proxy"),
                        ("capture", "haproxy"), ("replay", "proxy"), ("replay", "haproxy"),
                        ("proxy", BARE), (BARE, "haproxy"), ("proxy", EPOLL),
                        (EPOLL, "haproxy")):
        if f"qps_{top}/{bottom}" not in r:
            continue
        line = (
            f"{top}/{bottom:<8} QPS x{_fmt(r[f'qps_{top}/{bottom}'], '.3f')}"
            f"  p95 x{_fmt(r[f'p95_ms_{top}/{bottom}'], '.2f')}"
        )
        if bottom != "direct":
            line += f"  CPU/query x{_fmt(r[f'cpu_s_per_1k_{top}/{bottom}'], '.2f')}"
        print(line)
    if f"qps_{SCRAPED}/haproxy" in r:
        scraped, plain = r[f"qps_{SCRAPED}/haproxy"], r["qps_proxy/haproxy"]
        change = "-" if scraped is None or plain is None else f"{scraped - plain:+.3f}"
        print(f"scraped/haproxy QPS x{_fmt(scraped, '.3f')}"
              f"  CPU/query x{_fmt(r[f'cpu_s_per_1k_{SCRAPED}/haproxy'], '.2f')}"
              f"  (QPS ratio {change} with /metrics scraped every second)")


def print_problems(runs: list[Run]) -> None:
    for run in runs:
        if run.error or run.notes:
            print(f"\n-- {run.workload} / {run.target} / round {run.round}:")
            if run.error:
                print(f"FAILED: {run.error.strip()}")
            for note in run.notes:
                print(note)


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workloads",
        default=",".join(DEFAULT_WORKLOADS),
        help=f"comma-separated, from: {', '.join(WORKLOADS)}",
    )
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument(
        "--workers", type=int, default=1,
        help="the proxy's [proxy] workers and HAProxy's nbthread (default 1)",
    )
    parser.add_argument("--time", type=int, default=20, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tables", type=int, default=4)
    parser.add_argument("--table-size", type=int, default=10_000)
    parser.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="seconds of oltp_read_only per target before measuring (0: none)",
    )
    parser.add_argument(
        "--db-ps-mode",
        choices=("auto", "disable"),
        help="sysbench's --db-ps-mode (default: sysbench's, auto)",
    )
    parser.add_argument("--json", type=Path, help="write every run and the summaries here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--quick", action="store_true", help="smoke check: 5 s runs, 1 round, no warm-up"
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="every connection to MariaDB is TLS; through the proxy, both legs",
    )
    parser.add_argument(
        "--capture",
        action="store_true",
        help="also run the proxy with a traffic capture running (target 'capture')",
    )
    parser.add_argument(
        "--transaction-replay",
        action="store_true",
        help="also run the proxy with [proxy] transaction-replay = true (target 'replay')",
    )
    parser.add_argument(
        "--scrape", action="store_true",
        help=f"also measure the proxy while /metrics is scraped every second ({SCRAPED})",
    )
    parser.add_argument(
        "--bare-relay", action="store_true",
        help=f"also measure bench/bare_relay.py, which forwards bytes unread ({BARE}), and "
             f"its C epoll variant ({EPOLL})",
    )
    args = parser.parse_args(argv)
    if args.bare_relay and args.tls:
        parser.error("--bare-relay does not do TLS: it cannot be measured with --tls")
    if args.quick:
        args.time, args.rounds, args.warmup = 5, 1, 0
    unknown = set(args.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    return args


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    workdir = Path(tempfile.mkdtemp(prefix="tiproxy-bench-"))
    try:
        yield workdir
    finally:
        if keep:
            print(f"\nkept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _raise_exit(signum: int, _frame: object) -> None:
    print("terminated: stopping everything", file=sys.stderr)
    raise SystemExit(128 + signum)


def run_all(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> list[Run]:
    tls = make_tls_files(workdir) if args.tls else None
    server = start_database(workdir, args.tables, args.table_size, tls)
    stack.callback(server.stop)
    processes: dict[str, ChildProcess] = {}
    ports = {"direct": server.port}

    def stop_targets() -> None:
        for process in processes.values():
            process.stop()

    stack.callback(stop_targets)
    processes["proxy"], ports["proxy"] = start_proxy(workdir, server.addr, tls,
                                                     workers_toml(args.workers))
    processes["haproxy"], ports["haproxy"] = start_haproxy(workdir, server.addr, args.workers)
    if args.bare_relay:
        for name in YARDSTICKS:
            processes[name], ports[name] = start_bare_relay(workdir, server.addr, name)
    bench = Bench(args, workdir, ports, processes, server.addr, tls)
    for target in (*TARGETS, *YARDSTICKS) if args.bare_relay else TARGETS:
        if tls is None:
            error = check_login(target, bench.ports[target], None)
        else:
            error = check_tls_login(bench, target)
        print(f"login through {target}: {error or ('ok, TLS' if tls else 'ok')}", flush=True)
    if args.warmup:
        for target in TARGETS:
            warm = bench.run("oltp_read_only", target, 0, args.warmup)
            print(f"warm-up {target}: {warm.error.strip() or f'{warm.qps:.0f} q/s'}", flush=True)
    runs: list[Run] = []
    targets = run_targets(args)
    for workload in args.workloads.split(","):
        for round_ in range(1, args.rounds + 1):
            shift = (round_ - 1) % len(targets)
            for target in targets[shift:] + targets[:shift]:
                run = bench.run(workload, target, round_, args.time)
                runs.append(run)
                status = (
                    "FAILED"
                    if run.error
                    else (
                        f"{run.qps:.1f} q/s, p95 {run.p95_ms:.2f} ms"
                        + (
                            f", CPU {run.cpu_per_1k:.4f} s/1k q"
                            if run.cpu_per_1k is not None
                            else ""
                        )
                    )
                )
                print(f"{workload} round {round_} {target}: {status}", flush=True)
    return runs


def run_targets(args: argparse.Namespace) -> tuple[str, ...]:
    if args.capture:
        targets = CAPTURE_TARGETS
    else:
        targets = REPLAY_TARGETS if args.transaction_replay else TARGETS
    targets = (*targets, *YARDSTICKS) if args.bare_relay else targets
    return (*targets, SCRAPED) if args.scrape else targets


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_exit)
    with workspace(args.keep) as workdir, contextlib.ExitStack() as stack:
        print(
            f"workdir {workdir}; {args.threads} threads, {args.time} s x {args.rounds} rounds, "
            f"{os.cpu_count()} CPUs{', TLS' if args.tls else ''}",
            flush=True,
        )
        try:
            runs = run_all(args, workdir, stack)
        except BenchError as exc:
            print(f"benchmark setup failed: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted: stopping everything", file=sys.stderr)
            return 130
        summaries = {workload: summarize(runs, workload, run_targets(args))
                     for workload in args.workloads.split(",")}
        for workload, summary in summaries.items():
            print_table(f"{workload} (TLS)" if args.tls else workload, summary)
        print_problems(runs)
        if args.json:
            write_json(args.json, args, summaries=summaries,
                       runs=[asdict(run) | {"cpu_s_per_1k": run.cpu_per_1k} for run in runs])
        failed = sum(1 for run in runs if run.error)
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
