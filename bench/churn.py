"""Benchmark connection churn: connect, SELECT 1, close, through the proxy, HAProxy and directly.

Theory of operation (DESIGN.md section 9, as bench/sysbench.py): one MariaDB server from the
project's launcher; the proxy (`python -m tiproxy`) and HAProxy (TCP mode) both
forward to it. Each run starts --threads client threads in this process that loop, as fast as
they can for --time seconds, over: connect with mysqlclient (MySQLdb), `SELECT 1`, fetch, close.
Only iterations that complete count; failed ones are counted as errors, and the first distinct
error messages of each run are kept. Each round runs every target once, in an order that rotates
from round to round, so a slow spell of the machine hurts every target alike. The CPU time of the
proxy's and HAProxy's process trees (and of mariadbd) over a run, divided by the connections the
run made, gives CPU seconds per 1,000 connections. The table shows medians across rounds and the
ratios proxy/direct and proxy/haproxy. A second table splits the proxy's and HAProxy's CPU into
user and system time (what the kernel spent on their sockets is about the same for any relay,
so the user time is where a relay's own work shows) and counts the times their threads were
preempted per connection (nonvoluntary context switches, which make each one dearer).

--workers N writes `[proxy] workers = N` into the proxy's config (default 1) and gives HAProxy
as many threads unless --haproxy-threads says otherwise. A proxy that fails to start is reported
and the other targets still run. A proxy that dies is restarted before its next run.

--auth-sync gives the proxy an `auth-sync-user` (and creates it), as a deployment that moves
sessions has: its sessions then get a reusable credential, and the checkpoints that let them
outlive a dead backend (net/recovery.py), which a login's first statements may call for.

--pool N writes `[proxy] backend-pool-size = N` (net/pool.py: a backend connection is kept,
reset, for the next login of the same user) and implies --auth-sync, which that needs.

--bare-relay adds bench/bare_relay.py as a target: a relay on uvloop that forwards bytes both
ways and reads none of them, the least a Python relay can spend per connection (its user time
is the floor under the proxy's).

--idle-sessions N, after the rounds: N connections are opened through the proxy (each runs
`SELECT 1`, so both legs are up) and left idle; the proxy's memory per idle session is (VmRSS of
its process tree with N sessions - VmRSS with none) / N. RLIMIT_NOFILE is raised before anything
is started (the children inherit it) and MariaDB gets a --max-connections above N.

Everything started here is stopped, and the temporary directory removed, on exit, error, Ctrl-C
or SIGTERM.

    .venv/bin/python bench/churn.py --quick
    .venv/bin/python bench/churn.py --threads 4 --time 10 --rounds 3 --json churn.json
    .venv/bin/python bench/churn.py --quick --idle-sessions 2000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import MySQLdb

from tiproxy.playground.install import LauncherError
from tiproxy.playground.mariadb import MariaDBServer
from tiproxy.playground.ports import HOST

sys.path.insert(0, str(Path(__file__).parent))
from sysbench import (
    BARE,
    DATABASE,
    PASSWORD,
    TARGETS,
    USER,
    BenchError,
    ChildProcess,
    start_bare_relay,
    start_haproxy,
    start_mariadb,
    start_proxy,
    tail,
    tree_cpu_seconds,
    tree_pids,
    workers_toml,
    workspace,
    write_json,
)

_CONNECT_TIMEOUT = 5  # seconds; also read and write timeouts, so no thread hangs for long
_JOIN_GRACE = 30.0  # a client thread still running this long after --time is hung
_ERROR_BACKOFF = 0.01  # after a failed iteration, so a refusing target is not hammered
_ERROR_SAMPLES = 5  # distinct error messages kept per run
_DEFAULT_MAX_CONNECTIONS = 2000  # what sysbench.py's server arguments give MariaDB
_CONNECTION_HEADROOM = 200  # MariaDB connections beyond --idle-sessions: checks, the proxy's own
_FD_HEADROOM = 1024
_SETTLE = 1.0  # seconds before reading VmRSS, so the proxy is done with what it was doing


class WrongResultError(Exception):
    """SELECT 1 answered something else."""


# --- clients ------------------------------------------------------------------------------


# --auth-sync: the proxy's own account, which reads the password hashes.
_SYNC_USER, _SYNC_PASSWORD = "churn_sync", "churn-sync-pass"

def connect(port: int) -> Any:
    """A mysqlclient connection to 127.0.0.1:port as the bench's account (MySQLdb is untyped)."""
    return MySQLdb.connect(
        host=HOST,
        port=port,
        user=USER,
        password=PASSWORD,
        database=DATABASE,
        connect_timeout=_CONNECT_TIMEOUT,
        read_timeout=_CONNECT_TIMEOUT,
        write_timeout=_CONNECT_TIMEOUT,
    )


