"""Health checks: is each backend fit to take sessions, and how loaded is it.

Every `[health] interval` each backend is checked once; a check still running when the next is
due is not doubled (a hung backend cannot pile checks up), and each has `timeout` to finish.
A check must:
- accept a TCP connection and send its greeting (a SIGSTOPped server accepts but never greets);
- with `[security] auth-sync-user`, log in and answer SHOW GLOBAL STATUS: a MariaDB Galera node
  must be `wsrep_ready = ON` and Synced (`wsrep_local_state = 4`), since a joining, donor or
  desynced node refuses or delays queries; Threads_running and the Questions rate give the load;
- for TiDB (a status port in its topology), answer `GET /status` on the status port; its
  `/metrics` (process_cpu_seconds_total) gives the load.
A session whose Galera node answers 1047 (WSREP not ready: the node left the primary component
or is shutting down) puts the node in doubt: it is checked at once, and until a check passes it is
tried last for new sessions and gets no balancing moves, so that clients reconnecting after the
error do not land on it again before `failure-threshold` checks have failed.
A backend at its max_connections, which refuses the check's connection with 1040, is full, not
down: that check gives no verdict either way (a health check must not turn a full server into
"no backend" for every login; sessions' own logins get its 1040, net/login_route.py).
`failure-threshold` failures in a row mark a backend unhealthy (it gets no new sessions and its
sessions move away while it still answers); `success-threshold` successes mark it healthy again.
The checks run in the event loop but never touch the data path: they are separate connections
with their own timeouts. For the metrics they keep each backend's last check time and its
results, and how long the last round took (until its slowest check ended).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from tiproxy.balance.router import Backend, Router
from tiproxy.client.admin import AdminConnection
from tiproxy.client.channel import sql_error
from tiproxy.client.leg import BackendLeg
from tiproxy.protocol.constants import ER_CON_COUNT_ERROR
from tiproxy.protocol.errors import ProtocolError, SQLError
from tiproxy.protocol.packets import parse_greeting

if TYPE_CHECKING:
    from tiproxy.config import Config

log = logging.getLogger("tiproxy.health")

STATUS_SQL = ("SHOW GLOBAL STATUS WHERE Variable_name IN "
              "('wsrep_ready', 'wsrep_local_state', 'wsrep_local_state_comment', "
              "'Threads_running', 'Questions')")
VARIABLES_SQL = ("SHOW GLOBAL VARIABLES WHERE Variable_name IN "
                 "('wsrep_on', 'init_connect', 'max_user_connections')")
GALERA_SYNCED = "4"
SMOOTHING = 0.5  # weight of the newest load sample
METRICS_LIMIT = 4 << 20  # bytes of a TiDB's /metrics read: enough for its own, bounded


@dataclass
class _Streak:
    failures: int = 0
    successes: int = 0
    questions: float = -1.0
    questions_at: float = 0.0
    cpu_seconds: float = -1.0
    cpu_at: float = 0.0


class HealthChecker:
    def __init__(self, router: Router, config: Config,
                 admin_tls: Callable[[], dict[str, Any]] = dict,
                 cluster_tls: Callable[[], ssl.SSLContext | None] = lambda: None) -> None:
        self.router = router
        self.config = config
        self.admin_tls = admin_tls  # the TLS arguments of the checks' logins (CertStore's)
        self.cluster_tls = cluster_tls  # for TiDB's status port
        self._running: dict[str, asyncio.Task[None]] = {}
        self._streaks: dict[str, _Streak] = {}
        self.cycle_seconds = 0.0  # the last round of check_all, until its last check ended
        self.probe_seconds: dict[str, float] = {}  # backend -> its last check's time
        self.results: Counter[tuple[str, str]] = Counter()  # (backend, succeed|fail) -> checks

    async def run(self) -> None:
        while True:
            health = self.config.health
            if health.enable:
                self.check_all()
            await asyncio.sleep(health.interval or 3.0)

    def check_all(self) -> None:
        known = self.router.backends
        for addr in [a for a in self._streaks if a not in known]:
            del self._streaks[addr]
            self.probe_seconds.pop(addr, None)
        for key in [k for k in self.results if k[0] not in known]:
            del self.results[key]
        started = time.monotonic()
        checks = [self.check_now(backend) for backend in list(known.values())]
        left = len(checks)

        def check_ended(_: asyncio.Task[None]) -> None:
            nonlocal left
            left -= 1
            if not left:
                self.cycle_seconds = time.monotonic() - started

        for check in checks:
            check.add_done_callback(check_ended)

    def check_now(self, backend: Backend) -> asyncio.Task[None]:
        """Check one backend now, unless a check of it is running (a hung backend gets one
        check at a time); returns the check."""
        task = self._running.get(backend.addr)
        if task is None or task.done():
            task = self._running[backend.addr] = asyncio.get_running_loop().create_task(
                self._check(backend))
        return task

    async def _check(self, backend: Backend) -> None:
        streak = self._streaks.setdefault(backend.addr, _Streak())
        health = self.config.health
        started = time.monotonic()
        full = False
        try:
            problem = await asyncio.wait_for(self._probe(backend, streak), health.timeout)
        except TimeoutError:
            problem = f"no answer within {health.timeout:g}s"
        except SQLError as e:
            problem = str(e) or f"error {e.code}"
            full = e.code == ER_CON_COUNT_ERROR
        except (OSError, ProtocolError, aiohttp.ClientError) as e:
            problem = str(e) or type(e).__name__
        self.probe_seconds[backend.addr] = time.monotonic() - started
        if full:  # full, not down (the module docstring): no verdict either way
            return
        self.results[(backend.addr, "fail" if problem else "succeed")] += 1
        if problem:
            streak.failures += 1
            streak.successes = 0
            if streak.failures >= health.failure_threshold:
                self.router.set_health(backend, problem)
        else:
            streak.successes += 1
            streak.failures = 0
            backend.doubt = ""  # a passing check is the answer to a session's doubt
            if backend.health and streak.successes >= health.success_threshold:
                self.router.set_health(backend, "")

    async def _probe(self, backend: Backend, streak: _Streak) -> str:
        security = self.config.security
        if security.auth_sync_user:
            conn = await AdminConnection.open(backend.host, backend.port,
                                              security.auth_sync_user,
                                              security.auth_sync_password,
                                              **self.admin_tls())
            self.router.note_greeting(backend, conn.greeting)
            try:
                problem = await self._status(conn, backend, streak)
            finally:
                conn.close()
        else:
            problem = await _greets(self.router, backend)
        if not problem and backend.status_port:
            problem = await _tidb_status(backend, streak, self.cluster_tls())
        return problem

    async def _status(self, conn: AdminConnection, backend: Backend, streak: _Streak) -> str:
        status = {_text(r[0]).lower(): _text(r[1]) for r in await conn.query(STATUS_SQL)}
        variables = {_text(r[0]).lower(): _text(r[1]) for r in await conn.query(VARIABLES_SQL)}
        _sample_load(backend, streak, status)
        backend.galera = variables.get("wsrep_on", "OFF").upper() == "ON"
        backend.keep_unfit = _keep_unfit(variables)
        if not backend.galera:
            return ""
        ready = status.get("wsrep_ready", "OFF")
        state = status.get("wsrep_local_state", "?")
        if ready.upper() != "ON" or state != GALERA_SYNCED:
            comment = status.get("wsrep_local_state_comment", "")
            return f"galera node not synced: wsrep_ready={ready}, " \
                   f"wsrep_local_state={state} ({comment})"
        return ""


async def _greets(router: Router, backend: Backend) -> str:
    leg = await BackendLeg.open(backend.host, backend.port)
    try:
        _, payload = await leg.read_packet()
    finally:
        leg.abort()
    if payload[:1] == b"\xff":
        err = sql_error(payload)
        if err.code == ER_CON_COUNT_ERROR:
            raise err  # full, not down (HealthChecker._check)
        return f"refuses connections: {err.code} {err.message}"
    router.note_greeting(backend, parse_greeting(payload))
    return ""


async def _tidb_status(backend: Backend, streak: _Streak, tls: ssl.SSLContext | None) -> str:
    """TiDB's status port: /status must answer 200; /metrics gives its CPU (the load). Over
    HTTPS with `[security] cluster-tls`."""
    base = f"{'https' if tls else 'http'}://{backend.host}:{backend.status_port}"
    connector = aiohttp.TCPConnector(ssl=tls if tls else True)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(f"{base}/status") as r:
            if r.status != 200:
                return f"status port answered HTTP {r.status}"
        async with http.get(f"{base}/metrics") as r:
            text = await r.content.read(METRICS_LIMIT) if r.status == 200 else b""
    cpu = _metric(text, b"process_cpu_seconds_total")
    now = time.monotonic()
    if cpu is not None:
        if streak.cpu_seconds >= 0 and now > streak.cpu_at:
            rate = max(0.0, cpu - streak.cpu_seconds) / (now - streak.cpu_at)
            load = backend.load
            load.cpu = SMOOTHING * rate + (1 - SMOOTHING) * load.cpu if load.sampled else rate
            load.sampled = True
        streak.cpu_seconds, streak.cpu_at = cpu, now
    return ""


def _metric(text: bytes, name: bytes) -> float | None:
    """The value of an unlabelled sample in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + b" "):
            try:
                return float(line.split()[1])
            except (IndexError, ValueError):
                return None
    return None


def _keep_unfit(variables: dict[str, str]) -> str:
    """Why a backend with these global variables is no place for a kept connection (net/pool.py)."""
    if variables.get("init_connect"):
        return "init_connect is set (a reset connection does not run it)"
    if variables.get("max_user_connections", "0") not in ("0", ""):
        return "max_user_connections is set (kept connections count toward it)"
    return ""


def _sample_load(backend: Backend, streak: _Streak, status: dict[str, str]) -> None:
    load = backend.load
    try:
        running = max(0.0, float(status.get("threads_running", "1")) - 1)  # not the check itself
        questions = float(status.get("questions", "0"))
    except ValueError:
        return
    now = time.monotonic()
    if streak.questions >= 0 and now > streak.questions_at:
        qps = max(0.0, questions - streak.questions) / (now - streak.questions_at)
        load.queries_per_second = qps
    streak.questions, streak.questions_at = questions, now
    if load.sampled:
        running = SMOOTHING * running + (1 - SMOOTHING) * load.threads_running
    load.threads_running = running
    load.sampled = True


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value is not None else ""
