"""This proxy's registration in PD's etcd (`/topology/tiproxy/<addr>/info` and `ttl`), against
a real etcd: the keys, their JSON, the lease that keeps them, and what a shutdown or a crash
leaves behind. First TopologyRegistration on its own with a short lease, then the proxy as its
users run it, with TiProxy's 45-second lease."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from support.backends import APP
from support.etcdkeys import keys_under, lease_ttl
from support.proxy import ProxyFactory, ProxyProcess
from tiproxy.discovery.registration import ProxyInfo, TopologyRegistration
from tiproxy.playground.etcd import EtcdServer
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

WAIT = 10.0


async def until(what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.05)


def info(ip: str = "10.9.8.7", port: str = "6000") -> ProxyInfo:
    return ProxyInfo(version="0.1.0", git_hash="None", ip=ip, port=port, status_port="3080",
                     deploy_path="/opt/tiproxy/bin", start_timestamp=1_700_000_000)


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return f"/{request.node.name}/topology/tiproxy/"


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


def test_keys_appear_are_refreshed_and_go_on_stop(etcd_server: EtcdServer, prefix: str) -> None:
    async def body() -> None:
        reg = TopologyRegistration([etcd_server.endpoint], info(), prefix=prefix, ttl=3,
                                   refresh=1.0)
        reg.start()
        base = f"{prefix}10.9.8.7:6000/"
        await until("registered", lambda: len(keys_under(etcd_server, prefix)) == 2)
        keys = keys_under(etcd_server, prefix)
        assert set(keys) == {base + "info", base + "ttl"}
        assert json.loads(keys[base + "info"][0]) == {
            "version": "0.1.0", "git_hash": "None", "ip": "10.9.8.7", "port": "6000",
            "status_port": "3080", "deploy_path": "/opt/tiproxy/bin",
            "start_timestamp": 1_700_000_000}
        first_ttl = int(keys[base + "ttl"][0])
        assert abs(first_ttl / 1e9 - time.time()) < 60  # Unix nanoseconds, as TiProxy writes
        lease = keys[base + "ttl"][1]
        assert keys[base + "info"][1] == lease == reg.lease != 0  # both keys on the lease
        # Kept alive past its TTL and written again: the ttl value moves on.
        await until("ttl rewritten",
                    lambda: int(keys_under(etcd_server, prefix)[base + "ttl"][0]) > first_ttl)
        await asyncio.sleep(4)  # more than the 3-second TTL
        assert lease_ttl(etcd_server, lease)[2] == [base + "info", base + "ttl"]
        assert reg.error == ""
        await reg.stop()
        assert keys_under(etcd_server, prefix) == {}
        assert lease_ttl(etcd_server, lease)[0] == -1  # revoked, not left to expire

    run(body)


def test_a_registration_nobody_keeps_alive_expires(etcd_server: EtcdServer, prefix: str) -> None:
    """What a proxy killed with SIGKILL leaves: nothing, once its lease runs out."""
    async def body() -> None:
        reg = TopologyRegistration([etcd_server.endpoint], info(), prefix=prefix, ttl=2,
                                   refresh=1.0)
        reg.start()
        await until("registered", lambda: len(keys_under(etcd_server, prefix)) == 2)
        assert reg._task is not None
        reg._task.cancel()  # dies: no deletion, no revocation
        await asyncio.gather(reg._task, return_exceptions=True)
        assert len(keys_under(etcd_server, prefix)) == 2
        await until("the lease expired", lambda: keys_under(etcd_server, prefix) == {})

    run(body)


def test_a_lost_lease_is_registered_again(etcd_server: EtcdServer, prefix: str) -> None:
    async def body() -> None:
        reg = TopologyRegistration([etcd_server.endpoint], info(), prefix=prefix, ttl=3,
                                   refresh=30.0)
        reg.start()
        await until("registered", lambda: len(keys_under(etcd_server, prefix)) == 2)
        old = reg.lease
        etcd_server.revoke(old)  # etcd lost it (restored from a backup, an operator's mistake)
        assert keys_under(etcd_server, prefix) == {}
        await until("registered again", lambda: len(keys_under(etcd_server, prefix)) == 2)
        assert {lease for _, lease in keys_under(etcd_server, prefix).values()} == {reg.lease}
        assert reg.lease != old
        await reg.stop()

    run(body)


def test_stop_removes_only_its_own_entry(etcd_server: EtcdServer, prefix: str) -> None:
    """TiProxy deletes the whole prefix when it closes, other proxies' entries with it."""
    async def body() -> None:
        other = TopologyRegistration([etcd_server.endpoint], info("10.9.8.6"), prefix=prefix)
        mine = TopologyRegistration([etcd_server.endpoint], info("10.9.8.7"), prefix=prefix)
        other.start()
        mine.start()
        await until("both registered", lambda: len(keys_under(etcd_server, prefix)) == 4)
        await mine.stop()
        assert sorted(keys_under(etcd_server, prefix)) == [
            f"{prefix}10.9.8.6:6000/info", f"{prefix}10.9.8.6:6000/ttl"]
        await other.stop()

    run(body)