def select_one(conn: Any) -> None:
    cursor = conn.cursor()
    try:
        cursor.execute("SELECT 1")
        rows = cursor.fetchall()
    finally:
        cursor.close()
    if tuple(rows) != ((1,),):
        raise WrongResultError(f"SELECT 1 returned {rows!r}")


def churn_once(port: int) -> None:
    conn = connect(port)
    try:
        select_one(conn)
    finally:
        conn.close()


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass
class ClientResult:
    """What one client thread did; written by that thread only, read after it ends."""

    ok: int = 0
    errors: int = 0
    samples: dict[str, int] = field(default_factory=dict)  # first distinct messages -> count
    finished: float | None = None  # time.monotonic() when the thread ended

    def error(self, message: str) -> None:
        self.errors += 1
        if message in self.samples or len(self.samples) < _ERROR_SAMPLES:
            self.samples[message] = self.samples.get(message, 0) + 1


def client_loop(
    port: int, seconds: float, start: threading.Event, stop: threading.Event, result: ClientResult
) -> None:
    start.wait()
    deadline = time.monotonic() + seconds
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                churn_once(port)
            except (MySQLdb.Error, WrongResultError) as exc:
                result.error(describe(exc))
                time.sleep(_ERROR_BACKOFF)
            else:
                result.ok += 1
    except Exception as exc:  # noqa: BLE001 - reported with the run, never lost in a thread
        result.error(f"client thread crashed: {describe(exc)}")
    finally:
        result.finished = time.monotonic()


@dataclass
class ClientRun:
    seconds: float
    ok: int
    errors: int
    samples: dict[str, int]
    hung: int  # threads still running after the grace period (daemon threads: left behind)


def run_clients(port: int, threads: int, seconds: float) -> ClientRun:
    """Run `threads` churning clients against port for `seconds`; return what they did."""
    start, stop = threading.Event(), threading.Event()
    results = [ClientResult() for _ in range(threads)]
    workers = [
        threading.Thread(
            target=client_loop,
            args=(port, seconds, start, stop, result),
            name=f"churn-client-{i}",
            daemon=True,  # a hung connect must not keep the interpreter alive
        )
        for i, result in enumerate(results)
    ]
    for worker in workers:
        worker.start()
    began = time.monotonic()
    start.set()
    try:
        for worker in workers:
            worker.join(max(0.0, began + seconds + _JOIN_GRACE - time.monotonic()))
    finally:
        stop.set()  # on Ctrl-C or SIGTERM too: the threads end after their current iteration
    hung = sum(1 for worker in workers if worker.is_alive())
    ends = [result.finished for result in results if result.finished is not None]
    ended = time.monotonic() if hung or not ends else max(ends)
    samples: dict[str, int] = {}
    for result in results:
        for message, count in result.samples.items():
            if message in samples or len(samples) < _ERROR_SAMPLES:
                samples[message] = samples.get(message, 0) + count
    return ClientRun(
        seconds=ended - began,
        ok=sum(result.ok for result in results),
        errors=sum(result.errors for result in results),
        samples=samples,
        hung=hung,
    )


# --- memory -------------------------------------------------------------------------------


