"""The HTTP API on the api address: TiProxy's routes, read through a `ProxyView`.

Routes (TiProxy's, plus our own backend list):
- `GET /api/debug/health`: 200 with `{"config_checksum", "unhealthy_reason": ""}`; 502 with the
  reason while shutting down ("server is closing"), so that a load balancer in front stops
  sending new clients during graceful shutdown, while memory use is over
  `high-memory-usage-reject-threshold`, or while an operator says so:
  `PUT /api/debug/health` with `{"healthy": false, "reason": "..."}` (or `true`: healthy even
  so, except while closing) overrides the answer until `DELETE /api/debug/health`.
- `GET /api/admin/config`: the effective config as TOML; as JSON with `?format=json` or
  `Accept: application/json`. Always redacted.
- `GET /api/admin/backends`: `[{"addr", "status", "connections"}, ...]`.
- `GET /metrics` and `GET /api/metrics`: Prometheus text format.
- `PUT /api/admin/config`, `POST /api/debug/redirect`, `POST /api/admin/backends/{addr}/drain`
  and `/undrain`, `PUT` and `DELETE /api/debug/health`: the write routes, which auth.py guards
  (every method but GET and HEAD).
Nothing here blocks the event loop for long: a request body is at most 1 MiB (413 beyond), and
the files a new config names are checked in a thread (config/reload.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

from aiohttp import web

from tiproxy.api.auth import write_guard
from tiproxy.api.interface import ProxyControl, ProxyView
from tiproxy.api.listener import APIConnection, plain_http_guard
from tiproxy.api.metrics import (
    METRICS_CONTENT_TYPE,
    ProxyMetrics,
    build_registry,
    render_metrics,
)
from tiproxy.config import (
    ConfigError,
    config_checksum,
    config_to_dict,
    config_to_toml,
    merge_config,
)
from tiproxy.config.model import TLSConfig
from tiproxy.config.reload import check_reload
from tiproxy.config.values import split_host_port
from tiproxy.tls.contexts import server_enabled

log = logging.getLogger("tiproxy.api")
_VIEW: web.AppKey[ProxyView] = web.AppKey("view")
_REGISTRY: web.AppKey[ProxyMetrics] = web.AppKey("registry")
# One config change at a time: each is merged onto the config the one before it left.
_RELOAD_LOCK: web.AppKey[asyncio.Lock] = web.AppKey("reload_lock")


@dataclass
class _HealthOverride:
    """PUT /api/debug/health: (healthy, reason) until DELETE; None: the proxy's own answer."""

    value: tuple[bool, str] | None = None


_HEALTH: web.AppKey[_HealthOverride] = web.AppKey("health")
CLOSING = "server is closing"
_REASON_LIMIT = 1024  # characters of an operator's reason kept

# Bodies are partial TOML configs: 1 MiB is plenty, and stops a caller from filling memory.
MAX_BODY_BYTES = 1024 * 1024

# Seconds that close() waits for requests in flight; API requests are short.
_SHUTDOWN_TIMEOUT = 2.0


class HTTPSContexts(Protocol):
    """Where the API finds `[security.server-http-tls]` as built now (the CertStore)."""

    @property
    def http(self) -> ssl.SSLContext | None: ...
    @property
    def http_config(self) -> TLSConfig: ...


class APIServer:
    """A running API server; `port` is the bound port (useful when started on port 0)."""

    def __init__(self, runner: web.AppRunner, listener: asyncio.AbstractServer, host: str,
                 port: int) -> None:
        self._runner = runner
        self._listener = listener
        self.host = host
        self.port = port

    async def close(self) -> None:
        self._listener.close()
        await self._runner.cleanup()


async def start_api(view: ProxyView, addr: str, tls: HTTPSContexts | None = None, *,
                    proxy_protocol: bool = False) -> APIServer:
    """Serve the API for `view` on `addr` ("host:port"; an empty host means all interfaces);
    HTTPS too when `tls` has a server-http-tls context, and PROXY protocol headers read with
    `proxy_protocol` (listener.py)."""
    host, port = split_host_port(addr, listen=True)

    def https() -> tuple[ssl.SSLContext | None, TLSConfig]:
        return (tls.http, tls.http_config) if tls is not None else (None, TLSConfig())

    def https_configured() -> bool:  # by the config: a context lost to a bad reload is no
        return tls is not None and server_enabled(tls.http_config)  # reason to go plain

    runner = web.AppRunner(build_app(view, https_configured),
                           shutdown_timeout=_SHUTDOWN_TIMEOUT)
    await runner.setup()
    factory = runner.server
    assert factory is not None
    try:
        listener = await asyncio.get_running_loop().create_server(
            lambda: APIConnection(factory, https, proxy_protocol), host or None, port,
            reuse_address=True)
    except BaseException:
        await runner.cleanup()
        raise
    bound_port: int = listener.sockets[0].getsockname()[1]
    return APIServer(runner, listener, host, bound_port)


