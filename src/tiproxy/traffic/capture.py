"""A capture job in the control process: from TiProxy's form fields to files and back to `show`.

The job checks its fields as TiProxy does (output and duration required, a start time neither in
the future nor over, a known encryption method with its key), prepares the directory and the
key in a thread, starts the writer (writer.py), and asks whoever holds the sessions to capture
into it: this process's data plane, or every worker (workers/). It ends when its duration is
over, when it is cancelled, or when the writer cannot write; then the sessions stop recording,
the writer empties its queue and closes the last file, and `meta` is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tiproxy.config.values import format_duration
from tiproxy.traffic.format import format_time
from tiproxy.traffic.sink import Deliver
from tiproxy.traffic.store import (
    CaptureFiles,
    StoreError,
    encrypt_method,
    load_key,
    prepare_output,
)
from tiproxy.traffic.writer import CaptureWriter, Meta

log = logging.getLogger("tiproxy.traffic")

START_SLACK_NS = 60_000_000_000  # TiProxy's allowance for clocks that differ by a minute
FINISH_TIMEOUT = 30.0  # seconds the writer gets to complete its files once the capture ends


class CaptureHolder(Protocol):
    """Whoever holds the sessions (control/proxy.py's SessionHolder)."""

    async def start_capture(self, deliver: Deliver) -> None: ...  # recording when it returns
    async def stop_capture(self) -> int: ...  # the commands dropped, now final
    def capture_dropped(self) -> int: ...  # the commands dropped so far


@dataclass(frozen=True)
class CaptureSpec:
    output: str
    duration_ns: int
    compress: bool = True
    method: str = ""  # "" or "aes256-ctr"
    start_ns: int = 0  # the job's id across proxies (TiProxy's start-time); 0: now

    def check(self, now_ns: int) -> None:
        """TiProxy's rules; raises StoreError with its messages."""
        if not self.output:
            raise StoreError("output is required")
        if self.duration_ns <= 0:
            raise StoreError("duration is required")
        encrypt_method(self.method)
        if self.start_ns > now_ns + START_SLACK_NS:
            raise StoreError("start time should not be in the future")
        if self.start_ns and self.start_ns + self.duration_ns < now_ns:
            raise StoreError("start time should not be in the past")


class CaptureJob:
    """One capture; see the module docstring."""

    kind = "capture"

    def __init__(self, spec: CaptureSpec, holder: CaptureHolder,
                 ended: Callable[[CaptureJob], None] = lambda job: None) -> None:
        self.spec = spec
        self.holder = holder
        self._ended = ended  # told once, when the job is done
        self.started_ns = spec.start_ns or time.time_ns()
        self.ended_ns = 0
        self.error = ""
        self.dropped = 0  # commands there was no room for (final once done)
        self.done = False
        self.writer: CaptureWriter | None = None
        self.directory: Path | None = None
        self._began = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Lock()
        self._failed = asyncio.Event()  # the writer stopped writing
        self._finished = asyncio.Event()  # the writer completed the files and meta

    async def start(self, key_path: str) -> None:
        """Raises StoreError for a directory or key that cannot be used."""
        spec = self.spec
        spec.check(time.time_ns())
        method = encrypt_method(spec.method)
        self.directory = await asyncio.to_thread(prepare_output, spec.output)
        key = await asyncio.to_thread(load_key, method, key_path)
        loop = asyncio.get_running_loop()
        self.writer = CaptureWriter(CaptureFiles(self.directory, spec.compress, key),
                                    lambda: self._tell(loop, self._failed),
                                    lambda: self._tell(loop, self._finished))
        self._began = time.monotonic()
        await self.holder.start_capture(self.writer.put)
        log.info("traffic capture started: output %s, duration %s, compress %s%s", spec.output,
                 format_duration(spec.duration_ns / 1e9), spec.compress,
                 f", encrypted ({method})" if method else "")
        self._task = asyncio.get_running_loop().create_task(self._run())

    @staticmethod
    def _tell(loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        """From the writer's thread: it stopped writing, or finished."""
        loop.call_soon_threadsafe(event.set)

    async def _run(self) -> None:
        """Until the duration is over, or the writer fails."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._failed.wait(), self.spec.duration_ns / 1e9)
        assert self.writer is not None
        await self.stop(self.writer.error)

    async def stop(self, error: str = "") -> None:
        """End the capture (error: why, "" when its duration is over); waits for the files."""
        async with self._stopping:
            if self.done:
                return
            self.error = error
            if self._task is not None and self._task is not asyncio.current_task():
                self._task.cancel()
            self.dropped = await self.holder.stop_capture()
            writer = self.writer
            assert writer is not None
            self.ended_ns = time.time_ns()
            duration = round((time.monotonic() - self._began) * 1e9)
            writer.close(Meta(duration, encrypt_method(self.spec.method), self.dropped))
            try:
                await asyncio.wait_for(self._finished.wait(), FINISH_TIMEOUT)
            except TimeoutError:
                self.error = self.error or (f"the traffic files were not complete within "
                                            f"{FINISH_TIMEOUT:.0f}s (does the disk answer?)")
            self.error = self.error or writer.error
            self.done = True
            (log.warning if self.error else log.info)(
                "traffic capture %s: %d commands in %d files, %d filtered, %d dropped%s",
                "stopped" if self.error else "finished", writer.captured, len(writer.files.files),
                writer.filtered, self.dropped, f" ({self.error})" if self.error else "")
            self._ended(self)

    @property
    def running(self) -> bool:
        return not self.done

    def dropped_now(self) -> int:
        return self.dropped if self.done else self.holder.capture_dropped()

    def progress(self) -> float:
        if self.done and not self.error:
            return 1.0
        elapsed = ((self.ended_ns - self.started_ns) / 1e9 if self.done
                   else time.monotonic() - self._began)
        return min(1.0, max(0.0, elapsed / (self.spec.duration_ns / 1e9)))

    def to_dict(self) -> dict[str, Any]:
        """TiProxy's fields of a capture job in `show`, and ours (the counts)."""
        writer = self.writer
        out: dict[str, Any] = {
            "type": "capture",
            "status": _status(self.done, self.error),
            "start_time": format_time(self.started_ns - self.started_ns % 1_000_000_000),
        }
        if self.ended_ns:
            out["end_time"] = format_time(self.ended_ns - self.ended_ns % 1_000_000_000)
        out["progress"] = f"{int(self.progress() * 100)}%"
        if self.error:
            out["error"] = self.error
        out.update({
            "output": self.spec.output,
            "duration": format_duration(self.spec.duration_ns / 1e9),
            "compress": self.spec.compress,
        })
        if self.spec.method:
            out["encryption-method"] = encrypt_method(self.spec.method)
        if writer is not None:
            out.update({"captured_cmds": writer.captured, "filtered_cmds": writer.filtered,
                        "dropped_cmds": self.dropped_now(), "files": list(writer.files.files)})
        return out


def _status(done: bool, error: str) -> str:
    return "canceled" if error else "done" if done else "running"
