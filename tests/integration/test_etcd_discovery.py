"""EtcdTopology against a real etcd in which the tests play TiDB (tiproxy.playground.etcd).

Each test runs the source in a thread of its own with its own event loop, records every set it
hands over, and registers its TiDBs under a prefix of its own on the session's etcd.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping

import aiohttp
import pytest

from tiproxy.discovery.base import DiscoveredBackend
from tiproxy.discovery.etcd import (
    MAX_BACKENDS,
    EtcdError,
    EtcdTopology,
    LineSplitter,
    TopologyView,
    _CompactedRevisionError,
    apply_watch_message,
    parse_tidb_info,
    prefix_range_end,
)
from tiproxy.playground.etcd import EtcdServer
from tiproxy.playground.ports import free_port

pytestmark = pytest.mark.integration

WAIT = 8.0  # generous: the machine is shared with other test runs


def tidb_info(status_port: int, **labels: str) -> dict[str, object]:
    """A topology info value shaped like the one TiDB writes."""
    return {
        "version": "8.0.11-TiDB-v8.5.0",
        "git_hash": "d13e52ed6e22cc5789bed7c64c861578cd2ed55b",
        "ip": "127.0.0.1",
        "status_port": status_port,
        "deploy_path": "/opt/tidb/bin",
        "start_timestamp": 1_700_000_000,
        "labels": labels,
    }


class RecordingSink:
    """Keeps every set the source hands over; tests wait on it from their own thread."""

    def __init__(self) -> None:
        self.updates: list[dict[str, DiscoveredBackend]] = []
        self._changed = threading.Condition()

    def update(self, source: str, backends: Mapping[str, DiscoveredBackend]) -> None:
        assert source == "etcd"
        with self._changed:
            self.updates.append(dict(backends))
            self._changed.notify_all()

    def wait_for(self, addrs: set[str], timeout: float = WAIT) -> dict[str, DiscoveredBackend]:
        with self._changed:
            seen = self._changed.wait_for(
                lambda: bool(self.updates) and set(self.updates[-1]) == addrs, timeout
            )
            assert seen, f"never saw {sorted(addrs)}; got {[sorted(u) for u in self.updates]}"
            return self.updates[-1]


class SourceThread:
    """Runs source.run(sink) on an event loop in a thread until stop()."""

    def __init__(self, source: EtcdTopology) -> None:
        self.source = source
        self.sink = RecordingSink()
        self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(source.run(self.sink))
        self._thread = threading.Thread(target=self._run, name="etcd-source", daemon=True)

    def _run(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(self._task)
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    def start(self) -> None:
        self._thread.start()

    def wait_until(self, condition: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert not self._task.done(), f"source stopped: {self._task}"
            assert time.monotonic() < deadline, f"timed out waiting until {condition}"
            time.sleep(0.05)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(10)
        assert not self._thread.is_alive()
        assert self._task.cancelled(), f"source ended on its own: {self._task}"


@contextlib.contextmanager
def watching(endpoints: list[str], prefix: str, timeout: float = 1.0) -> Iterator[SourceThread]:
    runner = SourceThread(EtcdTopology(endpoints, prefix=prefix, timeout=timeout))
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return f"/{request.node.name}/topology/tidb/"


def test_reports_registered_tidbs_with_labels_and_status_port(
    etcd_server: EtcdServer, prefix: str
) -> None:
    etcd_server.register_tidb("127.0.0.1:4000", tidb_info(10080, zone="east"), 10, prefix=prefix)
    etcd_server.register_tidb("127.0.0.1:4001", tidb_info(10081, zone="west"), 10, prefix=prefix)
    # A TiDB that crashed long ago: its info stays, its ttl is gone. Not a backend.
    etcd_server.put(f"{prefix}127.0.0.1:4999/info", json.dumps(tidb_info(10999)))
    with watching([etcd_server.endpoint], prefix) as runner:
        first = runner.sink.wait_for({"127.0.0.1:4000", "127.0.0.1:4001"})
        assert first["127.0.0.1:4000"] == DiscoveredBackend(
            addr="127.0.0.1:4000",
            labels={"zone": "east"},
            status_port=10080,
            version="8.0.11-TiDB-v8.5.0",
        )
        assert first["127.0.0.1:4001"].labels == {"zone": "west"}
        assert first["127.0.0.1:4001"].status_port == 10081
        assert runner.source.error == ""

        etcd_server.register_tidb("127.0.0.1:4002", tidb_info(10082), 10, prefix=prefix)
        third = runner.sink.wait_for({"127.0.0.1:4000", "127.0.0.1:4001", "127.0.0.1:4002"})
        assert third["127.0.0.1:4002"].status_port == 10082
        assert third["127.0.0.1:4002"].labels == {}

        etcd_server.deregister("127.0.0.1:4001", prefix=prefix)
        runner.sink.wait_for({"127.0.0.1:4000", "127.0.0.1:4002"})
    for addr in ("127.0.0.1:4000", "127.0.0.1:4002"):
        etcd_server.deregister(addr, prefix=prefix)


def test_expired_lease_removes_the_backend(etcd_server: EtcdServer, prefix: str) -> None:
    etcd_server.register_tidb("127.0.0.1:4000", tidb_info(10080), 10, prefix=prefix)
    etcd_server.register_tidb("127.0.0.1:4001", tidb_info(10081), 2, prefix=prefix)
    with watching([etcd_server.endpoint], prefix) as runner:
        runner.sink.wait_for({"127.0.0.1:4000", "127.0.0.1:4001"})
        updates_before = len(runner.sink.updates)
        etcd_server.expire(
            "127.0.0.1:4001", prefix=prefix
        )  # the TiDB hangs or dies: nobody keeps its lease
        started = time.monotonic()
        runner.sink.wait_for({"127.0.0.1:4000"}, timeout=6.0)
        assert time.monotonic() - started < 4.0  # TTL 2 s, plus etcd's expiry sweep
        # Only the ttl key went: exactly one more set, and never an empty one.
        assert len(runner.sink.updates) == updates_before + 1
    assert all(runner.sink.updates)
    etcd_server.deregister("127.0.0.1:4000", prefix=prefix)
    etcd_server.delete(f"{prefix}127.0.0.1:4001/info")


def test_keeps_the_last_set_while_etcd_is_down_and_resumes_after(
    etcd_server: EtcdServer, prefix: str
) -> None:
    etcd_server.register_tidb("127.0.0.1:4000", tidb_info(10080), 10, prefix=prefix)
    etcd_server.register_tidb("127.0.0.1:4001", tidb_info(10081), 10, prefix=prefix)
    with watching([etcd_server.endpoint], prefix) as runner:
        runner.sink.wait_for({"127.0.0.1:4000", "127.0.0.1:4001"})
        updates_before = len(runner.sink.updates)
        etcd_server.stop()
        try:
            runner.wait_until("the source reports an error", lambda: runner.source.error != "")
            time.sleep(1.5)  # several failed attempts, with backoff
            assert len(runner.sink.updates) == updates_before  # no empty set, no set at all
            assert etcd_server.endpoint in runner.source.error
        finally:
            etcd_server.start()
        # The leases survived the restart; a change made now must arrive over a new watch.
        etcd_server.register_tidb("127.0.0.1:4002", tidb_info(10082), 10, prefix=prefix)
        runner.sink.wait_for({"127.0.0.1:4000", "127.0.0.1:4001", "127.0.0.1:4002"})
        assert runner.source.error == ""
        etcd_server.deregister("127.0.0.1:4000", prefix=prefix)
        runner.sink.wait_for({"127.0.0.1:4001", "127.0.0.1:4002"})
    for addr in ("127.0.0.1:4001", "127.0.0.1:4002"):
        etcd_server.deregister(addr, prefix=prefix)


def test_a_frozen_etcd_is_noticed_by_the_probe_of_a_silent_watch(
    etcd_server: EtcdServer, prefix: str
) -> None:
    etcd_server.register_tidb("127.0.0.1:4000", tidb_info(10080), 10, prefix=prefix)
    # timeout 0.5 s: a watch silent for 1 s is probed, and the probe gives up after 0.5 s.
    with watching([etcd_server.endpoint], prefix, timeout=0.5) as runner:
        runner.sink.wait_for({"127.0.0.1:4000"})
        time.sleep(1.5)  # silent longer than the idle limit: the probe passes
        assert runner.source.error == ""
        etcd_server.pause()  # the TCP connection stays open; nothing answers on it
        try:
            runner.wait_until("the probe fails", lambda: runner.source.error != "", timeout=5.0)
        finally:
            etcd_server.resume()
        assert len(runner.sink.updates) == 1
        etcd_server.register_tidb("127.0.0.1:4001", tidb_info(10081), 10, prefix=prefix)
        runner.sink.wait_for({"127.0.0.1:4000", "127.0.0.1:4001"})
        assert runner.source.error == ""
    for addr in ("127.0.0.1:4000", "127.0.0.1:4001"):
        etcd_server.deregister(addr, prefix=prefix)


def test_tries_the_next_endpoint(etcd_server: EtcdServer, prefix: str) -> None:
    etcd_server.register_tidb("127.0.0.1:4000", tidb_info(10080), 10, prefix=prefix)
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    with watching([dead, etcd_server.endpoint], prefix) as runner:
        runner.sink.wait_for({"127.0.0.1:4000"})
        assert runner.source.error == ""
    etcd_server.deregister("127.0.0.1:4000", prefix=prefix)


def test_a_compacted_start_revision_asks_for_a_new_read(
    etcd_server: EtcdServer, prefix: str
) -> None:
    etcd_server.put(f"{prefix}127.0.0.1:4000/info", "{}")
    etcd_server.compact()
    source = EtcdTopology([etcd_server.endpoint], prefix=prefix, timeout=1.0)

    async def watch_from_revision_1() -> None:
        async with aiohttp.ClientSession() as session:
            view = TopologyView(prefix)
            await source._watch(session, etcd_server.url, view, 1, RecordingSink())

    with pytest.raises(_CompactedRevisionError):
        asyncio.run(asyncio.wait_for(watch_from_revision_1(), WAIT))
    etcd_server.delete(f"{prefix}127.0.0.1:4000/info")


# The pieces without I/O, fed what the gateway sends.

PREFIX = "/topology/tidb/"


def test_view_needs_both_keys_and_survives_ttl_refreshes() -> None:
    view = TopologyView(PREFIX)
    view.put(b"/topology/tidb/10.0.0.1:4000/info", json.dumps(tidb_info(10080)).encode())
    assert view.backends() == {}
    view.put(b"/topology/tidb/10.0.0.1:4000/ttl", b"1700000000000000000")
    assert set(view.backends()) == {"10.0.0.1:4000"}
    view.put(b"/topology/tidb/10.0.0.1:4000/ttl", b"1700000030000000000")
    assert set(view.backends()) == {"10.0.0.1:4000"}
    view.delete(b"/topology/tidb/10.0.0.1:4000/ttl")
    assert view.backends() == {}
    view.delete(b"/topology/tidb/10.0.0.1:4000/info")
    view.delete(b"/topology/tidb/10.0.0.9:4000/info")  # unknown: ignored
    assert view._entries == {}


@pytest.mark.parametrize(
    "key",
    [
        b"/topology/tidb/10.0.0.1:4000/other",
        b"/topology/tidb/info",
        b"/topology/tidb/a/b/info",
        b"/topology/tidbx/10.0.0.1:4000/info",
        b"/topology/tidb/\xff:4000/info",
    ],
)
def test_view_ignores_other_keys(key: bytes) -> None:
    view = TopologyView(PREFIX)
    view.put(key, b"{}")
    assert view._entries == {}


def test_view_is_bounded() -> None:
    view = TopologyView(PREFIX)
    for i in range(MAX_BACKENDS + 10):
        view.put(f"/topology/tidb/10.0.{i // 256}.{i % 256}:4000/ttl".encode(), b"1")
        view.put(f"/topology/tidb/10.0.{i // 256}.{i % 256}:4000/info".encode(), b"{}")
    assert len(view.backends()) == MAX_BACKENDS
    assert view.ignored == 20


@pytest.mark.parametrize("value", [b"not json", b"[1, 2]", b"{" + b" " * 70_000 + b"}"])
def test_info_that_is_not_tidbs_is_not_a_backend(value: bytes) -> None:
    assert parse_tidb_info("10.0.0.1:4000", value) is None


def test_info_fields_of_the_wrong_type_are_dropped() -> None:
    value = json.dumps({"status_port": "10080", "version": 5, "labels": {"zone": "a", "n": 1}})
    backend = parse_tidb_info("10.0.0.1:4000", value.encode())
    assert backend == DiscoveredBackend(addr="10.0.0.1:4000", labels={"zone": "a"})


def test_line_splitter_byte_at_a_time() -> None:
    stream = b'{"a":1}\n\n{"b":2}\n{"c"'
    splitter = LineSplitter(limit=16)
    lines: list[bytes] = []
    for i in range(len(stream)):
        lines += splitter.feed(stream[i : i + 1])
    assert lines == [b'{"a":1}', b"", b'{"b":2}']
    assert splitter.feed(b":3}\n") == [b'{"c":3}']


def test_line_splitter_refuses_a_line_over_its_limit() -> None:
    splitter = LineSplitter(limit=8)
    splitter.feed(b"12345")
    with pytest.raises(EtcdError, match="longer than 8"):
        splitter.feed(b"6789")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_watch_messages_as_the_gateway_sends_them() -> None:
    view = TopologyView(PREFIX)
    created = {"result": {"header": {"revision": "7"}, "created": True}}
    assert apply_watch_message(json.dumps(created).encode(), view) == 0
    puts = {
        "result": {
            "events": [
                {"kv": {"key": _b64(f"{PREFIX}10.0.0.1:4000/info"), "value": _b64("{}")}},
                {"kv": {"key": _b64(f"{PREFIX}10.0.0.1:4000/ttl"), "value": _b64("1")}},
            ]
        }
    }
    assert apply_watch_message(json.dumps(puts).encode(), view) == 2
    assert set(view.backends()) == {"10.0.0.1:4000"}
    delete = {
        "result": {
            "events": [{"type": "DELETE", "kv": {"key": _b64(f"{PREFIX}10.0.0.1:4000/ttl")}}]
        }
    }
    assert apply_watch_message(json.dumps(delete).encode(), view) == 1
    assert view.backends() == {}
    canceled = {"result": {"canceled": True, "compact_revision": "9"}}
    with pytest.raises(_CompactedRevisionError):
        apply_watch_message(json.dumps(canceled).encode(), view)
    with pytest.raises(EtcdError, match="no leader"):
        apply_watch_message(b'{"error": {"grpc_code": 14, "message": "no leader"}}', view)


def test_prefix_range_end() -> None:
    assert prefix_range_end(b"/topology/tidb/") == b"/topology/tidb0"
    assert prefix_range_end(b"a\xff\xff") == b"b"
    assert prefix_range_end(b"\xff") == b"\0"
