"""Prometheus metrics with TiProxy's names, types, labels and buckets, read from the `ProxyView`
at scrape time.

The data path never touches a metric object: sessions keep plain counts (views/counters.py), and
this module turns a snapshot of them into families only when Prometheus scrapes. Names follow
TiProxy's pkg/metrics exactly (a counter without `_total` stays so: api/exposition.py), so that
its Grafana dashboard and alert rules work unchanged; deploy/ has ours.

Server: `tiproxy_server_connections` (gauge), `tiproxy_server_create_connection_total`
(sessions accepted), `tiproxy_server_disconnection_total{type}` (sessions ended, by TiProxy's
names of what ended them: `success`, `client network break`, `auth fail`, `get backend fail`,
`backend network break`, `proxy shutdown`, ...), `tiproxy_server_reject_connection_total{type}`
(refused before the greeting: `max_connections`, `memory`), `tiproxy_server_maxprocs` (TiProxy's
GOMAXPROCS: here the data plane's processes, 1 or `[proxy] workers`; each runs on one core at
most), `tiproxy_server_owner{type}` (1 for each election this proxy leads, absent otherwise, as
in TiProxy: `vip/<ip>` for `[ha] virtual-ip`), `tiproxy_server_event{type}` (`start`; `close`
once a shutdown begins),
`tiproxy_server_err{type}` (the proxy's own errors: `load_cert`, `worker_died`,
`migrate_lasting`), `tiproxy_monitor_time_jump_back_total` and `tiproxy_monitor_keep_alive_total`
(control/monitor.py).
Session: `tiproxy_session_query_total{backend,cmd_type}` and
`tiproxy_session_query_duration_seconds{backend,cmd_type}` (commands, from the proxy receiving
one to the end of its response: rows stream to the client meanwhile),
`tiproxy_session_handshake_duration_seconds{backend}` (connect to logged in),
`tiproxy_session_query_time_since_conn_creation_seconds`, `tiproxy_session_conn_lifetime_seconds`,
and ours: `tiproxy_session_pinned{reason}` (sessions that cannot move now, by what pins them).
Backend: `tiproxy_backend_b_status{backend}` (1 while it answers, draining included),
`tiproxy_backend_get_backend_duration_seconds` and `tiproxy_backend_get_backend{res}` (a login's
wait for a backend), `tiproxy_backend_dial_backend_fail{backend}` (sessions that could not
connect), `tiproxy_backend_ping_duration_seconds{backend}` (its last health check),
`tiproxy_backend_health_check_seconds` (the last round of checks, until the slowest ended),
`tiproxy_backend_backend_metric{backend,metric}` (the load the checks read: `threads_running`,
`queries_per_second`, a TiDB's `cpu_cores`), and ours: `tiproxy_backend_health_check_total
{backend,res}` (each check's result).
Balance: `tiproxy_balance_b_conn{backend}`, `tiproxy_balance_b_score{backend,factor}` (each
factor of the router, lower is better: `status`, `health`, `label`, `load`, `conn`),
`tiproxy_balance_migrate_total{from,to,reason,migrate_res}`,
`tiproxy_balance_migrate_duration_seconds{from,to,migrate_res}`,
`tiproxy_balance_pending_migrate{from,to,reason}` (moves asked for and not done; `to` is empty
until the move picks its target); a session rebuilt on another backend after its own was lost
is a move with reason `backend_lost`. Ours: `tiproxy_session_transaction_replay_total{reason,
replay_res}` (transaction-replay's replays after a `deadlock`, a `lock_wait_timeout` or
`backend_lost`, `succeed` or `fail`), `tiproxy_session_backend_pool_total{event}`
(`backend-pool-size`: backend connections `kept` for the next login, and logins that `reused`
one).
Traffic: `tiproxy_traffic_inbound_bytes{backend}`, `_inbound_packets`, `_outbound_bytes`,
`_outbound_packets` (the clients' commands and their responses, counted as the relay passes
them; not the logins nor the proxy's own statements), `tiproxy_traffic_cross_location_bytes`
(both ways, with backends whose `label-name` label is not the proxy's).
Process: `process_cpu_seconds_total`, `process_resident_memory_bytes`,
`process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
`process_start_time_seconds`, for all the proxy's processes together (the view's
process_totals, which control/processes.py reads).
Traffic capture and replay (api/traffic.py adds them): `tiproxy_traffic_capture_cmds_total{type}`
(ours) and TiProxy's `tiproxy_replay_pending_cmds`.
Not exported, having no meaning here: `tiproxy_replay_wait_time`, `go_*`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from tiproxy.api.exposition import CONTENT_TYPE, Family, render
from tiproxy.session.state import PIN_KINDS
from tiproxy.views.counters import DataPlaneCounts, command_name
from tiproxy.views.interface import BackendView, ProxyView

METRICS_CONTENT_TYPE = CONTENT_TYPE

# tiproxy_server_err's types, exported from the start (0 until one happens) so that a rate
# over them reads 0 rather than nothing: a certificate file that did not load, a move that
# fails for a lasting reason, a worker process that died.
_ERROR_TYPES = ("load_cert", "migrate_lasting", "worker_died")
# Statuses in which a backend answers (TiProxy's b_status is 1 for a healthy backend). A
# draining backend is up: it only takes no new sessions.
_UP_STATUSES = frozenset({"healthy", "draining"})


class ProxyMetrics:
    """Builds every family from one look at the view per scrape."""

    def __init__(self, view: ProxyView) -> None:
        self._view = view
        self._sources: list[Callable[[], Iterable[Family]]] = []

    def add_source(self, source: Callable[[], Iterable[Family]]) -> None:
        """More families, read at each scrape after the proxy's (api/traffic.py's)."""
        self._sources.append(source)

    def families(self) -> Iterator[Family]:
        view = self._view
        counts = view.data_plane_counts()
        backends = view.backends()
        yield from _server(view, counts)
        yield from _sessions(view, counts)
        yield from _backends(view, counts, backends)
        yield from _balance(view, counts, backends)
        yield from _traffic(counts)
        for source in self._sources:
            yield from source()
        yield from self._process()

    def _process(self) -> Iterator[Family]:
        totals = self._view.process_totals()
        for name, kind, text, value in (
            ("process_cpu_seconds_total", "counter", "CPU seconds of the proxy's processes.",
             totals.cpu_seconds),
            ("process_resident_memory_bytes", "gauge",
             "Resident memory of the proxy's processes (shared pages once).",
             totals.resident_bytes),
            ("process_virtual_memory_bytes", "gauge",
             "Virtual memory of the proxy's processes.", totals.virtual_bytes),
            ("process_open_fds", "gauge", "Open files of the proxy's processes.",
             totals.open_fds),
            ("process_max_fds", "gauge", "The open file limit of a process.", totals.max_fds),
            ("process_start_time_seconds", "gauge",
             "Start time of the proxy since the epoch (s).", totals.start_time),
        ):
            yield _single(name, text, kind, value)


def _single(name: str, text: str, kind: str, value: float) -> Family:
    family = Family(name, text, kind)
    family.add((), value)
    return family


def _by(name: str, text: str, kind: str, label: str, values: dict[str, int]) -> Family:
    family = Family(name, text, kind, (label,))
    for key, value in sorted(values.items()):
        family.add((key,), value)
    return family


def _server(view: ProxyView, counts: DataPlaneCounts) -> Iterator[Family]:
    stats = view.server_stats()
    yield _single("tiproxy_server_connections", "Number of connections.", "gauge",
                  view.connection_count())
    yield _single("tiproxy_server_create_connection_total", "Number of create connections.",
                  "counter", counts.created)
    yield _by("tiproxy_server_disconnection_total", "Number of disconnections.", "counter",
              "type", dict(counts.disconnections))
    rejected = view.rejected_connections()
    yield _by("tiproxy_server_reject_connection_total", "Number of rejected connections.",
              "counter", "type", {kind: rejected.get(kind, 0)
                                  for kind in ("max_connections", "memory")})
    yield _single("tiproxy_server_maxprocs", "Processes of the data plane (each one core).",
                  "gauge", stats.data_plane_processes)
    yield _by("tiproxy_server_owner", "The TiProxy owner of each job type.", "gauge", "type",
              dict.fromkeys(stats.owner_of, 1))
    yield _by("tiproxy_server_event", "Counter of TiProxy event.", "counter", "type",
              dict(stats.events))
    errors = dict.fromkeys(_ERROR_TYPES, 0) | dict(view.server_errors())
    yield _by("tiproxy_server_err", "Counter of server error.", "counter", "type", errors)
    yield _single("tiproxy_monitor_time_jump_back_total",
                  "Counter of system time jumps backward.", "counter", stats.time_jump_back)
    yield _single("tiproxy_monitor_keep_alive_total", "Counter of proxy keep alive.",
                  "counter", stats.keep_alive)


def _sessions(view: ProxyView, counts: DataPlaneCounts) -> Iterator[Family]:
    total = Family("tiproxy_session_query_total", "Counter of queries.", "counter",
                   ("backend", "cmd_type"))
    durations = Family("tiproxy_session_query_duration_seconds",
                       "Bucketed histogram of processing time (s) of handled queries.",
                       "histogram", ("backend", "cmd_type"))
    handshakes = Family("tiproxy_session_handshake_duration_seconds",
                        "Bucketed histogram of processing time (s) of handshakes.",
                        "histogram", ("backend",))
    for addr, backend in sorted(counts.backends.items()):
        for cmd, times in sorted(backend.commands.items()):
            total.add((addr, command_name(cmd)), times.count)
            durations.add_histogram((addr, command_name(cmd)), times)
        if backend.handshakes.count:
            handshakes.add_histogram((addr,), backend.handshakes)
    yield from (total, durations, handshakes)
    since = Family("tiproxy_session_query_time_since_conn_creation_seconds",
                   "Bucketed histogram of query start time (s) since connection creation.",
                   "histogram")
    since.add_histogram((), counts.since_creation)
    lifetimes = Family("tiproxy_session_conn_lifetime_seconds",
                       "Bucketed histogram of connection lifetime (s).", "histogram")
    lifetimes.add_histogram((), counts.lifetimes)
    pinned = view.session_gauges().pinned
    yield from (since, lifetimes, _by(
        "tiproxy_session_pinned", "Sessions that cannot move now, by what pins them.",
        "gauge", "reason", {kind: pinned.get(kind, 0) for kind in PIN_KINDS}))


def _backends(view: ProxyView, counts: DataPlaneCounts,
              backends: list[BackendView]) -> Iterator[Family]:
    status = Family("tiproxy_backend_b_status", "Gauge of backend status.", "gauge",
                    ("backend",))
    load = Family("tiproxy_backend_backend_metric", "The backend metric.", "gauge",
                  ("backend", "metric"))
    for b in backends:
        status.add((b.addr,), 1 if b.status in _UP_STATUSES else 0)
        if b.load_sampled:
            load.add((b.addr, "threads_running"), b.threads_running)
            load.add((b.addr, "queries_per_second"), b.queries_per_second)
        if b.cpu:
            load.add((b.addr, "cpu_cores"), b.cpu)
    get_time = Family("tiproxy_backend_get_backend_duration_seconds",
                      "Bucketed histogram of time (s) for getting an available backend.",
                      "histogram")
    get_time.add_histogram((), counts.get_backend)
    results = counts.get_backend_results
    dial = Family("tiproxy_backend_dial_backend_fail", "Counter of failing to dial backends.",
                  "counter", ("backend",))
    for addr, backend in sorted(counts.backends.items()):
        dial.add((addr,), backend.dial_failures)
    health = view.health_stats()
    ping = Family("tiproxy_backend_ping_duration_seconds",
                  "Time (s) of the last health check of each backend.", "gauge", ("backend",))
    for addr, seconds in sorted(health.probe_seconds.items()):
        ping.add((addr,), seconds)
    checks = Family("tiproxy_backend_health_check_total", "Health checks by result.",
                    "counter", ("backend", "res"))
    for (addr, result), count in sorted(health.results.items()):
        checks.add((addr, result), count)
    yield from (status, get_time, _by(
        "tiproxy_backend_get_backend", "Counter of getting backend.", "counter", "res",
        {res: results.get(res, 0) for res in ("succeed", "fail")}), dial, ping, _single(
        "tiproxy_backend_health_check_seconds", "Time (s) of each health check cycle.",
        "gauge", health.cycle_seconds), load, checks)


def _balance(view: ProxyView, counts: DataPlaneCounts,
             backends: list[BackendView]) -> Iterator[Family]:
    conns = Family("tiproxy_balance_b_conn", "Number of backend connections.", "gauge",
                   ("backend",))
    scores = Family("tiproxy_balance_b_score", "Gauge of backend scores.", "gauge",
                    ("backend", "factor"))
    for b in backends:
        conns.add((b.addr,), b.connections)
        for factor, score in b.factors.items():
            scores.add((b.addr, factor), score)
    moves = Family("tiproxy_balance_migrate_total", "Number and result of session migration.",
                   "counter", ("from", "to", "reason", "migrate_res"))
    for move, count in sorted(counts.migrations.items()):
        moves.add(move, count)
    times = Family("tiproxy_balance_migrate_duration_seconds",
                   "Bucketed histogram of migrating time (s) of sessions.", "histogram",
                   ("from", "to", "migrate_res"))
    for labels, histogram in sorted(counts.migration_times.items()):
        times.add_histogram(labels, histogram)
    pending = Family("tiproxy_balance_pending_migrate", "Number of pending session migration.",
                     "gauge", ("from", "to", "reason"))
    for waiting, count in sorted(view.session_gauges().pending.items()):
        pending.add(waiting, count)
    replays = Family("tiproxy_session_transaction_replay_total",
                     "Transactions replayed (transaction-replay), by why and how it went.",
                     "counter", ("reason", "replay_res"))
    for replay, count in sorted(counts.replays.items()):
        replays.add(replay, count)
    pool = _by("tiproxy_session_backend_pool_total",
               "Backend connections kept for the next login (kept), and logins that took one "
               "(reused).", "counter", "event",
               {event: counts.pool_events.get(event, 0) for event in ("kept", "reused")})
    yield from (conns, scores, moves, times, pending, replays, pool)


def _traffic(counts: DataPlaneCounts) -> Iterator[Family]:
    families = {
        attr: Family(f"tiproxy_traffic_{attr}", text, "counter", ("backend",))
        for attr, text in (("inbound_bytes", "Counter of bytes from backends."),
                           ("inbound_packets", "Counter of packets from backends."),
                           ("outbound_bytes", "Counter of bytes to backends."),
                           ("outbound_packets", "Counter of packets to backends."))
    }
    for addr, backend in sorted(counts.backends.items()):
        families["inbound_bytes"].add((addr,), backend.in_bytes)
        families["inbound_packets"].add((addr,), backend.in_packets)
        families["outbound_bytes"].add((addr,), backend.out_bytes)
        families["outbound_packets"].add((addr,), backend.out_packets)
    yield from families.values()
    yield _single("tiproxy_traffic_cross_location_bytes",
                  "Counter of bytes between TiProxy and cross-location backends.", "counter",
                  counts.cross_location_bytes)


def build_registry(view: ProxyView) -> ProxyMetrics:
    """What /metrics serves: the proxy's families and its processes'."""
    return ProxyMetrics(view)


def render_metrics(metrics: ProxyMetrics) -> bytes:
    """The families in Prometheus' text exposition format."""
    return render(metrics.families())
