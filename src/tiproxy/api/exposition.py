"""Metric families and Prometheus' text exposition format (version 0.0.4), written here.

TiProxy's metrics come from Go's client, which exports a counter under the very name it was
given: `tiproxy_server_err`, `tiproxy_backend_get_backend`, `tiproxy_traffic_inbound_bytes`
have no `_total`. Python's client always names a counter's sample `..._total` in this format,
so TiProxy's dashboards and alerts would not find ours. A family here is exported under its own
name, whatever its type; the format is small: https://prometheus.io/docs/instrumenting/exposition_formats/
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tiproxy.views.counters import Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Family:
    """One metric family: its samples as (name suffix, label values, value)."""

    name: str
    help: str
    type: str  # "counter", "gauge" or "histogram"
    labels: Sequence[str] = ()
    samples: list[tuple[str, Sequence[str], float]] = field(default_factory=list)

    def add(self, values: Sequence[str], value: float) -> None:
        self.samples.append(("", values, value))

    def add_histogram(self, values: Sequence[str], histogram: Histogram) -> None:
        """The cumulative buckets, the sum and the count of one histogram's series."""
        cumulative = 0
        for bound, count in zip(histogram.bounds, histogram.counts, strict=False):
            cumulative += count
            self.samples.append(("_bucket", (*values, _number(bound)), cumulative))
        cumulative += histogram.counts[-1]
        self.samples.append(("_bucket", (*values, "+Inf"), cumulative))
        self.samples.append(("_sum", values, histogram.total))
        self.samples.append(("_count", values, cumulative))


def render(families: Iterable[Family]) -> bytes:
    lines = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for suffix, values, value in family.samples:
            # Sorted by name, a bucket's bound last: as Go's client writes them.
            pairs = sorted(zip(family.labels, values, strict=False))
            if suffix == "_bucket":
                pairs.append(("le", values[-1]))
            labels = ",".join(f'{n}="{_escape_value(v)}"' for n, v in pairs)
            lines.append(f"{family.name}{suffix}{{{labels}}} {_number(value)}"
                         if labels else f"{family.name}{suffix} {_number(value)}")
    lines.append("")
    return "\n".join(lines).encode()


_SPECIAL = {"inf": "+Inf", "-inf": "-Inf", "nan": "NaN"}


def _number(value: float) -> str:
    """A sample value or a bucket bound as Prometheus (and Go) write it."""
    text = repr(float(value))
    return _SPECIAL.get(text, text)


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_value(text: str) -> str:
    if "\\" not in text and '"' not in text and "\n" not in text:
        return text  # addresses, names: the usual label value
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
