"""Watch TiDB's topology in PD's etcd and report the TiDB servers that are alive.

Each TiDB writes two keys under `/topology/tidb/<ip:port>/` (pkg/domain/infosync in TiDB):
`info`, a JSON document (`version`, `git_hash`, `ip`, `status_port`, `deploy_path`,
`start_timestamp`, `labels`) put without a lease, and `ttl`, a timestamp put with the lease of a
45-second session that TiDB keeps alive. A server is a backend iff both keys exist: a crashed
TiDB leaves its `info` behind, but its `ttl` vanishes when the lease expires. TiProxy (Go) polls
this prefix; we watch it.

Theory of operation: one range read gives the prefix's keys and the revision they were read at;
a watch from the next revision then streams every later change, so no change is missed and none
is applied twice. After each batch of events the complete set is recomputed and handed to the
sink if it differs from the last one sent (TiDB refreshes `ttl` every 30 s, which changes
nothing). A watch that breaks, or whose start revision was compacted away, is followed by a new
range read and a new watch; a failure moves to the next endpoint after a backoff, sets `error`,
and keeps the last set, which is only ever replaced by what a successful read says.

The client is etcd's v3 JSON gateway (grpc-gateway, on by default in etcd 3.4+ and in PD) over
aiohttp, which the proxy already depends on: `POST /v3/kv/range` and a streaming
`POST /v3/watch` that answers with one JSON object per line; keys and values are base64 and
64-bit integers are decimal strings. A stream that stays silent is probed with a cheap
linearizable range, which also fails on a member cut off from its quorum.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from tiproxy.discovery.base import BackendSink, DiscoveredBackend
from tiproxy.discovery.etcdapi import (
    FAILURES,
    MAX_MESSAGE_BYTES,
    EtcdError,
    b64,
    client_session,
    endpoint_url,
    json_object,
    post,
    prefix_range_end,
    unb64,
)

log = logging.getLogger("tiproxy.discovery")

TIDB_TOPOLOGY_PREFIX = "/topology/tidb/"
_INFO = "info"
_TTL = "ttl"

# A topology holds one entry per TiDB; a writer gone wrong must not grow our map (and the set
# handed to the router) without limit. Far above any real cluster.
MAX_BACKENDS = 1024
# One info document; larger ones are not TiDB's and are ignored rather than parsed.
_MAX_INFO_BYTES = 64 * 1024
_BACKOFF_FIRST = 0.2
_BACKOFF_MAX = 2.0  # TiProxy retries its topology read every second; stay in that range
# etcd's server-side check that the member still has a leader, forwarded by grpc-gateway as gRPC
# metadata: the watch is cancelled instead of hanging silently on a partitioned member.
_REQUIRE_LEADER = {"Grpc-Metadata-hasleader": "true"}


class _CompactedRevisionError(Exception):
    """The watch's start revision was compacted away: read the whole range again."""


def parse_tidb_info(addr: str, value: bytes) -> DiscoveredBackend | None:
    """The backend described by a TiDB `info` value, or None if the value is not one."""
    if len(value) > _MAX_INFO_BYTES:
        log.warning("etcd: %s: info of %d bytes ignored", addr, len(value))
        return None
    try:
        doc = json.loads(value)
    except ValueError as exc:
        log.warning("etcd: %s: info is not JSON: %s", addr, exc)
        return None
    if not isinstance(doc, dict):
        log.warning("etcd: %s: info is not a JSON object", addr)
        return None
    raw_labels = doc.get("labels")
    labels = (
        {str(k): v for k, v in raw_labels.items() if isinstance(v, str)}
        if isinstance(raw_labels, dict)
        else {}
    )
    port = doc.get("status_port")
    status_port = port if isinstance(port, int) and 0 < port < 65536 else None
    version = doc.get("version")
    return DiscoveredBackend(
        addr=addr,
        labels=labels,
        status_port=status_port,
        version=version if isinstance(version, str) else "",
    )


