"""etcd's v3 JSON gateway as the proxy speaks it, for the topology watch and the registration.

The gateway (grpc-gateway, on by default in etcd 3.4+ and in PD) takes `POST /v3/<service>/
<method>` with a JSON body; keys and values travel base64-encoded and 64-bit integers as
decimal strings. An error comes back as a non-200 status or an object with `error`. We reach it
with aiohttp, which the proxy already depends on; with `[security] cluster-tls` a
"host:port" endpoint is https.
"""

from __future__ import annotations

import base64
import json
import ssl
from typing import Any

import aiohttp

# Bounds one response body and one line of a watch stream: a peer must not make us buffer
# without end. Far above any real topology (a TiDB's info is ~300 bytes).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class EtcdError(Exception):
    """etcd answered, but not with something we can use (HTTP error, error object, bad shape)."""


# What a failed attempt to talk to an endpoint can raise (ValueError, KeyError and TypeError: an
# answer of the wrong shape); anything else is a bug and propagates.
FAILURES = (EtcdError, aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError, TypeError)


def client_session(tls: ssl.SSLContext | None, timeout: float,
                   limit: int = 2) -> aiohttp.ClientSession:
    """An HTTP client for the gateway: `tls` (cluster-tls) for https endpoints, at most `limit`
    connections, every request bounded by `timeout` seconds."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, ssl=tls if tls else True),
        timeout=aiohttp.ClientTimeout(total=timeout))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise EtcdError(f"expected base64 text, got {type(text).__name__}")
    return base64.b64decode(text, validate=True)


def prefix_range_end(prefix: bytes) -> bytes:
    """etcd's `range_end` that selects every key starting with `prefix`: the prefix plus one."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"  # every key
    end[-1] += 1
    return bytes(end)


def json_object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise EtcdError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def endpoint_url(endpoint: str, tls: bool = False) -> str:
    """A pd-addrs entry as a URL: "host:port" is http, or https with `[security] cluster-tls`."""
    url = endpoint if "://" in endpoint else f"{'https' if tls else 'http'}://{endpoint}"
    return url.rstrip("/")


async def read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes:
    body = bytearray()
    async for chunk in stream.iter_any():
        body += chunk
        if len(body) > limit:
            raise EtcdError(f"response longer than {limit} bytes")
    return bytes(body)


async def post(session: aiohttp.ClientSession, url: str, body: object,
               timeout: aiohttp.ClientTimeout | None = None) -> dict[str, Any]:
    """POST a JSON body to a gateway URL; its JSON object, or EtcdError. `timeout` replaces
    the session's for a request that may last (an election campaign)."""
    async with session.post(url, json=body, timeout=timeout or session.timeout) as resp:
        raw = await read_bounded(resp.content, MAX_MESSAGE_BYTES)
        if resp.status != 200:
            raise EtcdError(f"HTTP {resp.status} from {url}: {raw[:200]!r}")
    doc = json_object(json.loads(raw), url)
    if "error" in doc:  # a gRPC error the gateway passed on with status 200
        raise EtcdError(f"{url}: {doc.get('message') or doc['error']}")
    return doc
