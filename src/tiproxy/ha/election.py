"""One owner elected among the proxies in PD's etcd, as TiProxy elects its virtual IP's owner.

TiProxy (pkg/manager/elect, pkg/manager/vip) campaigns with etcd's `concurrency.Election` on
`/tiproxy/vip/<ip>/owner`, each candidate with its `ip:port` as value and a session of 3 s. We
campaign in the same election through the v3 gateway's election service, which runs that same
recipe inside etcd: a candidate puts `<name>/<lease id in hex>` with its lease, the key with the
lowest create revision leads, and `/v3/election/campaign` answers once every earlier key is
gone. So a TiProxy and this proxy could share one election.

Theory of operation, one cycle per lease:
- grant a lease of `ttl` seconds and keep it alive every ttl/3; a keep-alive that fails is
  tried again until the lease would have expired; etcd saying it is gone ends the cycle;
- campaign (a request that lasts until our key leads), then read the leader (the first key by
  create revision, as TiProxy reads it): elected only if it is our key;
- while leading, read the leader every CHECK_INTERVAL: our key gone, campaign again;
- a cycle that fails (etcd out of reach) starts again with a new lease on the next endpoint.
The owner changes only on a clear signal, as in TiProxy: `on_elected` when our key leads,
`on_retired` when another candidate leads (looked at every CHECK_INTERVAL while the owner
campaigns again). A lost lease or an unreachable etcd alone keeps the owner: while etcd is down
nobody else can be elected, and giving the address up then would leave it to no one. Unlike
TiProxy, an owner that campaigns again after losing its lease keeps looking at the leader, so it
gives the address up as soon as another proxy leads rather than when its campaign ends.
`stop()` ends campaigning (the caller gives up what it holds), then `resign()` revokes the lease,
its key with it, and the next candidate leads at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

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

log = logging.getLogger("tiproxy.ha")

SESSION_TTL = 3  # seconds: TiProxy's VIP session; a dead owner is replaced within about this
CHECK_INTERVAL = 1.0  # seconds between looks at the leader
REQUEST_TIMEOUT = 2.0
_BACKOFF_FIRST = 0.2
_BACKOFF_MAX = 1.0  # a takeover must not wait long for a retry
_CAMPAIGN_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=REQUEST_TIMEOUT)


@dataclass(frozen=True)
class Leader:
    key: str  # base64, as etcd gives it
    value: bytes


class Election:
    """Campaigns for `name` with `value`; `on_elected` and `on_retired` are awaited in turn."""

    def __init__(self, endpoints: Sequence[str], name: str, value: str, *,
                 on_elected: Callable[[], Awaitable[None]],
                 on_retired: Callable[[], Awaitable[None]],
                 tls: ssl.SSLContext | None = None, ttl: int = SESSION_TTL) -> None:
        if not endpoints:
            raise ValueError("an election needs at least one etcd endpoint")
        self.name = name
        self.value = value
        self._urls = [endpoint_url(e, tls is not None) for e in endpoints]
        self._tls = tls
        self._ttl = ttl
        self._on_elected = on_elected
        self._on_retired = on_retired
        self._prefix = f"{name}/".encode()
        self.owner = False
        self.lease = 0
        self.error = ""  # why the last cycle failed; "" while in touch with etcd
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Campaign no more; owner or not, nothing is called back after this."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def resign(self) -> None:
        """Revoke the lease: our key goes, the next candidate leads. A failure only means
        that the key stays until the lease expires."""
        lease, self.lease, self.owner = self.lease, 0, False
        if not lease:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2 * REQUEST_TIMEOUT), \
                    client_session(self._tls, REQUEST_TIMEOUT, limit=4) as session:
                for url in self._urls:
                    try:
                        await post(session, f"{url}/v3/lease/revoke", {"ID": str(lease)})
                    except FAILURES as exc:
                        log.warning("etcd %s: %s", url, exc)
                        continue
                    log.info("resigned from the election of %s", self.name)
                    return
        log.warning("could not resign from the election of %s: the next owner is elected when "
                    "this proxy's lease expires (%ds)", self.name, self._ttl)

    async def _run(self) -> None:
        async with client_session(self._tls, REQUEST_TIMEOUT, limit=4) as session:
            index = 0
            delay = _BACKOFF_FIRST
            while True:
                url = self._urls[index]
                try:
                    await self._cycle(session, url)
                    delay = _BACKOFF_FIRST
                    continue  # the lease is gone: a new one at once
                except FAILURES as exc:
                    failed = f"{url}: {exc.__class__.__name__}: {exc or 'no detail'}"
                    if failed != self.error:
                        log.warning("election of %s: %s; retrying", self.name, failed)
                    self.error = failed
                index = (index + 1) % len(self._urls)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, _BACKOFF_MAX)

    async def _cycle(self, session: aiohttp.ClientSession, url: str) -> None:
        granted = await post(session, f"{url}/v3/lease/grant", {"TTL": str(self._ttl)})
        self.lease = int(granted["ID"])
        self.error = ""
        keeper = asyncio.get_running_loop().create_task(self._keep_alive(session, url))
        try:
            while not keeper.done():
                key = await self._campaign(session, url, keeper)
                if key is not None:
                    await self._lead(session, url, key, keeper)
            keeper.result()  # a keep-alive that failed for good raises here
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    async def _keep_alive(self, session: aiohttp.ClientSession, url: str) -> None:
        """Until etcd says the lease is gone, or it would have expired for want of answers."""
        expires = time.monotonic() + self._ttl
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                doc = await post(session, f"{url}/v3/lease/keepalive", {"ID": str(self.lease)})
            except FAILURES:
                if time.monotonic() >= expires:
                    raise
                continue
            result = doc.get("result", {})
            left = int(result.get("TTL", 0)) if isinstance(result, dict) else 0
            if left <= 0:
                log.warning("election of %s: this proxy's lease expired", self.name)
                return
            expires = time.monotonic() + left

    async def _campaign(self, session: aiohttp.ClientSession, url: str,
                        keeper: asyncio.Task[None]) -> str | None:
        """Our key once it leads; None when the lease ended first."""
        body = {"name": b64(self.name.encode()), "lease": str(self.lease),
                "value": b64(self.value.encode())}
        loop = asyncio.get_running_loop()
        request = loop.create_task(post(session, f"{url}/v3/election/campaign", body,
                                        _CAMPAIGN_TIMEOUT))
        try:
            while not keeper.done():
                await asyncio.wait({request, keeper}, timeout=CHECK_INTERVAL,
                                   return_when=asyncio.FIRST_COMPLETED)
                if request.done():
                    key = json_object(request.result().get("leader"), "campaign")["key"]
                    leader = await self._leader(session, url)
                    if leader is not None and leader.key == key:
                        return str(key)
                    # our key went with our lease while we waited: campaign again
                    request = loop.create_task(post(session, f"{url}/v3/election/campaign",
                                                    body, _CAMPAIGN_TIMEOUT))
                if self.owner:
                    await self._retire_if_another_leads(session, url)
            return None
        finally:
            if not request.done():
                request.cancel()  # etcd withdraws the candidate key of a cancelled campaign
            with contextlib.suppress(asyncio.CancelledError, *FAILURES):
                await request

    async def _lead(self, session: aiohttp.ClientSession, url: str, key: str,
                    keeper: asyncio.Task[None]) -> None:
        """Owner while our key leads; returns when it no longer does, or the lease ended."""
        if not self.owner:
            log.info("elected the owner of %s", self.name)
            self.owner = True
            await self._on_elected()
        else:
            log.info("still the owner of %s", self.name)
        while True:
            await asyncio.wait({keeper}, timeout=CHECK_INTERVAL)
            if keeper.done():
                return
            try:
                leader = await self._leader(session, url)
            except FAILURES:
                continue  # etcd slow or away: the keep-alive decides when the lease is lost
            if leader is None or leader.key != key:
                if leader is not None and leader.value != self.value.encode():
                    await self._retire(leader)
                return

    async def _retire_if_another_leads(self, session: aiohttp.ClientSession, url: str) -> None:
        with contextlib.suppress(*FAILURES):
            leader = await self._leader(session, url)
            if leader is not None and leader.value != self.value.encode():
                await self._retire(leader)

    async def _retire(self, leader: Leader) -> None:
        log.info("%s now leads %s: this proxy retires", leader.value.decode(errors="replace"),
                 self.name)
        self.owner = False
        await self._on_retired()

    async def _leader(self, session: aiohttp.ClientSession, url: str) -> Leader | None:
        """The first key of the election by create revision (TiProxy's owner)."""
        first = {"key": b64(self._prefix), "range_end": b64(prefix_range_end(self._prefix)),
                 "sort_order": "ASCEND", "sort_target": "CREATE", "limit": "1"}
        doc = await post(session, f"{url}/v3/kv/range", first)
        kvs = doc.get("kvs", [])
        if not kvs:
            return None
        kv = json_object(kvs[0], "leader kv")
        return Leader(str(kv["key"]), unb64(kv.get("value", "")))
