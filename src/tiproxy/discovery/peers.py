"""The other proxies' sessions per backend, shared through etcd: several proxies balance as one.

TiProxy balances each instance's own connections: two TiProxy instances in front of the same
TiDB servers each spread their sessions evenly, and nothing evens out what they hold together.
We go beyond it. Each proxy with `pd-addrs` writes its sessions per backend under a key of its
own and reads everyone else's, so that the router (new sessions go to the backend with the
fewest sessions in the whole cluster) and the rebalancer (balance/balancer.py: each proxy moves
its share of the excess) work from the cluster's numbers.

The key is `/tiproxy/sessions/<ip:port>`, the address the proxy registers under
`/topology/tiproxy/` (discovery/registration.py), which TiDB's tools read, so nothing is added
beside those keys. Its value is JSON: `{"backends": {"10.0.0.1:3306": 25, ...}}` (backends with
no session left out). It carries a lease of its own, COUNTS_TTL seconds, kept alive every
round: a proxy that dies leaves its counts for at most that long (its registration stays 45 s,
as TiProxy's does), and a clean shutdown deletes them at once. Once a round (ROUND seconds) the
proxy writes its counts if they changed, and reads the whole prefix: polling, not a watch, as
the counts of busy proxies change every second anyway. Routing reads the last counts it got and
never waits for etcd. Without an answer from etcd for COUNTS_TTL seconds, the others' counts
are dropped and the proxy balances on its own sessions until etcd answers again.

Interface: `PeerSessions(endpoints, me, own, on_change, tls)` runs from `start()` until
`await stop()`; `own()` gives this proxy's sessions per backend now, `on_change(peers)` gets
`{peer address: {backend: sessions}}` whenever that changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence

import aiohttp

from tiproxy.discovery.etcdapi import (
    FAILURES,
    b64,
    client_session,
    endpoint_url,
    json_object,
    post,
    prefix_range_end,
    unb64,
)

log = logging.getLogger("tiproxy.discovery")

PEER_PREFIX = "/tiproxy/sessions/"
ROUND = 1.0  # seconds between a write (if anything changed) and a read of every proxy's counts
COUNTS_TTL = 5  # seconds: the lease of the counts, and how long the others' outlive silence
REQUEST_TIMEOUT = 2.0
# Bounds on what the prefix may make us hold: other proxies, and backends per proxy. A writer
# gone wrong must not grow the router's maps; far above any real deployment.
MAX_PEERS = 1024
MAX_BACKENDS_PER_PEER = 4096
MAX_VALUE_BYTES = 256 * 1024

PeerCounts = dict[str, dict[str, int]]  # peer address -> backend address -> sessions


def encode_counts(own: Mapping[str, int]) -> str:
    return json.dumps({"backends": {a: n for a, n in sorted(own.items()) if n > 0}},
                      separators=(",", ":"))


def parse_counts(value: bytes) -> dict[str, int] | None:
    """A peer's value: backend -> sessions (positive integers only); None if not one."""
    if len(value) > MAX_VALUE_BYTES:
        return None
    try:
        doc = json.loads(value)
    except ValueError:
        return None
    backends = doc.get("backends") if isinstance(doc, dict) else None
    if not isinstance(backends, dict):
        return None
    counts: dict[str, int] = {}
    for addr, n in backends.items():
        if len(counts) >= MAX_BACKENDS_PER_PEER:
            break
        if isinstance(addr, str) and isinstance(n, int) and not isinstance(n, bool) and n > 0:
            counts[addr] = n
    return counts


