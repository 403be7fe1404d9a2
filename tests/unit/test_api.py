"""The HTTP API and metrics, served on a real port for a small fake view of the data plane."""

from __future__ import annotations

import asyncio
import os
import re
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from support.views import QuietView
from tiproxy.api import BackendView, ProxyView, start_api
from tiproxy.config import Config, config_checksum, config_to_dict, parse_config
from tiproxy.protocol.constants import Command
from tiproxy.views.counters import DataPlaneCounts
from tiproxy.views.interface import (
    HealthStats,
    MigrationStats,
    ServerStats,
    SessionGauges,
    SessionView,
)

CONFIG = parse_config(
    """
[proxy]
addr = "127.0.0.1:6000"
backend-addrs = ["127.0.0.1:3306", "127.0.0.1:3307"]
max-connections = 100

[proxy.backend-healthy-keepalive]
idle = "1m30s"

[balance]
policy = "connection"
"""
)


def _counts() -> DataPlaneCounts:
    """What the sessions of the fake data plane counted."""
    counts = DataPlaneCounts()
    first = counts.backend("127.0.0.1:3306")
    for _ in range(12):
        first.commands[Command.QUERY].observe(0.001)
    for _ in range(3):
        first.commands[Command.STMT_EXECUTE].observe(0.002)
    counts.backend("127.0.0.1:3308").commands[Command.QUERY].observe(0.01)
    for seconds in (0.05, 0.03):
        counts.migrated("127.0.0.1:3308", "127.0.0.1:3306", "drained", True, seconds)
    return counts


@dataclass
class FakeView(QuietView):
    """The data plane as the API sees it, with values a test can change between requests."""

    cfg: Config = CONFIG
    connections: int = 7
    backend_list: list[BackendView] = field(default_factory=list)
    counts: DataPlaneCounts = field(default_factory=_counts)

    def connection_count(self) -> int:
        return self.connections

    def backends(self) -> list[BackendView]:
        return self.backend_list

    def discovery_status(self) -> dict[str, str]:
        return {"etcd": "ok"}

    def server_errors(self) -> dict[str, int]:
        return {"load_cert": 2}

    async def session_views(self) -> list[SessionView]:
        return [SessionView(3, "app", "127.0.0.1:5000", "127.0.0.1:3308", True, "drained",
                            "pinned: LOCK TABLES")]

    def migration_stats(self) -> MigrationStats:
        return MigrationStats({("127.0.0.1:3308", "127.0.0.1:3306", "drained", "succeed"): 2},
                              (0.01, 0.1), [1, 1, 0], 0.05)

    def data_plane_counts(self) -> DataPlaneCounts:
        return self.counts

    def session_gauges(self) -> SessionGauges:
        return SessionGauges({("127.0.0.1:3308", "", "drained"): 1}, {"lock_tables": 1})

    def health_stats(self) -> HealthStats:
        return HealthStats(0.25, {"127.0.0.1:3306": 0.003},
                           {("127.0.0.1:3306", "succeed"): 5, ("127.0.0.1:3307", "fail"): 2})

    def server_stats(self) -> ServerStats:
        return ServerStats([os.getpid()], 2, {"start": 1}, 0, 3, ["vip/10.0.0.9"])


def _view() -> FakeView:
    return FakeView(
        backend_list=[
            BackendView("127.0.0.1:3306", "healthy", 4, {"Query": 12, "StmtExecute": 3},
                        sources=["static"], labels={"zone": "east"}, score=4.0,
                        threads_running=1.5, queries_per_second=20.0),
            BackendView("127.0.0.1:3307", "down", 0, {}, last_error="connection refused"),
            BackendView("127.0.0.1:3308", "draining", 3, {"Query": 1}, drained_by=["drained"]),
        ]
    )


Check = Callable[[aiohttp.ClientSession, str], Awaitable[None]]


