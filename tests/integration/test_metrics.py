"""TiProxy's metric families count what happened: commands and their bytes and packets, logins
and how sessions ended, moves and what pins a session, dial failures, health checks, the
proxy's processes. Each test reads /metrics as a scraper does, before and after what it does."""

from __future__ import annotations

import time
from pathlib import Path

import pymysql
import pytest

from support.backends import ADMIN_TOML, APP
from support.metrics import Scrape, scrape
from support.proxy import WORKERS, ProxyFactory, ProxyProcess
from tiproxy.playground.mariadb import AppUser, MariaDBServer
from tiproxy.playground.ports import free_port

pytestmark = pytest.mark.integration

QUERIES = 20


def _pss(pid: int) -> int:
    """A process's proportional set size in bytes, as the kernel counts it."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return next(int(line.split()[1]) * 1024 for line in rollup.splitlines()
                if line.startswith("Pss:"))


def _wait_for(proxy: ProxyProcess, ready: object, timeout: float = 15.0) -> Scrape:
    """Scrape until `ready(scrape)` holds; that scrape."""
    deadline = time.monotonic() + timeout
    while True:
        now = scrape(proxy)
        if ready(now):  # type: ignore[operator]
            return now
        assert time.monotonic() < deadline, now.text + proxy.log()[-3000:]
        time.sleep(0.1)


def test_commands_and_their_traffic_are_counted_exactly(
        backends: list[MariaDBServer], proxy_factory: ProxyFactory) -> None:
    addr = backends[0].addr
    proxy = proxy_factory([addr])
    on = {"backend": addr}
    with proxy.connect() as conn, conn.cursor() as cur:
        before = scrape(proxy)
        for _ in range(QUERIES):
            cur.execute("SELECT 1")
        after = scrape(proxy)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert delta("tiproxy_session_query_total", cmd_type="Query", **on) == QUERIES
    assert delta("tiproxy_session_query_duration_seconds_count", cmd_type="Query",
                 **on) == QUERIES
    assert delta("tiproxy_session_query_duration_seconds_sum", cmd_type="Query", **on) > 0
    assert delta("tiproxy_session_query_duration_seconds_bucket", cmd_type="Query",
                 le="+Inf", **on) == QUERIES
    # COM_QUERY "SELECT 1": a 4-byte header, the command byte and 8 bytes of text, one packet
    assert delta("tiproxy_traffic_outbound_packets", **on) == QUERIES
    assert delta("tiproxy_traffic_outbound_bytes", **on) == QUERIES * 13
    # Its result: column count, column definition, EOF, the row, EOF (PyMySQL does not ask
    # for CLIENT_DEPRECATE_EOF)
    assert delta("tiproxy_traffic_inbound_packets", **on) == QUERIES * 5
    response = delta("tiproxy_traffic_inbound_bytes", **on) / QUERIES
    assert response == int(response) and response > 5 * 4
    assert delta("tiproxy_session_query_time_since_conn_creation_seconds_count") == QUERIES
    assert delta("tiproxy_traffic_cross_location_bytes") == 0  # no location labels


def test_logins_and_how_sessions_ended(backends: list[MariaDBServer],
                                       proxy_factory: ProxyFactory) -> None:
    addr = backends[0].addr
    proxy = proxy_factory([addr])
    # The start's probe of the SQL port is a session too, accepted (by a worker) a moment later
    before = _wait_for(proxy, lambda s: s.value("tiproxy_server_create_connection_total") >= 1
                       and s.value("tiproxy_server_disconnection_total") >= 1)
    proxy.connect().close()  # COM_QUIT
    proxy.connect()._force_close()  # the socket closes with no COM_QUIT
    with pytest.raises(pymysql.err.OperationalError, match="1045"):
        proxy.connect(AppUser(APP.name, "not-the-password"))
    proxy.wait_sessions(0)
    after = scrape(proxy)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert delta("tiproxy_server_create_connection_total") == 3
    assert delta("tiproxy_server_disconnection_total", type="success") == 1
    assert delta("tiproxy_server_disconnection_total", type="client network break") == 1
    assert delta("tiproxy_server_disconnection_total", type="auth fail") == 1
    assert delta("tiproxy_session_conn_lifetime_seconds_count") == 3
    assert delta("tiproxy_session_handshake_duration_seconds_count", backend=addr) == 2
    assert delta("tiproxy_backend_get_backend", res="succeed") == 3  # auth comes after
    assert delta("tiproxy_backend_get_backend", res="fail") == 0
    assert delta("tiproxy_backend_get_backend_duration_seconds_count") == 3
    assert after.value("tiproxy_server_connections") == 0


def test_moves_pins_dial_failures_locations_and_health(
        backends: list[MariaDBServer], proxy_factory: ProxyFactory) -> None:
    east, west = backends[0].addr, backends[1].addr
    down = f"127.0.0.1:{free_port()}"  # nothing listens
    proxy = proxy_factory(
        [down, east, west],
        f'\n[proxy.backend-labels]\n"{down}" = {{ zone = "east" }}\n'
        f'"{east}" = {{ zone = "east" }}\n"{west}" = {{ zone = "west" }}\n'
        '[labels]\nzone = "east"\n[balance]\nlabel-name = "zone"\npolicy = "connection"\n'
        '[balance.conn-count]\ncount-ratio-threshold = 1000\n'  # no rebalancing moves
        + ADMIN_TOML)
    # A login takes the backend with the fewest sessions, among equals one that did not fail
    # last (the start's probe of the SQL port may have tried the down one for a greeting). With
    # sessions piling up on the others, a login tries the down one once its retry time has
    # passed, and goes on to the next backend.
    conns = []
    deadline = time.monotonic() + 20
    while scrape(proxy).value("tiproxy_backend_dial_backend_fail", backend=down) < 1:
        assert time.monotonic() < deadline, proxy.log()
        conns.append(proxy.connect())
        time.sleep(0.2)
    on = {s["id"]: s["backend"] for s in proxy.sessions()}
    assert set(on.values()) <= {east, west}
    conn = next(c for c in conns if on[c.thread_id()] == east)
    for other in conns:
        if other is not conn:
            other.close()
    proxy.wait_sessions(1)
    first = _wait_for(proxy, lambda s: s.value("tiproxy_backend_b_status", backend=down) == 0)
    assert first.value("tiproxy_backend_dial_backend_fail", backend=down) >= 1
    assert first.value("tiproxy_backend_b_status", backend=east) == 1
    # The connection policy weighs no label (the location factor is the resource policy's)
    assert first.value("tiproxy_balance_b_score", backend=west, factor="label") == 0
    assert first.value("tiproxy_balance_b_score", backend=east, factor="conn") == 1
    assert first.value("tiproxy_balance_b_score", backend=west, factor="conn") == 0
    assert first.value("tiproxy_balance_b_score", backend=down, factor="status") == 1

    with conn.cursor() as cur:
        cur.execute("CREATE TEMPORARY TABLE held (id INT)")
    proxy.waits(conn.thread_id(), "pinned: temporary tables: held")
    pinned = scrape(proxy)
    assert pinned.value("tiproxy_balance_pending_migrate",
                        **{"from": east, "to": "", "reason": "redirect"}) == 1, (
        pinned.find("tiproxy_balance_pending_migrate"), proxy.sessions(), east, proxy.log())
    assert pinned.value("tiproxy_session_pinned", reason="temporary_table") == 1
    assert pinned.value("tiproxy_session_pinned", reason="named_lock") == 0

    with conn.cursor() as cur:
        cur.execute("DROP TEMPORARY TABLE held")
    assert proxy.wait_moved(conn.thread_id(), east) == west
    moved = _wait_for(proxy, lambda s: s.value("tiproxy_balance_migrate_total") == 1)
    labels = {"from": east, "to": west, "migrate_res": "succeed"}
    assert moved.value("tiproxy_balance_migrate_total", reason="redirect", **labels) == 1
    assert moved.value("tiproxy_balance_migrate_duration_seconds_count", **labels) == 1
    assert not moved.has("tiproxy_balance_pending_migrate")
    assert moved.value("tiproxy_session_pinned") == 0

    with conn.cursor() as cur:  # on a backend of another location now
        for _ in range(QUERIES):
            cur.execute("SELECT 1")
    after = scrape(proxy)
    crossed = after.value("tiproxy_traffic_cross_location_bytes") - moved.value(
        "tiproxy_traffic_cross_location_bytes")
    on_west = sum(after.value(f"tiproxy_traffic_{m}", backend=west)
                  - moved.value(f"tiproxy_traffic_{m}", backend=west)
                  for m in ("inbound_bytes", "outbound_bytes"))
    assert crossed == on_west > QUERIES * 13
    conn.close()

    checked = _wait_for(proxy, lambda s: s.value("tiproxy_backend_health_check_total",
                                                 backend=down, res="fail") >= 2
                        and s.value("tiproxy_backend_health_check_total", backend=east,
                                    res="succeed") >= 2)
    assert checked.value("tiproxy_backend_health_check_total", backend=east, res="fail") == 0
    for addr in (down, east, west):
        assert checked.has("tiproxy_backend_ping_duration_seconds", backend=addr)
    assert checked.value("tiproxy_backend_health_check_seconds") > 0
    assert checked.has("tiproxy_backend_backend_metric", backend=east, metric="threads_running")
    assert not checked.has("tiproxy_backend_backend_metric", backend=down)


def test_the_proxy_and_its_processes(backends: list[MariaDBServer],
                                     proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory([backends[0].addr])
    first = scrape(proxy)
    assert first.types["tiproxy_server_err"] == "counter"  # TiProxy's name, no _total
    assert first.value("tiproxy_server_err", type="worker_died") == 0
    assert first.types["tiproxy_traffic_inbound_bytes"] == "counter"
    assert first.types["tiproxy_session_query_duration_seconds"] == "histogram"
    assert first.value("tiproxy_server_maxprocs") == WORKERS
    assert first.value("tiproxy_server_event", type="start") == 1
    assert first.value("process_cpu_seconds_total") > 0
    started = first.value("process_start_time_seconds")
    assert time.time() - 600 < started < time.time()
    resident = first.value("process_resident_memory_bytes")
    assert 0 < resident <= proxy.rss_kb() * 1024 * 1.1  # shared pages counted once
    if WORKERS > 1:  # the workers' memory and CPU are in, not only the control process's
        control = proxy.proc.pid  # type: ignore[union-attr]
        workers = Path(f"/proc/{control}/task/{control}/children").read_text().split()
        assert len(workers) == WORKERS
        theirs = sum(_pss(int(pid)) for pid in workers)
        # (what the processes hold moves a little between these reads and the scrape)
        assert _wait_for(proxy, lambda s: s.value("process_resident_memory_bytes")
                         > _pss(control) + theirs / 2)
    # The clock monitor's heartbeat: once per 5 s of its rounds on time.
    beat = _wait_for(proxy, lambda s: s.value("tiproxy_monitor_keep_alive_total") >= 1)
    assert beat.value("tiproxy_monitor_time_jump_back_total") == 0
    assert beat.value("process_cpu_seconds_total") >= first.value("process_cpu_seconds_total")
