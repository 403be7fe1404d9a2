"""DNSNames against an injected resolver whose answers change and sometimes fail."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping

import pytest

from tiproxy.discovery.base import DiscoveredBackend
from tiproxy.discovery.dns import (
    MAX_ADDRESSES_PER_NAME,
    DNSNames,
    join_host_port,
    resolve_with_getaddrinfo,
    split_host_port,
)


class RecordingSink:
    def __init__(self) -> None:
        self.updates: list[tuple[str, dict[str, DiscoveredBackend]]] = []
        self.changed: asyncio.Event | None = None  # set on each update, for tests that run()

    def update(self, source: str, backends: Mapping[str, DiscoveredBackend]) -> None:
        self.updates.append((source, dict(backends)))
        if self.changed is not None:
            self.changed.set()

    @property
    def last(self) -> set[str]:
        return set(self.updates[-1][1])


class ScriptedResolver:
    """Answers from a table the test edits; an exception in the table is raised."""

    def __init__(self, answers: dict[str, list[str] | Exception]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        answer = self.answers[host]
        if isinstance(answer, Exception):
            raise answer
        return list(answer)


def refresh(source: DNSNames, sink: RecordingSink) -> None:
    asyncio.run(source.refresh(sink))


def test_union_of_names_with_their_ports() -> None:
    resolver = ScriptedResolver({"tidb.ns.svc": ["10.0.0.2", "10.0.0.1"], "other": ["fd00::5"]})
    source = DNSNames(["tidb.ns.svc:4000", "other:4001"], resolver=resolver)
    sink = RecordingSink()
    refresh(source, sink)
    assert sink.updates[0][0] == "dns"
    assert sink.last == {"10.0.0.1:4000", "10.0.0.2:4000", "[fd00::5]:4001"}
    assert sink.updates[0][1]["10.0.0.1:4000"] == DiscoveredBackend(addr="10.0.0.1:4000")
    assert sorted(resolver.calls) == [("other", 4001), ("tidb.ns.svc", 4000)]
    assert source.error == ""


def test_changes_are_sent_and_repeats_are_not() -> None:
    resolver = ScriptedResolver({"tidb": ["10.0.0.1"]})
    source = DNSNames(["tidb:4000"], resolver=resolver)
    sink = RecordingSink()
    refresh(source, sink)
    refresh(source, sink)
    assert len(sink.updates) == 1
    resolver.answers["tidb"] = ["10.0.0.1", "10.0.0.2"]  # scale out
    refresh(source, sink)
    assert sink.last == {"10.0.0.1:4000", "10.0.0.2:4000"}
    resolver.answers["tidb"] = ["10.0.0.2"]  # scale in
    refresh(source, sink)
    assert sink.last == {"10.0.0.2:4000"}
    resolver.answers["tidb"] = []  # a successful empty answer empties the set
    refresh(source, sink)
    assert sink.last == set()
    assert len(sink.updates) == 4


def test_failed_lookup_keeps_the_last_addresses_of_that_name() -> None:
    resolver = ScriptedResolver({"a": ["10.0.0.1"], "b": ["10.0.1.1"]})
    source = DNSNames(["a:4000", "b:4000"], resolver=resolver)
    sink = RecordingSink()
    refresh(source, sink)
    resolver.answers["a"] = socket.gaierror(
        socket.EAI_AGAIN, "Temporary failure in name resolution"
    )
    resolver.answers["b"] = ["10.0.1.2"]
    refresh(source, sink)
    assert sink.last == {"10.0.0.1:4000", "10.0.1.2:4000"}
    assert source.error.startswith("a:4000: gaierror")
    resolver.answers["b"] = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    refresh(source, sink)  # both fail: nothing changes, nothing is sent
    assert len(sink.updates) == 2
    assert "a:4000" in source.error and "b:4000" in source.error
    resolver.answers["a"] = ["10.0.0.3"]
    resolver.answers["b"] = ["10.0.1.2"]
    refresh(source, sink)
    assert sink.last == {"10.0.0.3:4000", "10.0.1.2:4000"}
    assert source.error == ""


def test_nothing_is_sent_while_every_lookup_has_failed() -> None:
    resolver = ScriptedResolver({"a": OSError("resolver down")})
    source = DNSNames(["a:4000"], resolver=resolver)
    sink = RecordingSink()
    refresh(source, sink)
    assert sink.updates == []
    assert "resolver down" in source.error
    resolver.answers["a"] = ["10.0.0.1"]
    refresh(source, sink)
    assert sink.last == {"10.0.0.1:4000"}


def test_a_lookup_that_hangs_times_out_and_keeps_the_last_set() -> None:
    hang = asyncio.Event()

    async def resolver(host: str, port: int) -> list[str]:
        if hang.is_set():
            await asyncio.sleep(60)
        return ["10.0.0.1"]

    source = DNSNames(["a:4000"], interval=0.05, resolver=resolver)
    source._timeout = 0.1
    sink = RecordingSink()
    refresh(source, sink)
    hang.set()
    refresh(source, sink)
    assert sink.last == {"10.0.0.1:4000"}
    assert "TimeoutError" in source.error


def test_answers_are_bounded() -> None:
    many = [f"10.1.{i // 256}.{i % 256}" for i in range(MAX_ADDRESSES_PER_NAME + 50)]
    source = DNSNames(["a:4000"], resolver=ScriptedResolver({"a": many}))
    sink = RecordingSink()
    refresh(source, sink)
    assert len(sink.last) == MAX_ADDRESSES_PER_NAME


def test_run_re_resolves_on_the_interval() -> None:
    answers = iter([["10.0.0.1"], ["10.0.0.1"]])  # then a pod is added

    async def resolver(host: str, port: int) -> list[str]:
        return next(answers, ["10.0.0.1", "10.0.0.9"])

    source = DNSNames(["tidb:4000"], interval=0.02, resolver=resolver)
    sink = RecordingSink()

    async def main() -> None:
        sink.changed = asyncio.Event()
        task = asyncio.create_task(source.run(sink))
        while len(sink.updates) < 2:
            await sink.changed.wait()
            sink.changed.clear()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(main(), 5))
    assert [set(backends) for _, backends in sink.updates] == [
        {"10.0.0.1:4000"},
        {"10.0.0.1:4000", "10.0.0.9:4000"},
    ]


def test_default_resolver_uses_getaddrinfo() -> None:
    assert asyncio.run(resolve_with_getaddrinfo("127.0.0.1", 4000)) == ["127.0.0.1"]
    sink = RecordingSink()
    refresh(DNSNames(["localhost:4000"]), sink)
    assert sink.last & {"127.0.0.1:4000", "[::1]:4000"}


@pytest.mark.parametrize(
    ("name", "expected"),
    [("tidb:4000", ("tidb", 4000)), ("[::1]:4000", ("::1", 4000)), ("10.0.0.1:1", ("10.0.0.1", 1))],
)
def test_split_host_port(name: str, expected: tuple[str, int]) -> None:
    assert split_host_port(name) == expected


@pytest.mark.parametrize("name", ["tidb", "tidb:", ":4000", "tidb:http", "tidb:0", "tidb:70000"])
def test_split_host_port_rejects(name: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        split_host_port(name)


def test_join_host_port() -> None:
    assert join_host_port("10.0.0.1", 4000) == "10.0.0.1:4000"
    assert join_host_port("fd00::1", 4000) == "[fd00::1]:4000"
