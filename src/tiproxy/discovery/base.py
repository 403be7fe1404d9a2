"""What every discovery source gives the router: the full set of backends it knows, on change.

A source runs as one task for the proxy's lifetime. Each time its view changes it hands the
router the complete set (not a diff), keyed by "host:port", so a source that restarts or
reconnects simply sends its set again. A backend listed by no source any more is drained by
migration, never cut. A source that cannot reach its origin keeps its last set (a flapping etcd
must not empty the cluster) and says so in its `error`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class DiscoveredBackend:
    addr: str  # "host:port" of the SQL port
    labels: Mapping[str, str] = field(default_factory=dict)  # e.g. {"zone": "east"}
    status_port: int | None = None  # TiDB's HTTP status port, for /status health checks
    version: str = ""


class BackendSink(Protocol):
    def update(self, source: str, backends: Mapping[str, DiscoveredBackend]) -> None:
        """The complete current set of `source`; replaces what it said before."""


class DiscoverySource(Protocol):
    name: str  # "static", "etcd", "dns"
    error: str  # why the last attempt to reach the origin failed; "" when fine

    async def run(self, sink: BackendSink) -> None:
        """Run until cancelled, calling sink.update whenever the set changes."""
