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
- `GET /api/admin/migrations`: moves over time (views/history.py) and the cumulative counts.
- `GET /` and `GET /dashboard`: the status page (dashboard.py).
- `GET /metrics` and `GET /api/metrics`: Prometheus text format.
- `/api/admin/namespace/...`: TiProxy's namespace routes (api/namespace.py).
- `PUT /api/admin/config`, `POST /api/debug/redirect`, `POST /api/admin/backends/{addr}/drain`
  and `/undrain`, `PUT` and `DELETE /api/debug/health`, and the namespace routes but GET: the
  write routes, which auth.py guards (every method but GET and HEAD).
- TiProxy's `/api/traffic/...` routes (capture, replay, cancel, show): api/traffic.py.
Nothing here blocks the event loop for long: a request body is at most 1 MiB (413 beyond), and
the files a new config names are checked in a thread (config/reload.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

from aiohttp import web

from tiproxy import __version__
from tiproxy.api.auth import write_guard
from tiproxy.api.dashboard import add_page_routes
from tiproxy.api.listener import APIConnection, plain_http_guard
from tiproxy.api.metrics import (
    METRICS_CONTENT_TYPE,
    ProxyMetrics,
    build_registry,
    render_metrics,
)
from tiproxy.api.namespace import NamespaceRoutes
from tiproxy.api.traffic import register_traffic, traffic_routes
from tiproxy.config import (
    Config,
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
from tiproxy.views.history import history_json
from tiproxy.views.interface import ProxyControl, ProxyView, UpgradeError

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

    @property
    def listening_socket(self) -> socket.socket:
        """The listening socket (an upgrade hands it to the new process)."""
        sock: socket.socket = self._listener.sockets[0]  # type: ignore[attr-defined]
        return sock

    async def close(self) -> None:
        self._listener.close()
        await self._runner.cleanup()


async def start_api(view: ProxyView, addr: str, tls: HTTPSContexts | None = None, *,
                    proxy_protocol: bool = False, sock: socket.socket | None = None
                    ) -> APIServer:
    """Serve the API for `view` on `addr` ("host:port"; an empty host means all interfaces),
    or on `sock`, a listening socket made elsewhere (an upgrade's); HTTPS too when `tls` has a
    server-http-tls context, and PROXY protocol headers read with `proxy_protocol`
    (listener.py)."""
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
        loop = asyncio.get_running_loop()
        listener = await (
            loop.create_server(lambda: APIConnection(factory, https, proxy_protocol),
                               sock=sock) if sock is not None else
            loop.create_server(lambda: APIConnection(factory, https, proxy_protocol),
                               host or None, port, reuse_address=True))
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
        ("GET", "/api/admin/migrations", _migrations),
        ("POST", "/api/debug/redirect", _redirect),
        ("POST", "/api/admin/upgrade", _upgrade),
        ("GET", "/metrics", _metrics),
        ("GET", "/api/metrics", _metrics),
        *NamespaceRoutes(view.config, lambda change: _change_config(app, change)).routes(),
        *traffic_routes(),
    ]
    register_traffic(app, view, app[_REGISTRY])
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
        app.router.add_route(method, path + "/", handler)  # TiProxy registers groups with "/"
    add_page_routes(app)
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
        "version": __version__,  # ours: after an upgrade, the version that serves
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
    try:
        text = (await request.read()).decode("utf-8")
    except web.HTTPRequestEntityTooLarge:
        return web.json_response(
            {"error": f"the body is larger than {MAX_BODY_BYTES // 1024} KiB"}, status=413)
    except UnicodeDecodeError:
        return web.json_response({"error": "the body is not UTF-8 text"}, status=400)
    try:
        cfg = await _change_config(request.app, lambda _running: text)
    except ConfigError as e:
        return web.json_response({"error": str(e)}, status=400)
    return web.json_response({"config_checksum": config_checksum(cfg)})


async def _change_config(app: web.Application, change: Callable[[Config], str]) -> Config:
    """Apply `change(running config)`, a partial TOML config, as every online change is
    applied: one at a time, merged onto the running config, checked (config/reload.py), then
    handed to the proxy. ConfigError says why it was refused; the running config then stays."""
    view = app[_VIEW]
    control = _control(view)
    async with app[_RELOAD_LOCK]:
        running = view.config()
        cfg = merge_config(running, change(running))
        await check_reload(running, cfg)
        await control.apply_config(cfg)
    return cfg


async def _backends(request: web.Request) -> web.Response:
    await request.app[_VIEW].refresh()
    backends = request.app[_VIEW].backends()
    body = [
        {"addr": b.addr, "status": b.status, "connections": b.connections,
         "peer_connections": b.peer_connections,
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


async def _migrations(request: web.Request) -> web.Response:
    view = request.app[_VIEW]
    await view.refresh()
    stats = view.migration_stats()
    body = history_json(stats.history, time.time())
    body["totals"] = [{"from": source, "to": target, "reason": reason, "result": result,
                       "count": count}
                      for (source, target, reason, result), count in sorted(stats.counts.items())]
    return web.json_response(body, dumps=_dumps)


async def _redirect(request: web.Request) -> web.Response:
    count = await _control(request.app[_VIEW]).redirect_all()
    return web.json_response({"sessions": count})


async def _upgrade(request: web.Request) -> web.Response:
    """Ours: a new proxy process takes the listeners and the sessions over (202: started;
    the old process hands sessions over in the background and then ends)."""
    try:
        pid = await _control(request.app[_VIEW]).upgrade()
    except UpgradeError as e:
        return web.json_response({"error": str(e)}, status=409)
    return web.json_response({"pid": pid}, status=202)


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
