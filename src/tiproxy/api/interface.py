"""What the API and metrics may see of the data plane: one read-only view, nothing else.

The control plane depends on this protocol only, so the data plane can later move into worker
processes (the view then sums what the workers report) without the API changing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from tiproxy.config import Config


@dataclass(frozen=True)
class BackendView:
    addr: str
    status: str  # "healthy", "down", "draining"
    connections: int
    query_counts: Mapping[str, int]  # cmd_type (e.g. "Query", "StmtExecute") -> queries run here


class ProxyView(Protocol):
    @property
    def shutting_down(self) -> bool: ...
    def connection_count(self) -> int: ...
    def backends(self) -> list[BackendView]: ...
    def config(self) -> Config: ...
