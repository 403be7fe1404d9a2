"""The router's merge of discovery sources, draining, scoring and namespaces (no sockets)."""

from __future__ import annotations

import asyncio

from tiproxy.balance.router import DRAIN_REMOVED, Router
from tiproxy.config import parse_config
from tiproxy.discovery.base import DiscoveredBackend
from tiproxy.discovery.dns import DNSNames


def found(*addrs: str) -> dict[str, DiscoveredBackend]:
    return {a: DiscoveredBackend(a) for a in addrs}


def test_a_backend_stays_while_any_source_lists_it() -> None:
    r = Router()
    r.update("static", found("10.0.0.1:3306"))
    r.update("dns", found("10.0.0.1:3306", "10.0.0.2:3306"))
    r.update("static", {})
    assert not r.backends["10.0.0.1:3306"].draining  # dns still has it
    r.update("dns", found("10.0.0.2:3306"))
    assert "10.0.0.1:3306" not in r.backends  # no sessions: forgotten at once


def test_a_backend_that_leaves_with_sessions_drains_then_is_forgotten() -> None:
    r = Router()
    r.update("etcd", found("a:1", "b:1"))
    r.backends["a:1"].connections = 3
    r.update("etcd", found("b:1"))
    assert r.backends["a:1"].drained_by == {DRAIN_REMOVED}
    assert [b.addr for b in r.candidates()] == ["b:1"]
    r.backends["a:1"].connections = 0
    r.forget_empty()
    assert list(r.backends) == ["b:1"]


def test_dns_names_are_followed_as_they_change() -> None:
    answers = {"db.svc": ["10.0.0.1", "10.0.0.2"]}

    async def resolve(host: str, port: int) -> list[str]:
        return list(answers[host])

    async def main() -> None:
        r = Router()
        dns = DNSNames(["db.svc:3306"], interval=0.01, resolver=resolve)
        await dns.refresh(r)
        assert set(r.backends) == {"10.0.0.1:3306", "10.0.0.2:3306"}
        answers["db.svc"] = ["10.0.0.2", "10.0.0.3"]  # a pod replaced
        r.backends["10.0.0.1:3306"].connections = 1
        await dns.refresh(r)
        assert set(r.backends) == {"10.0.0.1:3306", "10.0.0.2:3306", "10.0.0.3:3306"}
        assert r.backends["10.0.0.1:3306"].draining
        assert {b.addr for b in r.candidates()} == {"10.0.0.2:3306", "10.0.0.3:3306"}

    asyncio.run(main())


def test_location_then_load_then_connections() -> None:
    cfg = parse_config('[balance]\nlabel-name = "zone"\n[labels]\nzone = "east"\n'
                       '[proxy.backend-labels]\n"a:1" = { zone = "west" }\n'
                       '"b:1" = { zone = "east" }\n"c:1" = { zone = "east" }\n')
    r = Router()
    r.configure(cfg)
    r.update("static", found("a:1", "b:1", "c:1"))
    r.backends["b:1"].connections = 5
    assert [b.addr for b in r.candidates()] == ["c:1", "b:1", "a:1"]
    r.backends["c:1"].load.threads_running = 8.0  # four load steps busier
    assert [b.addr for b in r.candidates()] == ["b:1", "c:1", "a:1"]
    assert r.score(r.backends["a:1"]) > r.score(r.backends["c:1"]) > r.score(r.backends["b:1"])


def test_namespaces_route_users_to_their_backends() -> None:
    cfg = parse_config('[namespaces.bi]\nusers = ["report"]\nbackend-addrs = ["x:1"]\n')
    r = Router()
    r.configure(cfg)
    r.update("static", found("a:1", "x:1"))
    assert [b.addr for b in r.candidates(namespace=r.namespace_of_user("report"))] == ["x:1"]
    assert [b.addr for b in r.candidates(namespace=r.namespace_of_user("app"))] == ["a:1"]


def test_unhealthy_backends_drain_and_come_back() -> None:
    r = Router()
    r.update("static", found("a:1", "b:1"))
    r.set_health(r.backends["a:1"], "galera node not synced")
    assert r.backends["a:1"].status == "unhealthy"
    assert [b.addr for b in r.candidates()] == ["b:1"]
    r.set_health(r.backends["a:1"], "")
    assert r.backends["a:1"].status == "healthy"


def test_a_doubted_backend_is_tried_last_until_cleared() -> None:
    r = Router()
    r.update("static", found("a:1", "b:1"))
    r.backends["b:1"].connections = 4  # a:1 would be first
    r.doubt(r.backends["a:1"], "a session got 1047 (WSREP not ready)")
    assert [b.addr for b in r.candidates()] == ["b:1", "a:1"]  # still there if b:1 fails
    assert r.score(r.backends["a:1"]) > r.score(r.backends["b:1"])
    assert r.backends["a:1"].status == "healthy"  # a doubt is not a verdict
    r.backends["a:1"].doubt = ""  # what a passing health check does
    assert [b.addr for b in r.candidates()] == ["a:1", "b:1"]
