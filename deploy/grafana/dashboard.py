"""Writes deploy/grafana/tiproxy.json, the proxy's Grafana dashboard: `python dashboard.py`.

TiProxy's rows and panels (Server, Query Summary, Balance, Backend, Traffic) over the same
metric names, so that what an operator of TiProxy reads there reads the same here, and panels of
our own beside them (marked "ours" in their description): pinned sessions by reason, moves still
waiting, the router's factors, health check results, the backends' load, refused clients.
Every panel is a Prometheus time series on the `datasource` variable, filtered by the `job` and
`instance` variables. tests/unit/test_deploy.py checks that the JSON is this script's output;
tests/integration/test_grafana.py runs every expression against a real Prometheus scraping a
proxy under load.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).with_name("tiproxy.json")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job=~"$job", instance=~"$instance"'
RATE = "$__rate_interval"
WIDTH, HEIGHT = 12, 7


def target(expr: str, legend: str) -> dict[str, Any]:
    return {"expr": expr, "legendFormat": legend}


def panel(title: str, description: str, unit: str, *targets: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"fillOpacity": 5}},
                        "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "right",
                               "calcs": ["mean", "max", "lastNotNull"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"datasource": DATASOURCE, "refId": chr(ord("A") + i), **t}
                    for i, t in enumerate(targets)],
    }


def quantiles(metric: str, by: str = "") -> list[dict[str, Any]]:
    """p99, p95 and the average of a histogram."""
    group = f"le{', ' + by if by else ''}"
    return [
        *(target(f"histogram_quantile({q}, sum(rate({metric}_bucket{{{SEL}}}[{RATE}])) "
                 f"by ({group}))", f"{int(q * 100)}") for q in (0.99, 0.95)),
        target(f"sum(rate({metric}_sum{{{SEL}}}[{RATE}])) / "
               f"sum(rate({metric}_count{{{SEL}}}[{RATE}]))", "avg"),
    ]


def server() -> list[dict[str, Any]]:
    return [
        panel("CPU Usage", "CPU of the proxy's processes (the control process and its "
              "workers together), and how many data-plane processes it runs (each uses one "
              "core at most).", "percentunit",
              target(f"rate(process_cpu_seconds_total{{{SEL}}}[{RATE}])", "{{instance}}"),
              target(f"tiproxy_server_maxprocs{{{SEL}}}", "limit-{{instance}}")),
        panel("Memory Usage", "Resident memory of the proxy's processes, pages they share "
              "counted once.", "bytes",
              target(f"process_resident_memory_bytes{{{SEL}}}", "process-{{instance}}")),
        panel("Uptime", "Time since the proxy started.", "s",
              target(f"time() - process_start_time_seconds{{{SEL}}}", "{{instance}}")),
        panel("Connection Count", "Client connections.", "short",
              target(f"tiproxy_server_connections{{{SEL}}}", "{{instance}}"),
              target(f"sum(tiproxy_server_connections{{{SEL}}})", "total")),
        panel("Create Connection OPM", "Connections accepted per minute.", "short",
              target(f"sum(increase(tiproxy_server_create_connection_total{{{SEL}}}[1m])) "
                     "by (instance)", "{{instance}}")),
        panel("Disconnection OPM", "Connections ended per minute, by what ended them.",
              "short",
              target(f"sum(increase(tiproxy_server_disconnection_total{{{SEL}}}[1m])) "
                     "by (type)", "{{type}}")),
        panel("Rejected Connection OPM", "Ours: clients refused before their greeting, per "
              "minute (max-connections, memory).", "short",
              target(f"sum(increase(tiproxy_server_reject_connection_total{{{SEL}}}[1m])) "
                     "by (type)", "{{type}}")),
        panel("Errors OPM", "Ours: the proxy's own errors per minute (a certificate that did "
              "not load, a worker that died, a move that fails for a lasting reason).",
              "short",
              target(f"sum(increase(tiproxy_server_err{{{SEL}}}[1m])) by (type)", "{{type}}")),
        panel("Owner", "The proxy that owns each job: [ha] virtual-ip's address (vip/<ip>); "
              "empty without [ha].", "short",
              target(f"tiproxy_server_owner{{{SEL}}}", "{{instance}} - {{type}}")),
    ]


def queries() -> list[dict[str, Any]]:
    duration = "tiproxy_session_query_duration_seconds"
    return [
        panel("Duration", "Command durations: from the command's arrival to the end of its "
              "response.", "s", *quantiles(duration)),
        panel("P99 Duration By Instance", "P99 command duration by proxy.", "s",
              target(f"histogram_quantile(0.99, sum(rate({duration}_bucket{{{SEL}}}[{RATE}])) "
                     "by (le, instance))", "{{instance}}")),
        panel("P99 Duration By Backend", "P99 command duration by backend.", "s",
              target(f"histogram_quantile(0.99, sum(rate({duration}_bucket{{{SEL}}}[{RATE}])) "
                     "by (le, backend))", "{{backend}}")),
        panel("P99 Duration By CMD", "Ours: P99 duration by command type.", "s",
              target(f"histogram_quantile(0.99, sum(rate({duration}_bucket{{{SEL}}}[{RATE}])) "
                     "by (le, cmd_type))", "{{cmd_type}}")),
        panel("CPS by Instance", "Commands per second by proxy.", "short",
              target(f"sum(rate(tiproxy_session_query_total{{{SEL}}}[{RATE}])) by (instance)",
                     "{{instance}}")),
        panel("CPS by Backend", "Commands per second by backend.", "short",
              target(f"sum(rate(tiproxy_session_query_total{{{SEL}}}[{RATE}])) by (backend)",
                     "{{backend}}")),
        panel("CPS by CMD", "Commands per second by command type.", "short",
              target(f"sum(rate(tiproxy_session_query_total{{{SEL}}}[{RATE}])) by (cmd_type)",
                     "{{cmd_type}}")),
        panel("Handshake Duration", "From a client's connection to its login on a backend.",
              "s", *quantiles("tiproxy_session_handshake_duration_seconds")),
        panel("Connection Lifetime", "Ours: P99 and P50 lifetime of the sessions that ended.",
              "s",
              *(target(f"histogram_quantile({q}, sum(rate("
                       f"tiproxy_session_conn_lifetime_seconds_bucket{{{SEL}}}[{RATE}])) "
                       "by (le))", f"{int(q * 100)}") for q in (0.99, 0.5))),
    ]


def balance() -> list[dict[str, Any]]:
    return [
        panel("Backend Connections", "Sessions on each backend.", "short",
              target(f"tiproxy_balance_b_conn{{{SEL}}}", "{{instance}} | {{backend}}")),
        panel("Session Migration OPM", "Moves per minute, by result and backends.", "short",
              target(f"sum(increase(tiproxy_balance_migrate_total{{{SEL}}}[1m])) "
                     "by (migrate_res, from, to)", "{{migrate_res}}: {{from}} => {{to}}")),
        panel("Session Migration Duration", "How long moves take.", "s",
              *quantiles("tiproxy_balance_migrate_duration_seconds")),
        panel("Session Migration Reasons", "Moves per minute, by why they were asked for.",
              "short",
              target(f"sum(increase(tiproxy_balance_migrate_total{{{SEL}}}[1m])) by (reason)",
                     "{{reason}}")),
        panel("Pending Migration Count", "Moves asked for and not done yet (the target is "
              "empty until the move picks one).", "short",
              target(f"sum(tiproxy_balance_pending_migrate{{{SEL}}}) by (instance, from, to)",
                     "{{instance}}: {{from}} => {{to}}")),
        panel("Pending Migrations by Reason", "Ours: moves still waiting, by why they were "
              "asked for.", "short",
              target(f"sum(tiproxy_balance_pending_migrate{{{SEL}}}) by (reason)",
                     "{{reason}}")),
        panel("Pinned Sessions by Reason", "Ours: sessions that cannot move now, by what pins "
              "them (temporary tables, locks, no reusable credential...).", "short",
              target(f"sum(tiproxy_session_pinned{{{SEL}}}) by (reason)", "{{reason}}")),
        panel("Backend Score Factors", "Ours: the router's factors per backend, lower takes "
              "new sessions first (status, health, label, load, conn).", "short",
              target(f"max(tiproxy_balance_b_score{{{SEL}}}) by (backend, factor)",
                     "{{backend}} {{factor}}")),
    ]


def backends() -> list[dict[str, Any]]:
    return [
        panel("Get Backend Duration", "How long a login waits for a backend.", "s",
              *quantiles("tiproxy_backend_get_backend_duration_seconds")),
        panel("Ping Backend Duration", "The last health check's time, per backend.", "s",
              target(f"tiproxy_backend_ping_duration_seconds{{{SEL}}}",
                     "{{instance}} | {{backend}}")),
        panel("Health Check Cycle", "How long the last round of health checks took.", "s",
              target(f"tiproxy_backend_health_check_seconds{{{SEL}}}", "{{instance}}")),
        panel("Dial Backend Fails OPM", "Sessions that could not connect to a backend, per "
              "minute.", "short",
              target(f"sum(increase(tiproxy_backend_dial_backend_fail{{{SEL}}}[1m])) "
                     "by (instance, backend)", "{{instance}} => {{backend}}")),
        panel("Get Backend OPM", "Ours: logins that got a backend, or not, per minute.",
              "short",
              target(f"sum(increase(tiproxy_backend_get_backend{{{SEL}}}[1m])) by (res)",
                     "{{res}}")),
        panel("Backend Status", "Ours: 1 while a backend answers (draining included), 0 while "
              "it is down or unhealthy.", "short",
              target(f"min(tiproxy_backend_b_status{{{SEL}}}) by (backend)", "{{backend}}")),
        panel("Health Check Results OPM", "Ours: health checks per minute, by backend and "
              "result.", "short",
              target(f"sum(increase(tiproxy_backend_health_check_total{{{SEL}}}[1m])) "
                     "by (backend, res)", "{{backend}} {{res}}")),
        panel("Backend Load", "Ours: the load the health checks read (threads running, "
              "queries per second, a TiDB's busy cores).", "short",
              target(f"max(tiproxy_backend_backend_metric{{{SEL}}}) by (backend, metric)",
                     "{{backend}} {{metric}}")),
    ]


def traffic() -> list[dict[str, Any]]:
    def per_backend(metric: str, title: str, text: str, legend: str) -> dict[str, Any]:
        return panel(title, text, "short",
                     target(f"sum(rate(tiproxy_traffic_{metric}{{{SEL}}}[{RATE}])) "
                            "by (instance, backend)", legend))

    return [
        per_backend("inbound_bytes", "Bytes/Second from Backends",
                    "Bytes per second from backends to the proxy.",
                    "{{backend}} => {{instance}}"),
        per_backend("inbound_packets", "Packets/Second from Backends",
                    "MySQL packets per second from backends to the proxy.",
                    "{{backend}} => {{instance}}"),
        per_backend("outbound_bytes", "Bytes/Second to Backends",
                    "Bytes per second from the proxy to backends.",
                    "{{instance}} => {{backend}}"),
        per_backend("outbound_packets", "Packets/Second to Backends",
                    "MySQL packets per second from the proxy to backends.",
                    "{{instance}} => {{backend}}"),
        panel("Cross Location Bytes/Second", "Bytes per second with backends whose location "
              "label is not the proxy's.", "short",
              target(f"sum(rate(tiproxy_traffic_cross_location_bytes{{{SEL}}}[{RATE}])) "
                     "by (instance)", "{{instance}}")),
    ]


ROWS = (("Server", server), ("Query Summary", queries), ("Balance", balance),
        ("Backend", backends), ("Traffic", traffic))


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": name}, "definition": query,
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"text": "All", "value": "$__all"}, "sort": 1}


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    next_id = 1
    y = 0
    for title, make in ROWS:
        row = {"type": "row", "title": title, "collapsed": False, "id": next_id,
               "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}
        panels.append(row)
        next_id += 1
        y += 1
        made = make()
        for i, p in enumerate(made):
            p["id"] = next_id
            next_id += 1
            p["gridPos"] = {"x": (i % 2) * WIDTH, "y": y + (i // 2) * HEIGHT,
                            "w": WIDTH, "h": HEIGHT}
            panels.append(p)
        y += -(-len(made) // 2) * HEIGHT
    return {
        "title": "TiProxy",
        "uid": "tiproxy-python",
        "description": "TiProxy for Python: TiProxy's panels, and ours beside them.",
        "tags": ["tiproxy"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0},
            variable("job", "Job", "label_values(tiproxy_server_connections, job)"),
            variable("instance", "Instance",
                     'label_values(tiproxy_server_connections{job=~"$job"}, instance)'),
        ]},
        "panels": panels,
        "version": 1,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUTPUT.write_text(render())
    sys.stdout.write(f"wrote {OUTPUT}\n")