class PeerSessions:
    """Publishes this proxy's counts and follows the others' (see the module docstring)."""

    def __init__(self, endpoints: Sequence[str], me: str, own: Callable[[], Mapping[str, int]],
                 on_change: Callable[[PeerCounts], None], tls: ssl.SSLContext | None = None,
                 *, prefix: str = PEER_PREFIX, ttl: int = COUNTS_TTL,
                 interval: float = ROUND) -> None:
        if not endpoints:
            raise ValueError("sharing session counts needs at least one etcd endpoint")
        self.me = me
        self._urls = [endpoint_url(e, tls is not None) for e in endpoints]
        self._tls = tls
        self._prefix = prefix
        self._key = f"{prefix}{me}"
        self._own = own
        self._on_change = on_change
        self._ttl = ttl
        self._interval = interval
        self.lease = 0
        self.error = ""  # why the last round failed; "" while in touch
        self.peers: PeerCounts = {}
        self._written: str | None = None  # the value etcd has under our key, as we wrote it
        self._kept_at = 0.0  # when the lease was last kept alive (or granted)
        self._heard_at = time.monotonic()  # when the others' counts were last read
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, delete: bool = True) -> None:
        """Stop; delete our counts and revoke their lease (or leave them to expire). Without
        `delete` only the lease goes (after an upgrade the key is the new process's)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2 * REQUEST_TIMEOUT), \
                    client_session(self._tls, REQUEST_TIMEOUT) as session:
                for url in self._urls:
                    try:
                        if delete:
                            await post(session, f"{url}/v3/kv/deleterange",
                                       {"key": b64(self._key.encode())})
                        if self.lease:
                            await post(session, f"{url}/v3/lease/revoke", {"ID": str(self.lease)})
                    except FAILURES as exc:
                        log.warning("etcd %s: %s", url, exc)
                        continue
                    return
        log.warning("could not remove this proxy's session counts from etcd: they go when "
                    "their lease expires")

    async def _run(self) -> None:
        async with client_session(self._tls, REQUEST_TIMEOUT) as session:
            index = 0
            while True:
                url = self._urls[index]
                try:
                    await self._round(session, url)
                    self.error = ""
                except FAILURES as exc:
                    failed = f"{url}: {exc.__class__.__name__}: {exc or 'no detail'}"
                    if failed != self.error:
                        log.warning("etcd: sharing session counts: %s; retrying", failed)
                    self.error = failed
                    index = (index + 1) % len(self._urls)
                    self._forget_if_silent()
                await asyncio.sleep(self._interval)

    async def _round(self, session: aiohttp.ClientSession, url: str) -> None:
        await self._keep_lease(session, url)
        value = encode_counts(self._own())
        if value != self._written:
            await post(session, f"{url}/v3/kv/put", {"key": b64(self._key.encode()),
                                                     "value": b64(value.encode()),
                                                     "lease": str(self.lease)})
            self._written = value
        self._set_peers(await self._read(session, url))
        self._heard_at = time.monotonic()

    async def _keep_lease(self, session: aiohttp.ClientSession, url: str) -> None:
        """A lease that lives; granted again (and the counts written again) if etcd lost it."""
        now = time.monotonic()
        if self.lease and now - self._kept_at >= self._ttl / 3:
            doc = await post(session, f"{url}/v3/lease/keepalive", {"ID": str(self.lease)})
            result = doc.get("result", {})
            if isinstance(result, dict) and int(result.get("TTL", 0)) > 0:
                self._kept_at = now
            else:
                log.warning("etcd: the lease of this proxy's session counts expired")
                self.lease = 0
        if not self.lease:
            granted = await post(session, f"{url}/v3/lease/grant", {"TTL": str(self._ttl)})
            self.lease = int(granted["ID"])
            self._kept_at = now
            self._written = None

    async def _read(self, session: aiohttp.ClientSession, url: str) -> PeerCounts:
        key = self._prefix.encode()
        doc = await post(session, f"{url}/v3/kv/range",
                         {"key": b64(key), "range_end": b64(prefix_range_end(key)),
                          "limit": str(MAX_PEERS + 1)})
        peers: PeerCounts = {}
        for item in doc.get("kvs", []):
            kv = json_object(item, "range kv")
            name = unb64(kv["key"]).decode("utf-8", "replace")[len(self._prefix):]
            counts = parse_counts(unb64(kv.get("value", "")))
            if name and name != self.me and counts is not None and len(peers) < MAX_PEERS:
                peers[name] = counts
        return peers

    def _forget_if_silent(self) -> None:
        if self.peers and time.monotonic() - self._heard_at > self._ttl:
            log.warning("etcd silent for %ds: balancing on this proxy's sessions only", self._ttl)
            self._set_peers({})

    def _set_peers(self, peers: PeerCounts) -> None:
        if peers != self.peers:
            joined, left = set(peers) - set(self.peers), set(self.peers) - set(peers)
            for name in sorted(joined):
                log.info("sharing balance with proxy %s", name)
            for name in sorted(left):
                log.info("proxy %s no longer shares its sessions", name)
            self.peers = peers
            self._on_change(peers)