@dataclass(slots=True)
class _Entry:
    info: DiscoveredBackend | None = None  # None: no info key, or one that is not TiDB's
    alive: bool = False  # the ttl key exists


class TopologyView:
    """The keys under the prefix as far as they matter: each address's info and its ttl key."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._entries: dict[str, _Entry] = {}
        self.ignored = 0  # addresses not tracked because MAX_BACKENDS were already

    def put(self, key: bytes, value: bytes) -> None:
        parsed = self._split(key)
        if parsed is None:
            return
        addr, kind = parsed
        entry = self._entries.get(addr)
        if entry is None:
            if len(self._entries) >= MAX_BACKENDS:
                self.ignored += 1
                return
            entry = self._entries[addr] = _Entry()
        if kind == _TTL:
            entry.alive = True
        else:
            entry.info = parse_tidb_info(addr, value)

    def delete(self, key: bytes) -> None:
        parsed = self._split(key)
        entry = self._entries.get(parsed[0]) if parsed else None
        if parsed is None or entry is None:
            return
        if parsed[1] == _TTL:
            entry.alive = False
        else:
            entry.info = None
        if not entry.alive and entry.info is None:
            del self._entries[parsed[0]]

    def backends(self) -> dict[str, DiscoveredBackend]:
        return {a: e.info for a, e in self._entries.items() if e.alive and e.info is not None}

    def _split(self, key: bytes) -> tuple[str, str] | None:
        """`<prefix><addr>/info` -> (addr, "info"); None for any other key."""
        try:
            text = key.decode()
        except UnicodeDecodeError:
            return None
        if not text.startswith(self._prefix):
            return None
        addr, sep, kind = text[len(self._prefix) :].rpartition("/")
        if not sep or not addr or "/" in addr or kind not in (_INFO, _TTL):
            return None
        return addr, kind


class LineSplitter:
    """Cuts the watch stream into lines; a line longer than `limit` is a protocol error."""

    def __init__(self, limit: int = MAX_MESSAGE_BYTES) -> None:
        self._limit = limit
        self._partial = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        lines: list[bytes] = []
        view = memoryview(data)
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            self._append(view[start:end])
            lines.append(bytes(self._partial))
            self._partial.clear()
            start = end + 1
        self._append(view[start:])
        return lines

    def _append(self, chunk: memoryview) -> None:
        if len(self._partial) + len(chunk) > self._limit:
            raise EtcdError(f"watch message longer than {self._limit} bytes")
        self._partial += chunk


def apply_watch_message(line: bytes, view: TopologyView) -> int:
    """Apply one line of the watch stream to `view`; returns how many events it carried."""
    doc = json_object(json.loads(line), "watch message")
    if "error" in doc:
        error = json_object(doc["error"], "watch error")
        raise EtcdError(f"watch failed: {error.get('message', error)}")
    result = json_object(doc.get("result", {}), "watch result")
    if result.get("canceled"):
        compacted = int(result.get("compact_revision", 0))
        if compacted:
            raise _CompactedRevisionError(f"revision compacted (now {compacted})")
        raise EtcdError(f"watch canceled: {result.get('cancel_reason', 'no reason given')}")
    events = result.get("events", [])
    for event in events:
        kv = json_object(json_object(event, "watch event").get("kv"), "watch event kv")
        key = unb64(kv["key"])
        if event.get("type") == "DELETE":
            view.delete(key)
        else:  # PUT is enum value 0, which the gateway leaves out
            view.put(key, unb64(kv.get("value", "")))
    return len(events)


class EtcdTopology:
    """A discovery source that follows TiDB's topology in PD's etcd (see the module docstring)."""

    name = "etcd"

    def __init__(
        self, endpoints: Sequence[str], prefix: str = TIDB_TOPOLOGY_PREFIX, timeout: float = 5.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("etcd discovery needs at least one endpoint")
        self._tls = tls  # `[security] cluster-tls`: etcd is reached over HTTPS
        self._urls = [endpoint_url(e, tls is not None) for e in endpoints]
        self._prefix = prefix if prefix.endswith("/") else prefix + "/"
        self._timeout = timeout
        self._idle = 2 * timeout  # a watch silent this long is probed
        self._last: dict[str, DiscoveredBackend] | None = None
        self._synced = False  # this attempt got through its range read
        self.error = ""

    async def run(self, sink: BackendSink) -> None:
        async with client_session(self._tls, self._timeout, limit=4) as session:
            index = 0
            delay = _BACKOFF_FIRST
            while True:
                url = self._urls[index]
                self._synced = False
                try:
                    await self._follow(session, url, sink)
                except _CompactedRevisionError as exc:
                    log.info("etcd %s: %s; reading the topology again", url, exc)
                    continue
                except FAILURES as exc:
                    detail = str(exc) or "no detail"
                    self.error = f"{url}: {exc.__class__.__name__}: {detail}"
                    log.warning("etcd discovery: %s; keeping the last set", self.error)
                if self._synced:  # the endpoint worked for a while: retry soon
                    delay = _BACKOFF_FIRST
                index = (index + 1) % len(self._urls)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, _BACKOFF_MAX)

    async def _follow(self, session: aiohttp.ClientSession, url: str, sink: BackendSink) -> None:
        """Read the whole range, publish it, then apply the watch until it breaks."""
        view, revision = await self._read_range(session, url)
        self.error = ""
        self._synced = True
        self._publish(sink, view)
        await self._watch(session, url, view, revision + 1, sink)

    def _range_body(self, **extra: object) -> dict[str, object]:
        key = self._prefix.encode()
        return {"key": b64(key), "range_end": b64(prefix_range_end(key)), **extra}

    async def _read_range(
        self, session: aiohttp.ClientSession, url: str
    ) -> tuple[TopologyView, int]:
        # Two keys per TiDB; the limit bounds the answer, `more` says it was cut.
        body = self._range_body(limit=str(2 * MAX_BACKENDS))
        doc = await post(session, f"{url}/v3/kv/range", body)
        revision = int(json_object(doc.get("header"), "range header")["revision"])
        view = TopologyView(self._prefix)
        for item in doc.get("kvs", []):
            kv = json_object(item, "range kv")
            view.put(unb64(kv["key"]), unb64(kv.get("value", "")))
        if doc.get("more") or view.ignored:
            log.warning("etcd %s: topology over %d servers; the rest is ignored", url, MAX_BACKENDS)
        return view, revision

    async def _watch(
        self,
        session: aiohttp.ClientSession,
        url: str,
        view: TopologyView,
        start_revision: int,
        sink: BackendSink,
    ) -> None:
        create = self._range_body(start_revision=str(start_revision), progress_notify=True)
        # No total timeout: the stream lives as long as the watch; silence is probed instead.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._timeout)
        async with session.post(
            f"{url}/v3/watch",
            json={"create_request": create},
            headers=_REQUIRE_LEADER,
            timeout=timeout,
        ) as resp:
            if resp.status != 200:
                raise EtcdError(f"HTTP {resp.status} from {url}/v3/watch")
            splitter = LineSplitter()
            while True:
                chunk = await self._next_chunk(session, url, resp.content)
                if not chunk:
                    raise EtcdError("watch stream closed")
                for line in splitter.feed(chunk):
                    if line.strip() and apply_watch_message(line, view):
                        self._publish(sink, view)

    async def _next_chunk(
        self, session: aiohttp.ClientSession, url: str, stream: aiohttp.StreamReader
    ) -> bytes:
        """The next bytes of the watch stream; while it is silent, check that etcd still answers."""
        while True:
            try:
                async with asyncio.timeout(self._idle):
                    return await stream.readany()
            except TimeoutError:
                await post(session, f"{url}/v3/kv/range", self._range_body(count_only=True))

    def _publish(self, sink: BackendSink, view: TopologyView) -> None:
        current = view.backends()
        if current == self._last:
            return
        self._last = current
        log.info("etcd discovery: %d TiDB servers: %s", len(current), sorted(current))
        sink.update(self.name, dict(current))
