"""The virtual IP's election (ha/election.py) against a real etcd: TiProxy's key layout, one owner
at a time, a resignation handing over at once, an owner whose lease etcd lost retiring when
another leads, and an owner keeping its place through an etcd pause shorter than its lease."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from support.etcdkeys import keys_under, lease_ttl
from tiproxy.ha.election import SESSION_TTL, Election
from tiproxy.playground.etcd import EtcdServer

pytestmark = pytest.mark.integration


class Candidate:
    """An Election whose callbacks record what happened to it."""

    def __init__(self, etcd: EtcdServer, name: str, value: str) -> None:
        self.events: list[str] = []
        self.election = Election([etcd.endpoint], name, value,
                                 on_elected=self._record("elected"),
                                 on_retired=self._record("retired"))

    def _record(self, event: str) -> Callable[[], Awaitable[None]]:
        async def record() -> None:
            self.events.append(event)
        return record


async def until(what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.05)


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    return f"/tiproxy/vip/{request.node.name}/owner"


def test_one_owner_and_a_resignation_hands_over_at_once(etcd_server: EtcdServer,
                                                        name: str) -> None:
    async def body() -> None:
        a = Candidate(etcd_server, name, "10.0.0.1:6000")
        b = Candidate(etcd_server, name, "10.0.0.2:6000")
        a.election.start()
        await until("a leads", lambda: a.events == ["elected"])
        b.election.start()
        await until("b is a candidate", lambda: len(keys_under(etcd_server, name + "/")) == 2)
        keys = keys_under(etcd_server, name + "/")
        # concurrency.Election's layout: <name>/<lease in hex>, value the candidate's address
        assert {(k.rpartition("/")[2], v) for k, (v, _) in keys.items()} == {
            (f"{a.election.lease:x}", "10.0.0.1:6000"), (f"{b.election.lease:x}", "10.0.0.2:6000")}
        assert b.events == [] and not b.election.owner
        await a.election.stop()
        lease = a.election.lease
        resigned = time.monotonic()
        await a.election.resign()
        assert lease_ttl(etcd_server, lease)[0] == -1  # revoked: b need not wait for it
        await until("b leads", lambda: b.events == ["elected"])
        print(f"\nhanded over {time.monotonic() - resigned:.2f} s after the resignation")
        assert a.events == ["elected"]  # the caller gave up what it held itself
        await b.election.stop()
        await b.election.resign()
        assert keys_under(etcd_server, name + "/") == {}

    asyncio.run(body())


def test_an_owner_whose_lease_was_lost_retires_when_another_leads(etcd_server: EtcdServer,
                                                                  name: str) -> None:
    async def body() -> None:
        a = Candidate(etcd_server, name, "10.0.0.1:6000")
        b = Candidate(etcd_server, name, "10.0.0.2:6000")
        a.election.start()
        await until("a leads", lambda: a.election.owner)
        b.election.start()
        await until("b is a candidate", lambda: len(keys_under(etcd_server, name + "/")) == 2)
        etcd_server.revoke(a.election.lease)  # etcd lost a's lease (or a was cut off too long)
        await until("b leads", lambda: b.events == ["elected"])
        await until("a retires", lambda: a.events == ["elected", "retired"])
        assert not a.election.owner and b.election.owner
        for c in (a, b):
            await c.election.stop()
            await c.election.resign()

    asyncio.run(body())


def test_an_owner_keeps_its_place_through_a_short_etcd_pause(etcd_server: EtcdServer,
                                                             name: str) -> None:
    async def body() -> None:
        a = Candidate(etcd_server, name, "10.0.0.1:6000")
        b = Candidate(etcd_server, name, "10.0.0.2:6000")
        a.election.start()
        await until("a leads", lambda: a.election.owner)
        b.election.start()
        await until("b is a candidate", lambda: len(keys_under(etcd_server, name + "/")) == 2)
        etcd_server.pause()
        try:
            await asyncio.sleep(SESSION_TTL / 2)
        finally:
            etcd_server.resume()
        await asyncio.sleep(2 * SESSION_TTL)
        assert a.events == ["elected"] and b.events == []
        for c in (a, b):
            await c.election.stop()
            await c.election.resign()

    asyncio.run(body())
