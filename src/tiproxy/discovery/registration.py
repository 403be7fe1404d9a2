"""This proxy's entry in PD's etcd: `/topology/tiproxy/<ip:port>/info` and `.../ttl`.

TiProxy registers itself there (pkg/manager/infosync) so that TiDB's tools, the dashboard and
other proxies can find it; we write the same keys and the same JSON:
- `info`: `{"version", "git_hash", "ip", "port", "status_port", "deploy_path",
  "start_timestamp"}` (ports as strings, the start as Unix seconds);
- `ttl`: the time of the last refresh, Unix nanoseconds as decimal text.
Both are put with the lease of a 45-second session, kept alive every 15 s (a third of its TTL,
as etcd's client does) and written again every 30 s, so that an etcd that lost its data gets
them back. A proxy that dies leaves nothing behind once its lease expires; a clean shutdown
deletes both keys and revokes the lease at once. Unlike TiProxy, which deletes the whole
`/topology/tiproxy` prefix when it closes, we delete only our own keys.

The address is `[proxy] advertise-addr` (or `--advertise-addr`) with the port of the first
`[proxy] addr`; without one, the host of that listen address, unless it is empty, unspecified
(0.0.0.0, ::), broadcast or multicast: then the first global unicast address of the machine's
interfaces, as TiProxy picks it.

Interface: `ProxyInfo.of(cfg)` describes this proxy, `TopologyRegistration(endpoints, info,
tls)` keeps it registered from `start()` until `await stop()`. `TIPROXY_TOPOLOGY_PREFIX` and
`ProxyInfo.parse` are for whoever reads the other proxies' entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

from tiproxy import __version__
from tiproxy.config.model import Config
from tiproxy.config.values import split_host_port
from tiproxy.discovery.etcdapi import FAILURES, b64, client_session, endpoint_url, post
from tiproxy.interfaces import first_global_unicast, names_no_one

log = logging.getLogger("tiproxy.discovery")

TIPROXY_TOPOLOGY_PREFIX = "/topology/tiproxy/"
SESSION_TTL = 45  # seconds: TiProxy's topologySessionTTL
REFRESH_INTERVAL = 30.0  # seconds between rewrites of both keys: TiProxy's topologyRefreshIntvl
REQUEST_TIMEOUT = 2.0  # seconds: TiProxy's topologyPutTimeout
GIT_HASH = "None"  # what TiProxy reports when its build did not stamp one
_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 5.0


@dataclass(frozen=True)
class ProxyInfo:
    """The `info` value, field for field as TiProxy writes it."""

    version: str
    git_hash: str
    ip: str
    port: str
    status_port: str
    deploy_path: str
    start_timestamp: int

    @classmethod
    def of(cls, cfg: Config, started: float | None = None) -> ProxyInfo:
        listen_host, port = split_host_port(cfg.proxy.listen_addrs[0], listen=True)
        _, status_port = split_host_port(cfg.api.addr, listen=True)
        return cls(version=__version__, git_hash=GIT_HASH,
                   ip=advertise_host(cfg.proxy.advertise_addr, listen_host,
                                     cfg.ha.virtual_ip.partition("/")[0]),
                   port=str(port),
                   status_port=str(status_port), deploy_path=_deploy_path(),
                   start_timestamp=int(time.time() if started is None else started))

    @classmethod
    def parse(cls, value: bytes) -> ProxyInfo:
        """An `info` value another proxy wrote; ValueError, KeyError or TypeError if not one."""
        doc = json.loads(value)
        return cls(**{name: doc[name] for name in cls.__dataclass_fields__})

    @property
    def addr(self) -> str:
        """"ip:port" as in the keys ("[::1]:6000" for IPv6, as Go's JoinHostPort writes it)."""
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"

    def key(self, kind: str, prefix: str = TIPROXY_TOPOLOGY_PREFIX) -> str:
        return f"{prefix}{self.addr}/{kind}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def advertise_host(advertise_addr: str, listen_host: str, virtual_ip: str = "") -> str:
    """The host this proxy announces (see the module docstring); never the virtual IP, which
    moves between proxies."""
    if advertise_addr:
        return advertise_addr
    if not names_no_one(listen_host):
        return listen_host  # a host name or an IP, loopback included (TiProxy keeps it too)
    found = first_global_unicast(skip=virtual_ip)
    if found is None:
        log.warning("no global unicast address on any interface: registering %r; set "
                    "[proxy] advertise-addr", listen_host)
        return listen_host
    return found


def _deploy_path() -> str:
    """Where the running command lives (TiProxy: its binary's directory)."""
    launched = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path(sys.executable)
    return str(launched.resolve().parent)


class TopologyRegistration:
    """Keeps `info` registered under the prefix in the etcd at `endpoints` (any member)."""

    def __init__(self, endpoints: Sequence[str], info: ProxyInfo,
                 tls: ssl.SSLContext | None = None, *, prefix: str = TIPROXY_TOPOLOGY_PREFIX,
                 ttl: int = SESSION_TTL, refresh: float = REFRESH_INTERVAL,
                 timeout: float = REQUEST_TIMEOUT) -> None:
        if not endpoints:
            raise ValueError("registration needs at least one etcd endpoint")
        self.info = info
        self._urls = [endpoint_url(e, tls is not None) for e in endpoints]
        self._tls = tls
        self._keys = (info.key("info", prefix), info.key("ttl", prefix))
        self._ttl = ttl
        self._refresh = refresh
        self._timeout = timeout
        self.lease = 0  # the lease both keys carry; 0 before the first grant
        self.error = ""  # why the last attempt failed; "" while registered
        self._task: asyncio.Task[None] | None = None
        self._failed_before_writing = False  # the last attempt never got the keys written

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, delete: bool = True) -> None:
        """Stop refreshing; delete both keys and revoke the lease (a failure here only means
        that the keys stay until the lease expires). Without `delete`, only the lease goes:
        after an upgrade the new process wrote the keys again with a lease of its own, which
        revoking this one leaves alone."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

        try:  # a shutdown must not wait long for an etcd that does not answer
            async with asyncio.timeout(2 * self._timeout), \
                    client_session(self._tls, self._timeout) as session:
                for url in self._urls:
                    if await self._remove(session, url, delete):
                        log.info("unregistered %s from etcd", self.info.addr)
                        return
        except TimeoutError:
            pass
        log.warning("could not remove this proxy's entry from etcd: it goes when its lease "
                    "expires")

    async def _remove(self, session: aiohttp.ClientSession, url: str, delete: bool) -> bool:
        try:
            for key in self._keys if delete else ():
                await post(session, f"{url}/v3/kv/deleterange", {"key": b64(key.encode())})
            if self.lease:
                await post(session, f"{url}/v3/lease/revoke", {"ID": str(self.lease)})
        except FAILURES as exc:
            log.warning("etcd %s: %s", url, exc)
            return False
        return True

    async def _run(self) -> None:
        async with client_session(self._tls, self._timeout) as session:
            index = 0
            delay = _BACKOFF_FIRST
            while True:
                url = self._urls[index]
                try:
                    await self._keep(session, url)
                    continue  # the lease expired: register again at once
                except FAILURES as exc:
                    failed = f"{url}: {exc.__class__.__name__}: {exc or 'no detail'}"
                    if failed != self.error:
                        log.warning("etcd registration of %s: %s; retrying", self.info.addr,
                                    failed)
                    self.error = failed
                if self.lease and not self._failed_before_writing:
                    delay = _BACKOFF_FIRST  # it was registered for a while: retry soon
                index = (index + 1) % len(self._urls)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, _BACKOFF_MAX)

    async def _keep(self, session: aiohttp.ClientSession, url: str) -> None:
        """Register through `url`, then keep the lease alive and the keys written; returns
        when the lease expired, raises when a request fails."""
        self._failed_before_writing = True
        if self.lease and await self._keepalive(session, url) <= 0:
            self.lease = 0  # expired meanwhile (etcd unreachable for too long)
        if not self.lease:
            granted = await post(session, f"{url}/v3/lease/grant", {"TTL": str(self._ttl)})
            self.lease = int(granted["ID"])
        await self._write(session, url)
        self._failed_before_writing = False
        log.info("registered %s in etcd (%s, lease %x)", self.info.addr, url, self.lease)
        self.error = ""
        written = time.monotonic()
        while True:
            await asyncio.sleep(self._ttl / 3)
            if await self._keepalive(session, url) <= 0:
                log.warning("etcd: the lease of this proxy's registration expired")
                self.lease = 0
                return
            if time.monotonic() - written >= self._refresh:
                await self._write(session, url)
                written = time.monotonic()

    async def _write(self, session: aiohttp.ClientSession, url: str) -> None:
        info_key, ttl_key = self._keys
        for key, value in ((info_key, self.info.to_json()), (ttl_key, str(time.time_ns()))):
            await post(session, f"{url}/v3/kv/put",
                       {"key": b64(key.encode()), "value": b64(value.encode()),
                        "lease": str(self.lease)})

    async def _keepalive(self, session: aiohttp.ClientSession, url: str) -> int:
        """The lease's TTL after a keep-alive; 0 when etcd no longer knows it."""
        doc = await post(session, f"{url}/v3/lease/keepalive", {"ID": str(self.lease)})
        result = doc.get("result", {})
        return int(result.get("TTL", 0)) if isinstance(result, dict) else 0
