"""TiProxy's traffic routes, answered by the proxy's TrafficJobs (traffic/jobs.py).

- `POST /api/traffic/capture`, `/replay`, `/cancel`: form fields as TiProxy's (traffic/jobs.py);
  plain-text answers as TiProxy gives them ("capture started", "replay started", "stopped: ...",
  "no job running"); a request the jobs refuse gets its reason with 400 (409 while another job
  runs). They are write routes: the API's write guard (auth.py) applies.
- `GET /api/traffic/show`: the last jobs as a JSON list.
- `GET /api/traffic/report` (ours): the last replay's report as JSON, or `?format=html`.
Metrics: `tiproxy_traffic_capture_cmds_total{type}` (captured, filtered, dropped: commands the
writer had no room for) and TiProxy's `tiproxy_replay_pending_cmds`, added to api/metrics.py's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol, runtime_checkable

from aiohttp import web

from tiproxy.api.exposition import Family
from tiproxy.api.metrics import ProxyMetrics
from tiproxy.traffic.jobs import JobError, ReplayJob, TrafficJobs

_JOBS: web.AppKey[TrafficJobs | None] = web.AppKey("traffic_jobs")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@runtime_checkable
class TrafficView(Protocol):
    """A proxy that runs traffic jobs (control/proxy.py's Proxy)."""

    @property
    def traffic(self) -> TrafficJobs: ...


def traffic_routes() -> list[tuple[str, str, Handler]]:
    return [
        ("POST", "/api/traffic/capture", _capture),
        ("POST", "/api/traffic/replay", _replay),
        ("POST", "/api/traffic/cancel", _cancel),
        ("GET", "/api/traffic/show", _show),
        ("GET", "/api/traffic/report", _report),
    ]


def register_traffic(app: web.Application, view: object, metrics: ProxyMetrics) -> None:
    """The jobs of `view`, if it runs any, for the routes and the metrics."""
    jobs = view.traffic if isinstance(view, TrafficView) else None
    app[_JOBS] = jobs
    if jobs is not None:
        metrics.add_source(lambda: _traffic_families(jobs))


def _jobs(request: web.Request) -> TrafficJobs:
    jobs = request.app[_JOBS]
    if jobs is None:
        raise web.HTTPNotImplemented(text="this proxy view runs no traffic jobs")
    return jobs


async def _form(request: web.Request) -> dict[str, str]:
    data = await request.post()
    return {key: value for key, value in data.items() if isinstance(value, str)}


async def _answer(run: Awaitable[str]) -> web.Response:
    try:
        return web.Response(text=await run)
    except JobError as e:
        return web.Response(text=str(e), status=e.status)


async def _capture(request: web.Request) -> web.Response:
    return await _answer(_jobs(request).capture(await _form(request)))


async def _replay(request: web.Request) -> web.Response:
    return await _answer(_jobs(request).replay(await _form(request)))


async def _cancel(request: web.Request) -> web.Response:
    return await _answer(_jobs(request).cancel(await _form(request)))


async def _show(request: web.Request) -> web.Response:
    try:
        return web.Response(text=_jobs(request).show(), content_type="application/json")
    except JobError as e:
        return web.Response(text=str(e), status=e.status)


async def _report(request: web.Request) -> web.Response:
    report = _jobs(request).last_report()
    if report is None:
        return web.Response(text="no replay has run", status=404)
    if request.query.get("format", "").lower() == "html":
        return web.Response(text=report.html(), content_type="text/html")
    return web.Response(text=report.json(), content_type="application/json")


def _traffic_families(jobs: TrafficJobs) -> Iterator[Family]:
    captured = Family("tiproxy_traffic_capture_cmds_total",
                      "Commands of traffic captures, by what became of them.", "counter",
                      ("type",))
    for kind, count in jobs.capture_counts().items():
        captured.add((kind,), count)
    yield captured
    pending = Family("tiproxy_replay_pending_cmds", "Counter of pending commands.", "gauge")
    job = jobs.running()
    pending.add((), job.replay.pending if isinstance(job, ReplayJob) else 0)
    yield pending