def build_app(view: ProxyView,
              https_configured: Callable[[], bool] = lambda: False) -> web.Application:
    """The aiohttp application; tests may serve it with aiohttp's test utilities."""
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[plain_http_guard(https_configured),
                     write_guard(lambda: view.config().api.auth_token_file)],
    )
    app[_VIEW] = view
    app[_REGISTRY] = build_registry(view)
    app[_RELOAD_LOCK] = asyncio.Lock()
    app[_HEALTH] = _HealthOverride()
    routes = [
        ("GET", "/api/debug/health", _health),
        ("PUT", "/api/debug/health", _health_put),
        ("DELETE", "/api/debug/health", _health_delete),
        ("GET", "/api/admin/config", _config_get),
        ("PUT", "/api/admin/config", _config_put),
        ("GET", "/api/admin/backends", _backends),
        ("POST", "/api/admin/backends/{addr}/drain", _drain),
        ("POST", "/api/admin/backends/{addr}/undrain", _undrain),
        ("GET", "/api/admin/sessions", _sessions),
        ("POST", "/api/debug/redirect", _redirect),
        ("GET", "/metrics", _metrics),
        ("GET", "/api/metrics", _metrics),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
        app.router.add_route(method, path + "/", handler)  # TiProxy registers groups with "/"
    return app


async def _health(request: web.Request) -> web.Response:
    view = request.app[_VIEW]
    override = request.app[_HEALTH].value
    if view.shutting_down:
        reason = CLOSING
    elif override is not None:
        reason = "" if override[0] else override[1] or "set unhealthy through the API"
    else:
        reason = view.unhealthy
    body = {
        "config_checksum": config_checksum(view.config()),
        "unhealthy_reason": reason,
        "status": "shutting down" if view.shutting_down else "unhealthy" if reason
        else "healthy",
        "discovery": dict(view.discovery_status()),
    }
    return web.json_response(body, status=502 if reason else 200)


async def _health_put(request: web.Request) -> web.Response:
    try:
        doc = await request.json()
    except ValueError:
        doc = None
    healthy = doc.get("healthy") if isinstance(doc, dict) else None
    reason = doc.get("reason", "") if isinstance(doc, dict) else None
    if not isinstance(healthy, bool) or not isinstance(reason, str):
        return web.json_response(
            {"error": 'expected {"healthy": true|false, "reason": "..."}'}, status=400)
    request.app[_HEALTH].value = (healthy, reason[:_REASON_LIMIT])
    log.info("health set %s through the API%s", "healthy" if healthy else "unhealthy",
             f": {reason[:_REASON_LIMIT]}" if reason else "")
    return await _health(request)


async def _health_delete(request: web.Request) -> web.Response:
    if request.app[_HEALTH].value is not None:
        log.info("health override removed through the API")
    request.app[_HEALTH].value = None
    return await _health(request)


async def _config_get(request: web.Request) -> web.Response:
    cfg = request.app[_VIEW].config()
    if _wants_json(request):
        return web.json_response(config_to_dict(cfg, redact=True), dumps=_dumps)
    return web.Response(
        text=config_to_toml(cfg, redact=True), content_type="application/toml", charset="utf-8"
    )


def _wants_json(request: web.Request) -> bool:
    fmt = request.query.get("format")
    if fmt is not None:
        return fmt.lower() == "json"
    return "application/json" in request.headers.get("Accept", "")


async def _config_put(request: web.Request) -> web.Response:
    """TiProxy's online reload: a (partial) TOML document applied over the running config."""
    view = request.app[_VIEW]
    control = _control(view)
    try:
        text = (await request.read()).decode("utf-8")
    except web.HTTPRequestEntityTooLarge:
        return web.json_response(
            {"error": f"the body is larger than {MAX_BODY_BYTES // 1024} KiB"}, status=413)
    except UnicodeDecodeError:
        return web.json_response({"error": "the body is not UTF-8 text"}, status=400)
    async with request.app[_RELOAD_LOCK]:
        running = view.config()
        try:
            cfg = merge_config(running, text)
            await check_reload(running, cfg)
        except ConfigError as e:
            return web.json_response({"error": str(e)}, status=400)
        await control.apply_config(cfg)
    return web.json_response({"config_checksum": config_checksum(cfg)})


async def _backends(request: web.Request) -> web.Response:
    await request.app[_VIEW].refresh()
    backends = request.app[_VIEW].backends()
    body = [
        {"addr": b.addr, "status": b.status, "connections": b.connections,
         "drained_by": list(b.drained_by), "last_error": b.last_error,
         "sources": list(b.sources), "health": b.health, "labels": dict(b.labels),
         "namespace": b.namespace, "score": b.score, "move_problem": b.move_problem,
         "doubt": b.doubt, "galera": b.galera,
         "load": {"threads_running": b.threads_running,
                  "queries_per_second": b.queries_per_second, "cpu": b.cpu}}
        for b in backends
    ]
    return web.json_response(body, dumps=_dumps)


async def _drain(request: web.Request) -> web.Response:
    return _set_drain(request, drain=True)


async def _undrain(request: web.Request) -> web.Response:
    return _set_drain(request, drain=False)


def _set_drain(request: web.Request, drain: bool) -> web.Response:
    addr = request.match_info["addr"]
    try:
        _control(request.app[_VIEW]).drain(addr, drain)
    except KeyError:
        return web.json_response({"error": f"unknown backend {addr}"}, status=404)
    return web.json_response({"addr": addr, "draining": drain})


async def _sessions(request: web.Request) -> web.Response:
    sessions = await request.app[_VIEW].session_views()
    return web.json_response([asdict(s) for s in sessions], dumps=_dumps)


async def _redirect(request: web.Request) -> web.Response:
    count = await _control(request.app[_VIEW]).redirect_all()
    return web.json_response({"sessions": count})


def _control(view: ProxyView) -> ProxyControl:
    if not isinstance(view, ProxyControl):
        raise web.HTTPNotImplemented(text="this proxy view cannot be changed")
    return view


async def _metrics(request: web.Request) -> web.Response:
    await request.app[_VIEW].refresh()
    return web.Response(
        body=render_metrics(request.app[_REGISTRY]), headers={"Content-Type": METRICS_CONTENT_TYPE}
    )


def _dumps(obj: object) -> str:
    return json.dumps(obj, indent=2)
