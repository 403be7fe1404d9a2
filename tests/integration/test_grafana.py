"""The shipped Grafana dashboard and alert rules, run in a real Prometheus scraping a real proxy.

A proxy in front of the two test servers and an address where nothing listens (a backend that
is down), with a location label, the proxy's own account (health checks log in and read the
load) and health checks every second, is scraped every second by Prometheus, which loads
deploy/prometheus/tiproxy.rules.yml. Load meanwhile: clients querying (text and prepared
statements), clients connecting and leaving, a redirect every few seconds (moves, and the
rebalancer moving sessions back to the proxy's own location), and a session pinned by a
temporary table whose move waits. Then every expression of every panel of
deploy/grafana/tiproxy.json, read from the file, must return at least one number (not NaN)
through Prometheus' HTTP API, and every rule must have loaded and been evaluated without error,
the one for a down backend being pending or firing for the address where nothing listens.
"""

from __future__ import annotations

import json
import math
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mysql.connector
import pytest

from support.backends import ADMIN_TOML, APP
from support.prometheus import PrometheusServer
from support.proxy import ProxyFactory, ProxyProcess
from tiproxy.playground.mariadb import MariaDBServer
from tiproxy.playground.ports import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "tiproxy.json"
RULES = ROOT / "deploy" / "prometheus" / "tiproxy.rules.yml"
# Grafana's variables, as a user who picks every instance of the job sees them.
VARIABLES = {"$__rate_interval": "30s", "$job": "tiproxy", "$instance": ".*"}
# Panels with data only where a feature runs that this test does not set up: the owner of
# [ha] virtual-ip needs PD's etcd and an interface to put the address on (test_virtual_ip.py).
WITHOUT_DATA_HERE = {"Owner"}


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every target of every panel of the shipped dashboard."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queries = []
    for panel in panels:
        for inner in [panel, *panel.get("panels", [])]:
            for t in inner.get("targets", []):
                expr = t["expr"]
                for name, value in VARIABLES.items():
                    expr = expr.replace(name, value)
                assert "$" not in expr.replace('"$1"', ""), expr  # every variable substituted
                if inner["title"] not in WITHOUT_DATA_HERE:
                    queries.append((inner["title"], expr))
    return queries


def test_promtool_accepts_the_rules() -> None:
    done = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in done.stdout


class Load:
    """Clients querying, clients coming and going, and redirects, until stopped."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.stopping = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._guard, args=(work,), daemon=True)
                        for work in (self._text, self._text, self._prepared, self._churn,
                                     self._redirects)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)

    def _guard(self, work: Any) -> None:
        try:
            work()
        except BaseException as e:  # reported by the test, not lost in a thread
            self.errors.append(e)

    def _text(self) -> None:
        with self.proxy.connect() as conn, conn.cursor() as cur:
            while not self.stopping.is_set():
                cur.execute("SELECT SQL_NO_CACHE COUNT(*) FROM information_schema.COLLATIONS")
                cur.fetchall()
                time.sleep(0.01)

    def _prepared(self) -> None:
        conn = mysql.connector.connect(host=self.proxy.local_host, port=self.proxy.port,
                                       user=APP.name, password=APP.password,
                                       database=APP.database)
        try:
            cur = conn.cursor(prepared=True)
            while not self.stopping.is_set():
                cur.execute("SELECT ? + 1", (41,))
                cur.fetchall()
                time.sleep(0.01)
        finally:
            conn.close()

    def _churn(self) -> None:
        while not self.stopping.is_set():
            with self.proxy.connect() as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
            time.sleep(0.2)

    def _redirects(self) -> None:
        while not self.stopping.wait(3):
            self.proxy.redirect()


@pytest.fixture
def prometheus_dir(tmp_path: Path) -> Path:
    path = tmp_path / "prometheus"
    path.mkdir()
    return path


@pytest.fixture
def loaded_proxy(backends: list[MariaDBServer], proxy_factory: ProxyFactory) -> Iterator[
        tuple[ProxyProcess, str]]:
    """The proxy of the module docstring, and the address of its backend that is down."""
    east, west = backends[0].addr, backends[1].addr
    down = f"127.0.0.1:{free_port()}"
    proxy = proxy_factory(
        [east, west, down],
        f"\n[proxy.backend-labels]\n"
        f'"{east}" = {{ zone = "east" }}\n"{west}" = {{ zone = "west" }}\n'
        f'"{down}" = {{ zone = "east" }}\n'
        '[labels]\nzone = "east"\n[balance]\nlabel-name = "zone"\n'
        '[health]\ninterval = "1s"\ntimeout = "1s"\n' + ADMIN_TOML,
    )
    yield proxy, down


def test_every_panel_returns_data_and_every_rule_evaluates(
        loaded_proxy: tuple[ProxyProcess, str], prometheus_dir: Path) -> None:
    proxy, down = loaded_proxy
    prometheus = PrometheusServer(prometheus_dir, [f"127.0.0.1:{proxy.api_port}"], [RULES])
    try:
        prometheus.start()
        pinned = proxy.connect()
        with pinned.cursor() as cur:
            cur.execute("CREATE TEMPORARY TABLE held (id INT)")
        with Load(proxy) as load:
            missing = _until_every_panel_has_data(prometheus, timeout=150)
            rules = prometheus.api("rules")["groups"]
        assert not load.errors, load.errors
        assert not missing, "panels without data:\n" + "\n".join(
            f"{title}: {expr}" for title, expr in missing)
        _check_rules(rules, down)
        assert proxy.session(pinned.thread_id())["waiting"].startswith("pinned: temporary")
        pinned.close()
    finally:
        prometheus.stop()


def _has_numbers(result: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(float(sample["value"][1])) for sample in result)


def _until_every_panel_has_data(prometheus: PrometheusServer,
                                timeout: float) -> list[tuple[str, str]]:
    """Query every panel's expressions until each has returned a number; those that never did
    by the deadline."""
    waiting = panel_queries()
    assert len(waiting) > 40
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        waiting = [(title, expr) for title, expr in waiting
                   if not _has_numbers(prometheus.query(expr))]
        if waiting:
            time.sleep(2)
    return waiting


def _check_rules(groups: list[dict[str, Any]], down: str) -> None:
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert len(rules) == 8, sorted(rules)
    for name, rule in rules.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
        assert rule["lastEvaluation"] > "2000", (name, rule["lastEvaluation"])  # evaluated
    backend_down = rules["TiProxyBackendDown"]
    assert [a["labels"]["backend"] for a in backend_down["alerts"]] == [down]
    assert backend_down["alerts"][0]["state"] in ("pending", "firing")
    for quiet in ("TiProxyServerIsDown", "TiProxyReportErr", "TiProxyGetBackendFail",
                  "TiProxyConnectionsRejected", "TiProxyMigrationsFailing"):
        assert rules[quiet]["alerts"] == [], (quiet, rules[quiet]["alerts"])