def tree_rss_kb(pid: int) -> int:
    """The sum of VmRSS (kB) over pid's process tree."""
    total = 0
    for member in tree_pids(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


def tree_cpu_split(pid: int) -> tuple[float, float, int]:
    """(user seconds, system seconds, nonvoluntary context switches) of pid's live process
    tree so far. Children that exited are left out: the targets' processes live through a run."""
    user = system = 0
    preempted = 0
    for member in tree_pids(pid):
        try:
            stat = Path(f"/proc/{member}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            user += int(fields[11])
            system += int(fields[12])
            for task in os.scandir(f"/proc/{member}/task"):
                for line in Path(task.path, "status").read_text().splitlines():
                    if line.startswith("nonvoluntary_ctxt_switches:"):
                        preempted += int(line.split()[1])
        except OSError:  # it exited meanwhile
            continue
    ticks = os.sysconf("SC_CLK_TCK")
    return user / ticks, system / ticks, preempted


def raise_nofile(needed: int) -> str:
    """Raise this process's soft RLIMIT_NOFILE to needed (children inherit it); warn if short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    if soft != resource.RLIM_INFINITY and soft < needed:
        return f"RLIMIT_NOFILE is {soft} (hard limit {hard}), below the {needed} wanted"
    return ""


# --- the bench ----------------------------------------------------------------------------


@dataclass
class Run:
    """One churn run against one target."""

    target: str
    round: int
    seconds: float = 0.0
    connections: int = 0  # successful iterations: connect, SELECT 1, close
    errors: int = 0
    error_samples: dict[str, int] = field(default_factory=dict)
    cpu_seconds: float | None = None  # the proxy's or HAProxy's process tree; None for direct
    # cpu_seconds split: the tree's live processes' time in user space and in the kernel
    # (cpu_seconds also counts children that exited during the run; the targets have none)
    user_seconds: float | None = None
    sys_seconds: float | None = None
    preempted: int | None = None  # the tree's threads' nonvoluntary context switches
    db_cpu_seconds: float | None = None  # mariadbd's
    skipped: str = ""  # why the target could not be measured at all
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.skipped and self.connections > 0

    @property
    def conns_per_s(self) -> float | None:
        return self.connections / self.seconds if self.ok and self.seconds > 0 else None

    def per_1k(self, cpu: float | None) -> float | None:
        return None if cpu is None or not self.ok else cpu / self.connections * 1000

    def as_json(self) -> dict[str, Any]:
        return asdict(self) | {
            "conns_per_s": self.conns_per_s,
            "cpu_s_per_1k": self.per_1k(self.cpu_seconds),
            "db_cpu_s_per_1k": self.per_1k(self.db_cpu_seconds),
            "user_s_per_1k": self.per_1k(self.user_seconds),
            "sys_s_per_1k": self.per_1k(self.sys_seconds),
            "preempted_per_conn": self.per_conn(self.preempted),
        }

    def per_conn(self, count: int | None) -> float | None:
        return None if count is None or not self.ok else count / self.connections


@dataclass
class ChurnBench:
    args: argparse.Namespace
    workdir: Path
    server: MariaDBServer
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, ChildProcess] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # target -> why it did not start

    @property
    def proxy_keys(self) -> str:
        pool = f"backend-pool-size = {self.args.pool}\n" if self.args.pool else ""
        return workers_toml(self.args.workers) + pool

    def stop_targets(self) -> None:
        for process in self.processes.values():
            process.stop()

    @property
    def more_toml(self) -> str:
        if not self.args.auth_sync:
            return ""
        return (f'[security]\nauth-sync-user = "{_SYNC_USER}"\n'
                f'auth-sync-password = "{_SYNC_PASSWORD}"\n')

    def start_proxy(self) -> None:
        try:
            self.processes["proxy"], self.ports["proxy"] = start_proxy(
                self.workdir, self.server.addr, None, self.proxy_keys, self.more_toml
            )
        except BenchError as exc:
            self.processes.pop("proxy", None)
            why = f"the proxy did not start with `[proxy] workers = {self.args.workers}`"
            self.unavailable["proxy"] = f"{why}: {tail(str(exc))}"
        else:
            self.unavailable.pop("proxy", None)

    def start_haproxy(self) -> None:
        try:
            self.processes["haproxy"], self.ports["haproxy"] = start_haproxy(
                self.workdir, self.server.addr, self.args.haproxy_threads or self.args.workers
            )
        except BenchError as exc:
            self.unavailable["haproxy"] = f"HAProxy did not start: {tail(str(exc))}"

    def start_bare_relay(self) -> None:
        try:
            self.processes[BARE], self.ports[BARE] = start_bare_relay(
                self.workdir, self.server.addr, BARE)
        except BenchError as exc:
            self.unavailable[BARE] = f"bench/bare_relay.py did not start: {tail(str(exc))}"

    def ensure_running(self, target: str, run: Run) -> bool:
        """Restart a proxy that died; False (run.skipped set) if target cannot be measured."""
        process = self.processes.get(target)
        if target == "proxy" and process is not None and not process.running:
            run.notes.append(f"the proxy had exited with code {process.returncode}; restarted")
            process.stop()
            self.start_proxy()
        if target in self.unavailable:
            run.skipped = self.unavailable[target]
            return False
        return True

    def run(self, target: str, round_: int, seconds: float) -> Run:
        run = Run(target, round_)
        if not self.ensure_running(target, run):
            return run
        process = self.processes.get(target)
        log_offset = process.log_size() if process else 0
        cpu_before = tree_cpu_seconds(process.pid) if process else None
        split_before = tree_cpu_split(process.pid) if process else None
        db_pid = self.server.pid
        db_before = tree_cpu_seconds(db_pid) if db_pid else None
        clients = run_clients(self.ports[target], self.args.threads, seconds)
        if process is not None:
            if cpu_before is not None and process.running:
                run.cpu_seconds = tree_cpu_seconds(process.pid) - cpu_before
                if split_before is not None:
                    user, system, preempted = tree_cpu_split(process.pid)
                    run.user_seconds = user - split_before[0]
                    run.sys_seconds = system - split_before[1]
                    run.preempted = preempted - split_before[2]
            elif not process.running:
                run.notes.append(f"{target} exited with code {process.returncode} during the run")
            logged = tail(process.log_since(log_offset), 20)
            if logged:
                run.notes.append(f"{target} log during the run:\n{logged}")
        if db_pid and db_before is not None and self.server.pid == db_pid:
            run.db_cpu_seconds = tree_cpu_seconds(db_pid) - db_before
        run.seconds, run.connections = clients.seconds, clients.ok
        run.errors, run.error_samples = clients.errors, clients.samples
        if clients.hung:
            run.notes.append(f"{clients.hung} client thread(s) still hung {_JOIN_GRACE:.0f} s late")
        return run

    def check_login(self, target: str) -> str:
        if target in self.unavailable:
            return "not started"
        try:
            churn_once(self.ports[target])
        except (MySQLdb.Error, WrongResultError) as exc:
            return describe(exc)
        return "ok"


def measure_idle(bench: ChurnBench, sessions: int) -> dict[str, Any]:
    """Open `sessions` idle connections through the proxy; its memory per session, in kB."""
    result: dict[str, Any] = {"sessions": sessions}
    probe = Run("proxy", 0)
    if not bench.ensure_running("proxy", probe):
        result["error"] = probe.skipped
        return result
    proxy = bench.processes["proxy"]
    time.sleep(_SETTLE)
    before = tree_rss_kb(proxy.pid)
    conns: list[Any] = []
    began = time.monotonic()
    try:
        for _ in range(sessions):
            try:
                conn = connect(bench.ports["proxy"])
            except MySQLdb.Error as exc:
                result["error"] = f"session {len(conns) + 1} failed: {describe(exc)}"
                break
            conns.append(conn)
            try:
                select_one(conn)  # both legs of the session are up
            except (MySQLdb.Error, WrongResultError) as exc:
                result["error"] = f"session {len(conns)} failed: {describe(exc)}"
                break
        result["open_seconds"] = time.monotonic() - began
        time.sleep(_SETTLE)
        with_sessions = tree_rss_kb(proxy.pid) if proxy.running else None
    finally:
        for conn in conns:
            with contextlib.suppress(MySQLdb.Error):
                conn.close()
    opened = len(conns)
    time.sleep(_SETTLE)
    result |= {
        "opened": opened,
        "rss_kb_before": before,
        "rss_kb_with_sessions": with_sessions,
        "rss_kb_after_close": tree_rss_kb(proxy.pid) if proxy.running else None,
        "kb_per_session": (
            (with_sessions - before) / opened if with_sessions is not None and opened else None
        ),
    }
    if not proxy.running:
        result["error"] = f"the proxy exited with code {proxy.returncode}"
    return result


# --- report -------------------------------------------------------------------------------


def _median(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top is not None and bottom else None


def summarize(runs: list[Run]) -> dict[str, Any]:
    per_target: dict[str, dict[str, Any]] = {}
    measured = dict.fromkeys((*TARGETS, *(run.target for run in runs)))  # (--bare-relay's too)
    for target in measured:
        mine = [run for run in runs if run.target == target]
        ok = [run for run in mine if run.ok]
        per_target[target] = {
            "conns_per_s": _median([run.conns_per_s for run in ok]),
            "cpu_s_per_1k": _median([run.per_1k(run.cpu_seconds) for run in ok]),
            "db_cpu_s_per_1k": _median([run.per_1k(run.db_cpu_seconds) for run in ok]),
            "user_s_per_1k": _median([run.per_1k(run.user_seconds) for run in ok]),
            "sys_s_per_1k": _median([run.per_1k(run.sys_seconds) for run in ok]),
            "preempted_per_conn": _median([run.per_conn(run.preempted) for run in ok]),
            "connections": sum(run.connections for run in mine),
            "errors": sum(run.errors for run in mine),
            "ok_runs": len(ok),
            "runs": len(mine),
        }
    proxy, direct, haproxy = (per_target[t] for t in ("proxy", "direct", "haproxy"))
    ratios = {
        **({"conns_per_s_bare_relay/haproxy": _ratio(per_target[BARE]["conns_per_s"],
                                                     haproxy["conns_per_s"])}
           if BARE in per_target else {}),
        "conns_per_s_proxy/direct": _ratio(proxy["conns_per_s"], direct["conns_per_s"]),
        "conns_per_s_proxy/haproxy": _ratio(proxy["conns_per_s"], haproxy["conns_per_s"]),
        "cpu_s_per_1k_proxy/haproxy": _ratio(proxy["cpu_s_per_1k"], haproxy["cpu_s_per_1k"]),
    }
    return {"targets": per_target, "ratios": ratios}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(title: str, summary: dict[str, Any]) -> None:
    print(f"\n== {title} ==")
    print(
        f"{'target':<9} {'conn/s':>9} {'CPU s/1k conn':>14} {'DB CPU s/1k':>12} "
        f"{'errors':>7} {'runs ok':>8}"
    )
    for target, row in summary["targets"].items():
        print(
            f"{target:<9} {_fmt(row['conns_per_s'], '.1f'):>9} "
            f"{_fmt(row['cpu_s_per_1k'], '.4f'):>14} {_fmt(row['db_cpu_s_per_1k'], '.4f'):>12} "
            f"{row['errors']:>7} {row['ok_runs']:>4}/{row['runs']}"
        )
    print(f"{'target':<9} {'user s/1k conn':>15} {'sys s/1k conn':>14} {'preempted/conn':>15}")
    for target, row in summary["targets"].items():
        if row["user_s_per_1k"] is not None:
            print(
                f"{target:<9} {_fmt(row['user_s_per_1k'], '.4f'):>15} "
                f"{_fmt(row['sys_s_per_1k'], '.4f'):>14} "
                f"{_fmt(row['preempted_per_conn'], '.1f'):>15}"
            )
    r = summary["ratios"]
    print(f"proxy/direct   conn/s x{_fmt(r['conns_per_s_proxy/direct'], '.3f')}")
    print(
        f"proxy/haproxy  conn/s x{_fmt(r['conns_per_s_proxy/haproxy'], '.3f')}"
        f"  CPU/conn x{_fmt(r['cpu_s_per_1k_proxy/haproxy'], '.1f')}"
    )
    if "conns_per_s_bare_relay/haproxy" in r:
        print(f"{BARE}/haproxy  conn/s x{_fmt(r['conns_per_s_bare_relay/haproxy'], '.3f')}")


def print_idle(idle: dict[str, Any]) -> None:
    print(f"\n== idle sessions through the proxy: {idle['sessions']} ==")
    if "opened" in idle:
        print(
            f"opened {idle['opened']}/{idle['sessions']} in {idle['open_seconds']:.1f} s; "
            f"proxy VmRSS {idle['rss_kb_before']} kB with 0 sessions, "
            f"{_fmt(idle['rss_kb_with_sessions'], 'd')} kB with {idle['opened']}, "
            f"{_fmt(idle['rss_kb_after_close'], 'd')} kB after closing them"
        )
        print(f"memory per idle session: {_fmt(idle['kb_per_session'], '.1f')} kB")
    if "error" in idle:
        print(f"FAILED: {idle['error']}")


def print_problems(bench: ChurnBench, runs: list[Run]) -> None:
    reported = set()
    for run in runs:
        if run.skipped and run.target not in reported:
            reported.add(run.target)
            print(f"\n-- {run.target}: not measured: {run.skipped}")
        elif run.errors or run.notes or not run.ok:
            print(f"\n-- {run.target} / round {run.round}:")
            if run.errors or not run.ok:
                print(f"{run.errors} failed iterations, {run.connections} succeeded; first errors:")
                for message, count in run.error_samples.items():
                    print(f"  {count} x {message}")
            for note in run.notes:
                print(note)
    for target, why in bench.unavailable.items():
        if target not in reported:
            print(f"\n-- {target}: {why}")


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    assert __doc__ is not None
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--time", type=float, default=10, help="seconds per run (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--warmup", type=float, default=2, help="seconds of churn per target before measuring"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="the proxy's [proxy] workers (default 1)"
    )
    parser.add_argument(
        "--haproxy-threads", type=int, help="HAProxy's nbthread (default: --workers)"
    )
    parser.add_argument(
        "--idle-sessions",
        type=int,
        default=0,
        metavar="N",
        help="after the rounds, the proxy's memory per idle session with N sessions open",
    )
    parser.add_argument(
        "--auth-sync",
        action="store_true",
        help="give the proxy an auth-sync-user, as a deployment that moves sessions has "
        "(its sessions get a reusable credential, and with it the checkpoints of net/recovery.py)",
    )
    parser.add_argument(
        "--pool",
        type=int,
        default=0,
        metavar="N",
        help="[proxy] backend-pool-size = N: logins reuse kept backend connections (implies "
        "--auth-sync)",
    )
    parser.add_argument(
        "--bare-relay", action="store_true",
        help=f"also measure bench/bare_relay.py ({BARE}), a relay on uvloop that reads no byte: "
        "the least a Python relay spends per connection",
    )
    parser.add_argument("--json", type=Path, help="write every run and the summary here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--quick", action="store_true", help="smoke check: 3 s runs, 1 round, no warm-up"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.time, args.rounds, args.warmup = 3, 1, 0
    if args.threads < 1 or args.rounds < 1 or args.time <= 0 or args.idle_sessions < 0 \
            or args.pool < 0:
        parser.error("--threads, --rounds and --time must be positive, --idle-sessions and "
                     "--pool >= 0")
    args.auth_sync = args.auth_sync or bool(args.pool)
    return args


def _raise_exit(signum: int, _frame: object) -> None:
    print("terminated: stopping everything", file=sys.stderr)
    raise SystemExit(128 + signum)


def run_all(
    args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack
) -> tuple[ChurnBench, list[Run], dict[str, Any] | None]:
    wanted = args.idle_sessions + _CONNECTION_HEADROOM
    server_args = [f"--max-connections={wanted}"] if wanted > _DEFAULT_MAX_CONNECTIONS else []
    server = start_mariadb(workdir, None, server_args)
    stack.callback(server.stop)
    if args.auth_sync:
        server.sql(f"CREATE USER '{_SYNC_USER}'@'%' IDENTIFIED BY '{_SYNC_PASSWORD}'; "
                   f"GRANT SELECT ON mysql.* TO '{_SYNC_USER}'@'%';")
    bench = ChurnBench(args, workdir, server, ports={"direct": server.port})
    stack.callback(bench.stop_targets)
    bench.start_proxy()
    bench.start_haproxy()
    targets = TARGETS
    if args.bare_relay:
        bench.start_bare_relay()
        targets = (*TARGETS, BARE)
    for target, why in bench.unavailable.items():
        print(f"{target}: not measured: {why}", flush=True)
    for target in targets:
        print(f"login through {target}: {bench.check_login(target)}", flush=True)
    if args.warmup:
        for target in targets:
            warm = bench.run(target, 0, args.warmup)
            status = warm.skipped or f"{_fmt(warm.conns_per_s, '.0f')} conn/s"
            print(f"warm-up {target}: {status}", flush=True)
    runs: list[Run] = []
    for round_ in range(1, args.rounds + 1):
        shift = (round_ - 1) % len(targets)
        for target in targets[shift:] + targets[:shift]:
            run = bench.run(target, round_, args.time)
            runs.append(run)
            if run.skipped:
                status = "not measured"
            else:
                status = f"{_fmt(run.conns_per_s, '.1f')} conn/s, {run.errors} errors"
                if run.ok and run.cpu_seconds is not None:
                    status += f", CPU {_fmt(run.per_1k(run.cpu_seconds), '.4f')} s/1k conn"
            print(f"round {round_} {target}: {status}", flush=True)
    idle = measure_idle(bench, args.idle_sessions) if args.idle_sessions else None
    return bench, runs, idle


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_exit)
    # Before anything starts: the proxy inherits the limit and holds two sockets per session.
    limit_warning = raise_nofile(2 * args.idle_sessions + _FD_HEADROOM)
    if limit_warning:
        print(f"warning: {limit_warning}", file=sys.stderr)
    with workspace(args.keep) as workdir, contextlib.ExitStack() as stack:
        print(
            f"workdir {workdir}; {args.threads} threads, {args.time:g} s x {args.rounds} rounds, "
            f"{os.cpu_count()} CPUs"
            + f", [proxy] workers = {args.workers}"
            + (f", backend-pool-size = {args.pool}" if args.pool else "")
            + ", HAProxy nbthread = "
            f"{args.haproxy_threads or args.workers}"
            + (f", then {args.idle_sessions} idle sessions" if args.idle_sessions else ""),
            flush=True,
        )
        try:
            bench, runs, idle = run_all(args, workdir, stack)
        except (BenchError, LauncherError) as exc:
            print(f"benchmark setup failed: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted: stopping everything", file=sys.stderr)
            return 130
        summary = summarize(runs)
        print_table(
            f"connection churn: connect, SELECT 1, close; {args.threads} threads, "
            f"{args.time:g} s x {args.rounds} rounds (medians)",
            summary,
        )
        if idle is not None:
            print_idle(idle)
        print_problems(bench, runs)
        if args.json:
            write_json(args.json, args, unavailable=bench.unavailable, summary=summary,
                       runs=[run.as_json() for run in runs], idle_sessions=idle)
        failed = any(run.errors or not run.ok for run in runs) or bool(idle and ("error" in idle))
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
