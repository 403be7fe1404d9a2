"""Prometheus-style scrapes of the proxy's /metrics while a benchmark runs (sysbench.py --scrape).

A thread fetches the URL every `interval` seconds on a fixed schedule, as Prometheus does with
`scrape_interval: 1s`, reads the whole answer and counts it; a failed fetch is kept with its
reason. The benchmark compares the proxy's QPS with and without it.
"""

from __future__ import annotations

import statistics
import threading
import time
import urllib.request


class Scraper:
    def __init__(self, url: str, interval: float = 1.0) -> None:
        self.url = url
        self.interval = interval
        self.seconds: list[float] = []  # each successful scrape's duration
        self.sizes: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _loop(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as answer:
                    self.sizes.append(len(answer.read()))
                self.seconds.append(time.monotonic() - started)
            except OSError as exc:
                self.errors.append(str(exc))
            due += self.interval
            self._stop.wait(max(0.0, due - time.monotonic()))

    def summary(self) -> str:
        if not self.seconds:
            return f"no scrape of {self.url} succeeded: {self.errors[:3]}"
        text = (f"{len(self.seconds)} scrapes of /metrics, {statistics.median(self.sizes)} bytes, "
                f"{statistics.median(self.seconds) * 1000:.1f} ms each (median)")
        return text + (f", {len(self.errors)} failed: {self.errors[:3]}" if self.errors else "")
