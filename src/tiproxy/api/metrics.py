"""Prometheus metrics with TiProxy's names, read from the `ProxyView` at scrape time.

The data path never touches a prometheus object: sessions keep plain integer counts, and this
collector turns them into metric families only when Prometheus scrapes. Names and labels follow
TiProxy's pkg/metrics so that its Grafana dashboard works unchanged:

- `tiproxy_server_connections` (gauge): client connections.
- `tiproxy_session_query_total{backend,cmd_type}` (counter): commands run on each backend.
- `tiproxy_backend_b_status{backend}` (gauge): 1 while the backend is up, 0 while it is down.
- `tiproxy_balance_b_conn{backend}` (gauge): connections routed to each backend.
- `tiproxy_server_err{type}` (counter): errors of the proxy itself, e.g. `load_cert` for a
  certificate file that did not load.
- `tiproxy_server_reject_connection_total{type}` (counter): clients refused before their
  greeting: `max_connections`, `memory` (high-memory-usage-reject-threshold).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from tiproxy.api.interface import BackendView, MigrationStats, ProxyView

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST

# Statuses in which a backend answers (TiProxy's b_status is 1 for a healthy backend). A
# draining backend is up: it only takes no new sessions.
_UP_STATUSES = frozenset({"healthy", "draining"})


class ProxyCollector(Collector):
    """Builds TiProxy's metric families from one snapshot of the view per scrape."""

    def __init__(self, view: ProxyView) -> None:
        self._view = view

    def collect(self) -> Iterable[Metric]:
        backends = self._view.backends()
        connections = GaugeMetricFamily("tiproxy_server_connections", "Number of connections.")
        connections.add_metric([], self._view.connection_count())
        yield connections
        yield _query_totals(backends)
        yield _backend_status(backends)
        yield _backend_connections(backends)
        yield _backend_scores(backends)
        yield from _migrations(self._view.migration_stats())
        errors = CounterMetricFamily("tiproxy_server_err", "Counter of errors.", labels=["type"])
        for kind, count in sorted(self._view.server_errors().items()):
            errors.add_metric([kind], count)
        yield errors
        rejected = CounterMetricFamily("tiproxy_server_reject_connection",
                                       "Counter of refused connections.", labels=["type"])
        for kind in ("max_connections", "memory"):
            rejected.add_metric([kind], self._view.rejected_connections().get(kind, 0))
        yield rejected


def _query_totals(backends: list[BackendView]) -> Metric:
    family = CounterMetricFamily(
        "tiproxy_session_query", "Counter of queries.", labels=["backend", "cmd_type"]
    )
    for b in backends:
        for cmd_type, total in sorted(b.query_counts.items()):
            family.add_metric([b.addr, cmd_type], total)
    return family


def _backend_status(backends: list[BackendView]) -> Metric:
    family = GaugeMetricFamily(
        "tiproxy_backend_b_status", "Gauge of backend status.", labels=["backend"]
    )
    for b in backends:
        family.add_metric([b.addr], 1 if b.status in _UP_STATUSES else 0)
    return family


def _backend_connections(backends: list[BackendView]) -> Metric:
    family = GaugeMetricFamily(
        "tiproxy_balance_b_conn", "Number of backend connections.", labels=["backend"]
    )
    for b in backends:
        family.add_metric([b.addr], b.connections)
    return family


def _backend_scores(backends: list[BackendView]) -> Metric:
    family = GaugeMetricFamily(
        "tiproxy_balance_b_score", "Score of backends (lower takes new sessions first).",
        labels=["backend"],
    )
    for b in backends:
        family.add_metric([b.addr], b.score)
    return family


def _migrations(stats: MigrationStats) -> Iterable[Metric]:
    total = CounterMetricFamily(
        "tiproxy_balance_migrate", "Number of migrations.",
        labels=["from", "to", "reason", "migrate_res"],
    )
    for (source, target, reason, result), count in sorted(stats.counts.items()):
        total.add_metric([source, target, reason, result], count)
    yield total
    cumulative = 0
    buckets = []
    for bound, count in zip(stats.buckets, stats.bucket_counts, strict=False):
        cumulative += count
        buckets.append((repr(bound), cumulative))
    cumulative += stats.bucket_counts[-1] if stats.bucket_counts else 0
    buckets.append(("+Inf", cumulative))
    duration = HistogramMetricFamily(
        "tiproxy_balance_migrate_duration_seconds", "Bucketed histogram of migrating time (s).")
    duration.add_metric([], buckets, sum_value=stats.total_seconds)
    yield duration


def build_registry(view: ProxyView) -> CollectorRegistry:
    """A registry of its own (not the global one) with the proxy's and the process's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(view))
    ProcessCollector(registry=registry)  # process_cpu_seconds_total etc., read from /proc
    return registry


def render_metrics(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text exposition format."""
    return generate_latest(registry)