def test_an_unreachable_etcd_is_retried_and_reported(etcd_server: EtcdServer,
                                                     prefix: str) -> None:
    """The first endpoint is down: the registration says why and goes through the second."""
    async def body() -> None:
        from tiproxy.playground.ports import free_port  # noqa: PLC0415

        dead = f"127.0.0.1:{free_port()}"
        reg = TopologyRegistration([dead, etcd_server.endpoint], info(), prefix=prefix, ttl=3)
        reg.start()
        await until("registered", lambda: len(keys_under(etcd_server, prefix)) == 2)
        await until("no error left", lambda: reg.error == "")
        await reg.stop()
        assert keys_under(etcd_server, prefix) == {}

    run(body)


def test_with_no_etcd_it_says_why_and_still_stops(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        from tiproxy.playground.ports import free_port  # noqa: PLC0415

        dead = f"127.0.0.1:{free_port()}"
        reg = TopologyRegistration([dead], info(), timeout=0.5)
        reg.start()
        await until("the failure reported", lambda: reg.error.startswith(f"http://{dead}: "))
        await reg.stop()  # returns: the entry would go with its lease

    run(body)
    assert "could not remove this proxy's entry from etcd" in caplog.text


# -- the proxy as its users run it ---------------------------------------------------------------

TIPROXY_PREFIX = "/topology/tiproxy/"


def global_unicast_ips() -> set[str]:
    """The machine's addresses that Go calls global unicast, as `ip` lists them."""
    out = json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, check=True,
                                    text=True).stdout)
    return {a["local"] for iface in out for a in iface.get("addr_info", [])
            if a.get("scope") == "global"}


def wait_keys(etcd: EtcdServer, addr: str, present: bool, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        keys = {k: v for k, v in keys_under(etcd, TIPROXY_PREFIX).items()
                if k.startswith(f"{TIPROXY_PREFIX}{addr}/")}
        if bool(keys) == present and (not present or len(keys) == 2):
            return keys
        assert time.monotonic() < deadline, f"{addr}: keys {keys}, wanted present={present}"
        time.sleep(0.1)


def registered_proxy(proxy_factory: ProxyFactory, etcd: EtcdServer, backend: MariaDBServer,
                     **options: Any) -> ProxyProcess:
    return proxy_factory([backend.addr], f'pd-addrs = ["{etcd.endpoint}"]', **options)


def test_the_proxy_registers_with_advertise_addr_and_leaves_on_sigterm(
        etcd_server: EtcdServer, backends: list[MariaDBServer],
        proxy_factory: ProxyFactory) -> None:
    started = int(time.time())
    proxy = registered_proxy(proxy_factory, etcd_server, backends[0],
                             args=["--advertise-addr", "proxy-7.example"])
    addr = f"proxy-7.example:{proxy.port}"
    keys = wait_keys(etcd_server, addr, True, WAIT)
    doc = json.loads(keys[f"{TIPROXY_PREFIX}{addr}/info"][0])
    assert doc == {
        "version": doc["version"], "git_hash": "None", "ip": "proxy-7.example",
        "port": str(proxy.port), "status_port": str(proxy.api_port),
        "deploy_path": str(Path(__import__("tiproxy").__file__).parent),  # `python -m tiproxy`
        "start_timestamp": doc["start_timestamp"]}
    assert started <= doc["start_timestamp"] <= time.time()
    lease = keys[f"{TIPROXY_PREFIX}{addr}/ttl"][1]
    left, granted, attached = lease_ttl(etcd_server, lease)
    assert granted == 45 and len(attached) == 2
    # The lease is kept alive (every 15 s): its time left goes down, then up again.
    deadline = time.monotonic() + 40
    while lease_ttl(etcd_server, lease)[0] >= left:
        assert time.monotonic() < deadline, "the lease was not kept alive"
        time.sleep(0.5)
    low = lease_ttl(etcd_server, lease)[0]
    while lease_ttl(etcd_server, lease)[0] <= low:
        assert time.monotonic() < deadline, "the lease was not kept alive"
        time.sleep(0.5)
    health = json.loads(proxy.api("/api/debug/health")[1])
    assert health["discovery"]["registration"] == "ok"
    with proxy.connect(APP) as conn, conn.cursor() as cur:  # the proxy works meanwhile
        cur.execute("SELECT 1")
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(20) == 0
    assert wait_keys(etcd_server, addr, False, 1) == {}  # gone when the process has exited
    assert lease_ttl(etcd_server, lease)[0] == -1
    assert "unregistered" in proxy.log()


def test_without_advertise_addr_a_global_address_and_sigkill_leaves_it_to_the_lease(
        etcd_server: EtcdServer, backends: list[MariaDBServer],
        proxy_factory: ProxyFactory) -> None:
    proxy = registered_proxy(proxy_factory, etcd_server, backends[0], sql_host="0.0.0.0")
    deadline = time.monotonic() + WAIT
    while True:
        mine = [k for k in keys_under(etcd_server, TIPROXY_PREFIX)
                if k.endswith(f":{proxy.port}/info")]
        if mine:
            break
        assert time.monotonic() < deadline, "not registered"
        time.sleep(0.1)
    addr = mine[0][len(TIPROXY_PREFIX):-len("/info")]
    ip = addr.rpartition(":")[0].strip("[]")
    assert ip in global_unicast_ips(), (ip, global_unicast_ips())  # not 0.0.0.0, not loopback
    assert proxy.proc is not None
    proxy.proc.kill()
    proxy.proc.wait()
    assert len(wait_keys(etcd_server, addr, True, 1)) == 2  # nobody removed them...
    wait_keys(etcd_server, addr, False, 60)  # ...until the 45-second lease ran out
