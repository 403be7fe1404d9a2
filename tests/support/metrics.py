"""The proxy's /metrics read as a user's scraper reads it: samples by name and labels."""

from __future__ import annotations

import re
from collections.abc import Mapping

from support.proxy import ProxyProcess

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Scrape:
    """One scrape: `value(name, label=...)` sums the samples whose labels include those."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                self.types[name] = kind
                continue
            match = _SAMPLE.match(line)
            if match:
                labels = dict(_LABEL.findall(match.group(2) or ""))
                self.samples.append((match.group(1), labels, float(match.group(3))))

    def find(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [(have, value) for sample, have, value in self.samples
                if sample == name and _matches(have, labels)]

    def value(self, name: str, **labels: str) -> float:
        return sum(value for _, value in self.find(name, **labels))

    def has(self, name: str, **labels: str) -> bool:
        return bool(self.find(name, **labels))


def _matches(have: Mapping[str, str], want: Mapping[str, str]) -> bool:
    return all(have.get(k) == v for k, v in want.items())


def scrape(proxy: ProxyProcess) -> Scrape:
    status, body = proxy.api("/metrics")
    assert status == 200, body
    return Scrape(body.decode())
