"""Benchmark (not a test): how long a session's next query waits while it moves, and how many
sessions per second the proxy moves.

    .venv/bin/python bench/migration.py [--moves 300] [--sessions 300]

Two MariaDB servers from the project's launcher, the proxy in front of them with
`[security] auth-sync-user` so that sessions can log in elsewhere.
- Pause: one session holding 10 user variables, a changed sql_mode and time_zone and 5 server-side
  prepared statements (mysql-connector's prepared cursors) is moved back and forth `--moves` times
  with POST /api/debug/redirect. For each move it reports the move's duration as the proxy logs
  it (capture, login elsewhere, restore, swap) and the latency of the client's next query, sent
  right after the redirect was accepted: that query waits for the move.
- Throughput: `--sessions` idle sessions, each with a few user variables, are all moved at once;
  the figure is sessions moved per second until the last one has moved.
- A backend's death: `--crashes` times, `--sessions` idle sessions with state, and the server
  half of them are on is killed with SIGKILL; each of its sessions sends its next query at that
  moment, from a thread of its own, and waits while the proxy rebuilds it on the other server
  (net/recovery.py). The figure is that query's latency, and every session's state afterwards.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import mysql.connector
import pymysql

from tiproxy.playground.mariadb import MariaDBServer, create_app_user
from tiproxy.playground.ports import free_port

sys.path.insert(0, str(Path(__file__).parent))
from sysbench import ChildProcess, wait_for_port

USER, PASSWORD = "bench", "bench-pass"
ADMIN, ADMIN_PASSWORD = "tiproxy_admin", "admin-pass"
_MOVED = re.compile(r"session (\d+) moved .* in ([0-9.]+) ms")


def start_servers(workdir: Path) -> list[MariaDBServer]:
    servers = []
    for i in range(2):
        server = MariaDBServer(workdir / f"db{i}", extra_args=["--max-connections=2000"])
        servers.append(server)
        server.start()
        create_app_user(server, USER, PASSWORD)
        create_app_user(server, ADMIN, ADMIN_PASSWORD)
    return servers


def start_proxy(workdir: Path, servers: list[MariaDBServer]) -> tuple[ChildProcess, int, int]:
    port, api_port = free_port(), free_port()
    addrs = ", ".join(f'"{s.addr}"' for s in servers)
    config = workdir / "proxy.toml"
    config.write_text(
        f'[proxy]\naddr = "127.0.0.1:{port}"\nbackend-addrs = [{addrs}]\n'
        f'[api]\naddr = "127.0.0.1:{api_port}"\n[log]\nlevel = "info"\n'
        f'[security]\nauth-sync-user = "{ADMIN}"\nauth-sync-password = "{ADMIN_PASSWORD}"\n'
    )
    proxy = ChildProcess("proxy", [sys.executable, "-m", "tiproxy", "--config", str(config)],
                         workdir / "proxy.log")
    proxy.spawn()
    wait_for_port(port, time.monotonic() + 30, proxy)
    wait_for_port(api_port, time.monotonic() + 30, proxy)
    time.sleep(0.5)  # the first credential sync
    return proxy, port, api_port


def redirect(api_port: int) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{api_port}/api/debug/redirect",
                                     data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=10) as answer:
        answer.read()


def moved_count(api_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tiproxy_balance_migrate_total{")
               and 'migrate_res="succeed"' in line)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def pause_run(proxy: ChildProcess, port: int, api_port: int, moves: int) -> None:
    conn = mysql.connector.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD,
                                   database="test", use_pure=True, autocommit=True)
    cur = conn.cursor()
    cur.execute("SET " + ", ".join(f"@v{i} = {i * 1.5}" for i in range(10)))
    cur.execute("SET SESSION sql_mode = 'ANSI_QUOTES', time_zone = '+02:00'")
    prepared = [conn.cursor(prepared=True) for _ in range(5)]
    ops = [f"SELECT ? + {k}" for k in range(5)]
    for op, pc in zip(ops, prepared, strict=True):
        pc.execute(op, (1,))
        pc.fetchall()
    offset = proxy.log_size()
    waits = []
    failures = 0
    for i in range(moves):
        redirect(api_port)
        started = time.perf_counter()
        cur.execute("SELECT @v3")
        cur.fetchall()
        waits.append((time.perf_counter() - started) * 1000)
        pc = prepared[i % 5]
        pc.execute(ops[i % 5], (i,))
        if pc.fetchall() != [(i + i % 5,)]:
            failures += 1
        time.sleep(0.005)
    conn.close()
    durations = [float(m.group(2)) for m in _MOVED.finditer(proxy.log_since(offset))]
    print(f"\n== migration pause: {moves} moves of one session "
          "(10 user variables, 5 prepared statements) ==")
    print(f"moves done {len(durations)}/{moves}, wrong results {failures}")
    if durations:
        print(f"move duration (proxy)      p50 {percentile(durations, 50):6.2f} ms   "
              f"p99 {percentile(durations, 99):6.2f} ms   max {max(durations):6.2f} ms")
    print(f"next query waits (client)  p50 {percentile(waits, 50):6.2f} ms   "
          f"p99 {percentile(waits, 99):6.2f} ms   max {max(waits):6.2f} ms")


def throughput_run(port: int, api_port: int, sessions: int) -> None:
    conns = []
    for i in range(sessions):
        conn = pymysql.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD,
                               database="test")
        with conn.cursor() as cur:
            cur.execute(f"SET @a = {i}, @b = 'x{i}', @c = {i}.5")
        conns.append(conn)
    before = moved_count(api_port)
    started = time.perf_counter()
    redirect(api_port)
    while moved_count(api_port) < before + sessions:
        if time.perf_counter() - started > 120:
            break
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    done = moved_count(api_port) - before
    wrong = 0
    for i, conn in enumerate(conns):
        with conn.cursor() as cur:
            cur.execute("SELECT @a, @b")
            if cur.fetchone() != (i, f"x{i}"):
                wrong += 1
        conn.close()
    print(f"\n== migration throughput: {sessions} idle sessions moved at once ==")
    print(f"moved {done:.0f} in {elapsed:.2f} s: {done / elapsed:.0f} sessions/s; "
          f"sessions with wrong state afterwards: {wrong}")


def crash_run(servers: list[MariaDBServer], port: int, sessions: int, crashes: int) -> None:
    waits: list[float] = []
    wrong = lost = 0
    for crash in range(crashes):
        conns = []
        for i in range(sessions):
            conn = pymysql.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD,
                                   database="test", autocommit=True)
            with conn.cursor() as cur:
                cur.execute(f"SET @a = {i}, @b = 'x{i}', time_zone = '+0{i % 9}:00'")
                cur.execute("SELECT @@port")
                conns.append((i, conn, cur.fetchone()[0]))
        doomed = servers[crash % 2]
        victims = [(i, c) for i, c, p in conns if p == doomed.port]
        start = threading.Barrier(len(victims) + 1)
        results: list[Any] = [None] * len(victims)

        def next_query(slot: int, conn: Any, start: threading.Barrier = start,
                       results: list[Any] = results) -> None:
            start.wait()
            began = time.perf_counter()
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT @a, @b, @@time_zone")
                    results[slot] = (cur.fetchone(), (time.perf_counter() - began) * 1000)
            except pymysql.Error as exc:
                results[slot] = exc

        threads = [threading.Thread(target=next_query, args=(k, c))
                   for k, (_, c) in enumerate(victims)]
        for thread in threads:
            thread.start()
        doomed.kill()
        start.wait()
        for thread in threads:
            thread.join(60)
        for (i, _), result in zip(victims, results, strict=True):
            if not isinstance(result, tuple):
                lost += 1
                continue
            row, ms = result
            waits.append(ms)
            wrong += row != (i, f"x{i}", f"+0{i % 9}:00")
        for _, conn, _ in conns:
            conn.close()
        doomed.start()
        time.sleep(1)  # back in the proxy's backends (its next health check)
    print(f"\n== a backend killed under idle sessions: {crashes} crashes, {sessions} sessions "
          "each (half on the killed server) ==")
    print(f"sessions rebuilt {len(waits)}, lost {lost}, with wrong state {wrong}")
    if waits:
        print(f"next query waits (client)  p50 {percentile(waits, 50):6.2f} ms   "
              f"p99 {percentile(waits, 99):6.2f} ms   max {max(waits):6.2f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moves", type=int, default=300)
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--crashes", type=int, default=3,
                        help="times a backend is killed under --sessions idle sessions (0: none)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="tiproxy-bench-migration-"))
    servers: list[MariaDBServer] = []
    proxy = None
    try:
        servers = start_servers(workdir)
        proxy, port, api_port = start_proxy(workdir, servers)
        pause_run(proxy, port, api_port, args.moves)
        throughput_run(port, api_port, args.sessions)
        if args.crashes:
            crash_run(servers, port, args.sessions, args.crashes)
    finally:
        if proxy is not None:
            proxy.stop()
        for server in servers:
            server.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