def _serve(view: FakeView, check: Check) -> None:
    """Start the API on a free port, run `check(session, base_url)`, and stop the API."""

    async def main() -> None:
        server = await start_api(view, "127.0.0.1:0")
        try:
            async with aiohttp.ClientSession() as session:
                await check(session, f"http://127.0.0.1:{server.port}")
        finally:
            await server.close()

    asyncio.run(main())


def test_health_is_200_with_the_config_checksum() -> None:
    view = _view()

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.get(f"{base}/api/debug/health") as r:
            assert r.status == 200
            body = await r.json()
        assert body["config_checksum"] == config_checksum(CONFIG)
        assert body["discovery"] == {"etcd": "ok"}

    _serve(view, check)


def test_health_is_502_while_shutting_down() -> None:
    view = _view()

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        view.shutting_down = True
        async with session.get(f"{base}/api/debug/health") as r:
            assert r.status == 502
            assert (await r.json())["status"] == "shutting down"

    _serve(view, check)


def test_config_toml_parses_back_to_the_running_config() -> None:
    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.get(f"{base}/api/admin/config") as r:
            assert r.status == 200
            assert r.content_type == "application/toml"
            text = await r.text()
        assert parse_config(text) == CONFIG
        assert tomllib.loads(text)["proxy"]["max-connections"] == 100

    _serve(_view(), check)


@pytest.mark.parametrize(
    ("query", "headers"),
    [("?format=json", {}), ("?format=JSON", {}), ("", {"Accept": "application/json"})],
)
def test_config_as_json(query: str, headers: dict[str, str]) -> None:
    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.get(f"{base}/api/admin/config{query}", headers=headers) as r:
            assert r.status == 200
            assert r.content_type == "application/json"
            body = await r.json()
        assert body == config_to_dict(CONFIG, redact=True)
        assert body["proxy"]["backend-addrs"] == ["127.0.0.1:3306", "127.0.0.1:3307"]
        assert body["balance"]["policy"] == "connection"

    _serve(_view(), check)


def test_backends_list() -> None:
    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.get(f"{base}/api/admin/backends") as r:
            assert r.status == 200
            body = await r.json()
        assert [(b["addr"], b["status"], b["connections"], b["drained_by"], b["last_error"])
                for b in body] == [
            ("127.0.0.1:3306", "healthy", 4, [], ""),
            ("127.0.0.1:3307", "down", 0, [], "connection refused"),
            ("127.0.0.1:3308", "draining", 3, ["drained"], ""),
        ]
        assert body[0]["labels"] == {"zone": "east"} and body[0]["score"] == 4.0
        assert body[0]["load"] == {"threads_running": 1.5, "queries_per_second": 20.0,
                                   "cpu": 0.0}
        assert body[0]["sources"] == ["static"]

    _serve(_view(), check)


def test_sessions_say_why_they_wait() -> None:
    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.get(f"{base}/api/admin/sessions") as r:
            assert r.status == 200
            body = await r.json()
        assert body == [{"id": 3, "user": "app", "client": "127.0.0.1:5000",
                         "backend": "127.0.0.1:3308", "moving": True, "move_reason": "drained",
                         "waiting": "pinned: LOCK TABLES", "moves": 0,
                         "client_tls": False, "backend_tls": False, "direct": False}]

    _serve(_view(), check)


def test_migration_metrics() -> None:
    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.get(f"{base}/metrics") as r:
            text = await r.text()
        assert ('tiproxy_balance_migrate_total{from="127.0.0.1:3308",migrate_res="succeed",'
                'reason="drained",to="127.0.0.1:3306"} 2.0') in text
        labels = 'from="127.0.0.1:3308",migrate_res="succeed",to="127.0.0.1:3306"'
        # TiProxy's buckets: 0.1 ms doubling; 0.03 s and 0.05 s are both under 0.0512 s
        assert f'tiproxy_balance_migrate_duration_seconds_bucket{{{labels},le="0.0256"}} 0.0' \
            in text
        assert f'tiproxy_balance_migrate_duration_seconds_bucket{{{labels},le="0.0512"}} 2.0' \
            in text
        assert f'tiproxy_balance_migrate_duration_seconds_bucket{{{labels},le="+Inf"}} 2.0' \
            in text
        assert f"tiproxy_balance_migrate_duration_seconds_count{{{labels}}} 2.0" in text
        assert ('tiproxy_balance_pending_migrate{from="127.0.0.1:3308",reason="drained",to=""}'
                ' 1.0') in text

    _serve(_view(), check)


