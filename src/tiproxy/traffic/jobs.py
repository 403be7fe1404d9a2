"""TiProxy's traffic jobs behind the API: capture, replay, cancel and show, one job at a time.

Form fields are TiProxy's (pkg/server/api/traffic.go), with the spellings of tiproxyctl's flags
accepted beside them:
- capture: output, duration (a Go duration), compress (default true), encrypt-method
  ("aes256-ctr" with `[security] encryption-key-path`), start-time (RFC 3339);
- replay: input, speed (0.1 to 10), username, password, readonly (or read-only), ignore-errs,
  cmdstarttime / cmd-start-time / command-start-time, cmdendtime (same spellings), start-time,
  and ours: report-dir (where report.json and report.html go; default: the input directory);
- cancel: type (capture, replay), graceful (a replay stops reading, its connections finish).
A replay through the API goes to this proxy's own SQL port, so through its backends.
`show` lists the last jobs as TiProxy does (type, status, start_time, end_time, progress, error
and the job's settings; never a password), plus the counts of ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tiproxy.config import Config
from tiproxy.config.values import parse_duration, split_host_port
from tiproxy.traffic.capture import CaptureHolder, CaptureJob, CaptureSpec
from tiproxy.traffic.format import FormatError, format_time, parse_time
from tiproxy.traffic.replay import MAX_SPEED, MIN_SPEED, Replay, ReplayError, ReplaySpec
from tiproxy.traffic.report import ReplayReport
from tiproxy.traffic.store import StoreError, input_dir, load_key, read_meta

log = logging.getLogger("tiproxy.traffic")

HISTORY = 10  # jobs `show` lists, as TiProxy keeps them
REPORT_JSON, REPORT_HTML = "report.json", "report.html"


class JobError(Exception):
    """A request the jobs refuse; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _truthy(form: Mapping[str, str], *names: str, default: bool = False) -> bool:
    for name in names:
        if name in form and form[name].strip():
            return form[name].strip().lower() in ("true", "1", "t", "yes")
    return default


def _first(form: Mapping[str, str], *names: str) -> str:
    return next((form[n].strip() for n in names if form.get(n, "").strip()), "")


def _time(form: Mapping[str, str], *names: str) -> int | None:
    text = _first(form, *names)
    if not text:
        return None
    try:
        return parse_time(text)
    except FormatError as e:
        raise JobError(f"{names[0]}: {e}") from None


def capture_spec(form: Mapping[str, str]) -> CaptureSpec:
    duration = 0
    if text := _first(form, "duration"):
        try:
            duration = round(parse_duration(text) * 1e9)
        except (TypeError, ValueError) as e:
            raise JobError(f"duration: {e}") from None
    return CaptureSpec(output=_first(form, "output"), duration_ns=duration,
                       compress=_truthy(form, "compress", default=True),
                       method=_first(form, "encrypt-method", "encryption-method"),
                       start_ns=_time(form, "start-time") or 0)


def replay_spec(form: Mapping[str, str], target: tuple[str, int], key_path: str,
                ) -> tuple[ReplaySpec, Path, int]:
    """The replay's spec, report directory and the commands its meta counts; blocking (reads
    the key and the meta): call in a thread."""
    if _first(form, "addr"):
        raise JobError("Addr is not allowed in replay config in a TiProxy node "
                       "(use tiproxy-replayer for another target)")
    if _first(form, "format") not in ("", "native"):
        raise JobError(f"format {_first(form, 'format')}: only TiProxy's native format is "
                       "supported")
    try:
        speed = float(_first(form, "speed") or "1")
    except ValueError:
        raise JobError(f"speed: not a number: {form.get('speed')!r}") from None
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise JobError(f"speed should be between {MIN_SPEED:f} and {MAX_SPEED:f}")
    username = form.get("username", "")
    if not username:
        raise JobError("username is required")
    try:
        where = input_dir(_first(form, "input"))
        meta = read_meta(where)
        key = load_key(meta.get("EncryptMethod", ""), key_path)
    except StoreError as e:
        raise JobError(str(e)) from None
    report_dir = Path(_first(form, "report-dir") or where)
    spec = ReplaySpec(
        input=where, host=target[0], port=target[1], username=username,
        password=form.get("password", ""), speed=speed,
        read_only=_truthy(form, "readonly", "read-only"),
        ignore_errs=_truthy(form, "ignore-errs"),
        cmd_start_ns=_time(form, "cmdstarttime", "cmd-start-time", "command-start-time"),
        cmd_end_ns=_time(form, "cmdendtime", "cmd-end-time", "command-end-time"), key=key)
    total = meta.get("Cmds")
    return spec, report_dir, total if isinstance(total, int) else 0


