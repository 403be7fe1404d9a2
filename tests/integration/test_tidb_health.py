"""A TiDB found in etcd is also checked on its status port: /status, and /metrics for its load."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pymysql
import pytest

from support.proxy import ProxyFactory
from support.tidb_backend import PASSWORD, USER, ScriptedTiDB, SigningKey
from tiproxy.playground.etcd import EtcdServer

pytestmark = pytest.mark.integration


class StatusPort:
    """TiDB's HTTP status port as the proxy reads it: /status, and /metrics with its CPU."""

    def __init__(self) -> None:
        self.healthy = True
        self.cpu_seconds = 0.0
        port = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/status":
                    code = 200 if port.healthy else 500
                    body = b'{"connections":0,"version":"8.0.11-TiDB-v7.5.0"}'
                elif self.path == "/metrics":
                    code = 200
                    body = f"# TYPE process_cpu_seconds_total counter\n" \
                           f"process_cpu_seconds_total {port.cpu_seconds}\n".encode()
                else:
                    code, body = 404, b""
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tidb_pair() -> Iterator[tuple[ScriptedTiDB, ScriptedTiDB, StatusPort, StatusPort]]:
    key = SigningKey()
    status = (StatusPort(), StatusPort())
    try:
        with ScriptedTiDB("tidb-0", key) as a, ScriptedTiDB("tidb-1", key) as b:
            yield a, b, status[0], status[1]
    finally:
        for s in status:
            s.close()


def test_status_port_decides_health_and_metrics_give_load(
    tidb_pair: tuple[ScriptedTiDB, ScriptedTiDB, StatusPort, StatusPort],
    etcd_server: EtcdServer, proxy_factory: ProxyFactory,
) -> None:
    a, b, status_a, status_b = tidb_pair
    prefix_addrs = []
    try:
        for tidb, status in ((a, status_a), (b, status_b)):
            etcd_server.register_tidb(tidb.addr, {"version": "8.0.11-TiDB-v7.5.0",
                                                  "status_port": status.port}, ttl_seconds=5)
            prefix_addrs.append(tidb.addr)
        proxy = proxy_factory([], f'pd-addrs = ["{etcd_server.endpoint}"]\n[health]\n'
                                  'interval = "0.3s"\nfailure-threshold = 2\n'
                                  'success-threshold = 2')
        deadline = time.monotonic() + 10
        while len(proxy.backends()) != 2:
            assert time.monotonic() < deadline, proxy.backends()
            time.sleep(0.1)
        status_a.healthy = False  # /status answers 500: no new sessions there
        deadline = time.monotonic() + 10
        while {x["addr"]: x for x in proxy.backends()}[a.addr]["status"] != "unhealthy":
            assert time.monotonic() < deadline, proxy.backends()
            time.sleep(0.1)
        assert "HTTP 500" in {x["addr"]: x for x in proxy.backends()}[a.addr]["health"]
        for _ in range(3):
            with pymysql.connect(host="127.0.0.1", port=proxy.port, user=USER,
                                 password=PASSWORD) as conn, conn.cursor() as cur:
                cur.execute("SELECT @@port")
                assert cur.fetchone()[0] == b.port
        status_a.healthy = True
        for _ in range(10):  # b burns a core and a half: its load shows from its metrics
            status_b.cpu_seconds += 1.5 * 0.3
            time.sleep(0.3)
        cpu = {x["addr"]: x for x in proxy.backends()}[b.addr]["load"]["cpu"]
        assert 0.8 < cpu < 2.5, cpu
        assert {x["addr"]: x for x in proxy.backends()}[a.addr]["status"] == "healthy"
    finally:
        for addr in prefix_addrs:
            etcd_server.deregister(addr)
