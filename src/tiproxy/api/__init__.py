"""The HTTP API and Prometheus metrics, served from a read-only view of the data plane."""

from __future__ import annotations

from tiproxy.api.server import APIServer, build_app, start_api
from tiproxy.views.interface import BackendView, ProxyView

__all__ = ["APIServer", "BackendView", "ProxyView", "build_app", "start_api"]