def check_report_dir(directory: Path) -> None:
    """The report's directory exists (it is made) and can be written; JobError if not."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise JobError(f"report-dir {directory}: {e.strerror or e}") from None
    if not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
        raise JobError(f"report-dir {directory}: not a writable directory")


def write_report(report: ReplayReport, directory: Path) -> list[str]:
    """report.json and report.html in `directory` (blocking); their paths."""
    paths = []
    for name, text in ((REPORT_JSON, report.json()), (REPORT_HTML, report.html())):
        path = directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        paths.append(str(path))
    return paths


class ReplayJob:
    """One replay through the API; writes its report when it ends, however it ends."""

    kind = "replay"

    def __init__(self, spec: ReplaySpec, report_dir: Path, start_ns: int | None,
                 total: int) -> None:
        self.spec = spec
        self.replay = Replay(spec)
        self.report_dir = report_dir
        self.started_ns = start_ns or time.time_ns()
        self.ended_ns = 0
        self.error = ""
        self.done = False
        self.reports: list[str] = []
        self.total = total  # the commands the capture's meta counts (0: unknown)
        self._task: asyncio.Task[None] | None = None
        self._graceful = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            wait = (self.started_ns - time.time_ns()) / 1e9
            if wait > 0:  # TiProxy's start-time: the replays of several proxies start together
                await asyncio.sleep(wait)
            await self.replay.run()
        except ReplayError as e:
            self.error = str(e)
        except asyncio.CancelledError:
            self.error = self.error or "manually stopped"
        except Exception as e:
            log.exception("traffic replay failed")
            self.error = f"replay failed: {e}"
        finally:
            await self._finish()

    async def _finish(self) -> None:
        self.ended_ns = time.time_ns()
        try:
            self.reports = await asyncio.shield(asyncio.to_thread(
                write_report, self.replay.report, self.report_dir))
        except OSError as e:
            self.error = self.error or f"failed to write the report: {e.strerror or e}"
        self.done = True
        summary = self.replay.report.counts
        (log.warning if self.error else log.info)(
            "traffic replay %s: %d commands replayed, %d differences%s; report in %s",
            "stopped" if self.error else "finished", summary.get("replayed", 0),
            summary.get("differences", 0), f" ({self.error})" if self.error else "",
            self.report_dir)

    async def stop(self, error: str, graceful: bool = False) -> None:
        if self._task is None or self.done:
            return
        if graceful:
            self.replay.stop_reading()
        else:
            self.error = error
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    @property
    def running(self) -> bool:
        return not self.done

    def progress(self) -> float:
        if self.done and not self.error:
            return 1.0
        return min(1.0, self.replay.decoded / self.total) if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "replay", "status": "canceled" if self.error else
            "done" if self.done else "running",
            "start_time": format_time(self.started_ns - self.started_ns % 1_000_000_000)}
        if self.ended_ns:
            out["end_time"] = format_time(self.ended_ns - self.ended_ns % 1_000_000_000)
        out["progress"] = f"{int(self.progress() * 100)}%"
        if self.error:
            out["error"] = self.error
        if self.replay.last_cmd_ns:
            out["last_cmd_ts"] = format_time(self.replay.last_cmd_ns)
        out.update({"input": str(self.spec.input), "username": self.spec.username,
                    "speed": self.spec.speed, "readonly": self.spec.read_only,
                    "replayed_cmds": self.replay.report.counts.get("replayed", 0),
                    "differences": self.replay.report.counts.get("differences", 0),
                    "pending_cmds": self.replay.pending})
        if self.reports:
            out["report"] = self.reports
        return out


Job = CaptureJob | ReplayJob


class TrafficJobs:
    """The jobs of this proxy; see the module docstring."""

    def __init__(self, holder: CaptureHolder, config: Callable[[], Config],
                 sql_port: Callable[[], int]) -> None:
        self._holder = holder
        self._config = config
        self._sql_port = sql_port
        self.history: list[Job] = []
        self._lock = asyncio.Lock()
        self.capture_totals: Counter[str] = Counter()  # of captures that ended

    def _check_enabled(self, what: str) -> None:
        if not self._config().enable_traffic_replay:
            raise JobError(f"traffic {what} is disabled")

    def running(self) -> Job | None:
        job = self.history[-1] if self.history else None
        return job if job is not None and job.running else None

    def _add(self, job: Job) -> None:
        self.history = [*self.history[-(HISTORY - 1):], job]

    async def capture(self, form: Mapping[str, str]) -> str:
        self._check_enabled("capture")
        async with self._lock:
            self._refuse_if_running()
            job = CaptureJob(capture_spec(form), self._holder, self._ended)
            try:
                await job.start(self._config().security.encryption_key_path)
            except StoreError as e:
                raise JobError(f"start capture failed: {e}") from None
            self._add(job)
        return "capture started"

    async def replay(self, form: Mapping[str, str]) -> str:
        self._check_enabled("replay")
        async with self._lock:
            self._refuse_if_running()
            key_path = self._config().security.encryption_key_path
            spec, report_dir, total = await asyncio.to_thread(replay_spec, form, self._target(),
                                                              key_path)
            await asyncio.to_thread(check_report_dir, report_dir)
            start = _time(form, "start-time")
            if start is not None and start + 60_000_000_000 < time.time_ns():
                raise JobError("start time should not be in the past")
            job = ReplayJob(spec, report_dir, start, total)
            job.start()
            self._add(job)
            log.info("traffic replay started: input %s, user %s, speed %g%s", spec.input,
                     spec.username, spec.speed, ", read-only" if spec.read_only else "")
        return "replay started"

    def _refuse_if_running(self) -> None:
        running = self.running()
        if running is not None:
            raise JobError(f"a job is running: {json.dumps(running.to_dict())}", 409)

    def _target(self) -> tuple[str, int]:
        """This proxy's SQL port, as a client on this machine reaches it."""
        host, port = split_host_port(self._config().proxy.listen_addrs[0], listen=True)
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return host, port or self._sql_port()

    async def cancel(self, form: Mapping[str, str]) -> str:
        self._check_enabled("cancel")
        kind = _first(form, "type").lower()
        job = self.running()
        if job is None:
            return "no job running"
        if kind and kind != job.kind:
            return "no privilege to stop the job"
        before = json.dumps(job.to_dict())
        if isinstance(job, CaptureJob):
            await job.stop("manually stopped")
        else:
            await job.stop("manually stopped", graceful=_truthy(form, "graceful"))
        return f"stopped: {before}"

    def _ended(self, job: CaptureJob) -> None:
        if job.writer is not None:
            self.capture_totals.update({"captured": job.writer.captured,
                                        "filtered": job.writer.filtered,
                                        "dropped": job.dropped})

    def show(self) -> str:
        self._check_enabled("show")
        return json.dumps([job.to_dict() for job in self.history], indent=2)

    def last_report(self) -> ReplayReport | None:
        for job in reversed(self.history):
            if isinstance(job, ReplayJob):
                return job.replay.report
        return None

    def capture_counts(self) -> dict[str, int]:
        """Commands captured, filtered and dropped by every capture so far (the metrics)."""
        totals = Counter(self.capture_totals)
        job = self.running()
        if isinstance(job, CaptureJob) and job.writer is not None:
            totals.update({"captured": job.writer.captured, "filtered": job.writer.filtered,
                           "dropped": job.dropped_now()})
        return {k: totals.get(k, 0) for k in ("captured", "filtered", "dropped")}

    async def close(self) -> None:
        """The proxy shuts down: a running job ends (a capture's files and meta complete)."""
        job = self.running()
        if job is not None:
            await job.stop("shutting down")