def test_control_routes_need_a_controllable_view() -> None:
    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.post(f"{base}/api/debug/redirect") as r:
            assert r.status == 501

    _serve(_view(), check)


@pytest.mark.parametrize("path", ["/metrics", "/api/metrics", "/api/metrics/"])
def test_metrics_have_tiproxys_names_and_the_views_values(path: str) -> None:
    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.get(base + path) as r:
            assert r.status == 200
            assert r.content_type == "text/plain"
            text = await r.text()
        lines = set(text.splitlines())
        assert "# TYPE tiproxy_server_connections gauge" in lines
        assert "tiproxy_server_connections 7.0" in lines
        assert "# TYPE tiproxy_session_query_total counter" in lines
        assert (
            'tiproxy_session_query_total{backend="127.0.0.1:3306",cmd_type="Query"} 12.0' in lines
        )
        assert (
            'tiproxy_session_query_total{backend="127.0.0.1:3306",cmd_type="StmtExecute"} 3.0'
            in lines
        )
        assert 'tiproxy_backend_b_status{backend="127.0.0.1:3306"} 1.0' in lines
        assert 'tiproxy_backend_b_status{backend="127.0.0.1:3307"} 0.0' in lines
        assert 'tiproxy_backend_b_status{backend="127.0.0.1:3308"} 1.0' in lines  # draining: up
        assert 'tiproxy_balance_b_conn{backend="127.0.0.1:3308"} 3.0' in lines
        assert 'tiproxy_server_owner{type="vip/10.0.0.9"} 1.0' in lines  # [ha] virtual-ip's
        assert "tiproxy_server_maxprocs 2.0" in lines

    _serve(_view(), check)


def test_metrics_are_read_from_the_view_at_each_scrape() -> None:
    view = _view()

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        view.connections = 42
        async with session.get(f"{base}/metrics") as r:
            assert "tiproxy_server_connections 42.0" in (await r.text()).splitlines()
        view.connections = 3
        async with session.get(f"{base}/metrics") as r:
            assert "tiproxy_server_connections 3.0" in (await r.text()).splitlines()

    _serve(view, check)


def test_unknown_route_is_404() -> None:
    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.get(f"{base}/api/nope") as r:
            assert r.status == 404

    _serve(_view(), check)


def test_start_api_refuses_a_bad_address() -> None:
    async def main() -> None:
        await start_api(_view(), "localhost")

    with pytest.raises(ValueError, match="no port"):
        asyncio.run(main())


def test_the_view_protocol_is_satisfied_by_the_fake() -> None:
    # mypy checks this assignment; at run time it documents the contract.
    view: ProxyView = _view()
    assert view.connection_count() == 7


def test_the_shipped_dashboard_and_rules_name_only_exported_metrics() -> None:
    root = Path(__file__).resolve().parents[2]
    shipped = ((root / "deploy" / "grafana" / "tiproxy.json").read_text()
               + (root / "deploy" / "prometheus" / "tiproxy.rules.yml").read_text())
    used = set(re.findall(r"\b((?:tiproxy|process)_[a-z_]+)\b", shipped))

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.get(f"{base}/metrics") as r:
            text = await r.text()
        types = dict(line.split()[2:4] for line in text.splitlines()
                     if line.startswith("# TYPE "))
        for name in sorted(used):
            family = re.sub(r"_(bucket|sum|count)$", "", name)
            if family != name:
                assert types.get(family) == "histogram", name
            else:
                assert name in types, name

    assert len(used) > 30
    _serve(_view(), check)
