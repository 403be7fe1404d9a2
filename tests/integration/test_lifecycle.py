"""The proxy's life as an operator runs it: SIGTERM in TiProxy's order, health set by hand, and
a config file that is watched."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pymysql
import pytest

from support.net import port_refuses
from support.proxy import ProxyFactory, ProxyProcess
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration


def _health(proxy: ProxyProcess) -> tuple[int, dict[str, Any]]:
    status, body = proxy.api("/api/debug/health")
    return status, json.loads(body)


def test_health_is_set_and_cleared_through_the_api(backends: list[MariaDBServer],
                                                   proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory([b.addr for b in backends])
    status, body = _health(proxy)
    assert (status, body["unhealthy_reason"]) == (200, "")
    assert isinstance(body["config_checksum"], int)
    put = json.dumps({"healthy": False, "reason": "rack 3 maintenance"}).encode()
    assert proxy.api("/api/debug/health", method="PUT", body=put)[0] == 502
    status, body = _health(proxy)
    assert (status, body["unhealthy_reason"]) == (502, "rack 3 maintenance")
    with proxy.connect() as conn, conn.cursor() as cur:  # clients still get in: health only
        cur.execute("SELECT 1")
    for bad in (b"", b"[]", b'{"healthy": "no"}', b'{"healthy": false, "reason": 5}'):
        status, reply = proxy.api("/api/debug/health", method="PUT", body=bad)
        assert status == 400, (bad, reply)
    assert _health(proxy)[0] == 502  # a refused request changed nothing
    assert proxy.api("/api/debug/health", method="DELETE")[0] == 200
    assert _health(proxy)[0] == 200
    assert "health set unhealthy through the API: rack 3 maintenance" in proxy.log()


def test_sigterm_lets_a_transaction_finish(backends: list[MariaDBServer],
                                           proxy_factory: ProxyFactory) -> None:
    """Health turns 502 at once; for graceful-wait-before-shutdown new clients still get in;
    then the port closes, and a session in a transaction is closed once it commits."""
    backends[0].sql("CREATE TABLE IF NOT EXISTS test.lifecycle (id INT PRIMARY KEY);\n"
                    "DELETE FROM test.lifecycle;\n")
    proxy = proxy_factory([backends[0].addr],
                          "\ngraceful-wait-before-shutdown = 2\ngraceful-close-conn-timeout = 20")
    conn = proxy.connect()
    with conn.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute("INSERT INTO test.lifecycle VALUES (1)")
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    deadline = signalled + 1.5
    while True:
        status, body = _health(proxy)
        if status == 502 and body["unhealthy_reason"] == "server is closing":
            break
        assert time.monotonic() < deadline, (status, body)
        time.sleep(0.05)
    with proxy.connect() as late, late.cursor() as cur:  # within the wait: still accepted
        cur.execute("SELECT 1")
    assert time.monotonic() - signalled < 2, "the check came too late to mean anything"
    while time.monotonic() - signalled < 3:
        time.sleep(0.1)
    assert port_refuses("127.0.0.1", proxy.port), "still listening after the wait"
    with conn.cursor() as cur:  # the transaction goes on to its end
        cur.execute("INSERT INTO test.lifecycle VALUES (2)")
        cur.execute("COMMIT")
    time.sleep(0.5)
    with pytest.raises(pymysql.err.OperationalError), conn.cursor() as cur:
        cur.execute("SELECT 1")  # closed at its safe point, after the commit
    assert proxy.proc.wait(20) == 0
    assert backends[0].sql("SELECT COUNT(*) FROM test.lifecycle").split()[-1] == "2"


def test_the_config_file_is_watched(backends: list[MariaDBServer],
                                    proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory([b.addr for b in backends])
    original = proxy.config_path.read_text()

    def running() -> dict[str, Any]:
        status, body = proxy.api("/api/admin/config?format=json")
        assert status == 200
        return dict(json.loads(body))

    def wait_for(check: Any, what: str) -> None:
        deadline = time.monotonic() + 10
        while not check():
            assert time.monotonic() < deadline, what
            time.sleep(0.1)

    proxy.config_path.write_text(original.replace("[proxy]\n", "[proxy]\nmax-connections = 7\n"))
    wait_for(lambda: running()["proxy"]["max-connections"] == 7, "the change was not applied")
    refused = proxy.log().count("config reload refused")
    proxy.config_path.write_text(original.replace("[proxy]\n", "[proxy]\nmax-connections = -3\n"))
    wait_for(lambda: proxy.log().count("config reload refused") > refused, "no refusal logged")
    assert running()["proxy"]["max-connections"] == 7  # the running config stays
    assert "proxy.max-connections" in proxy.log()
