"""The event loop every process of the proxy runs on."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("tiproxy")


def install_event_loop() -> None:
    """uvloop is the default loop: the relay spends most of its time in the loop's I/O."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:  # pragma: no cover - uvloop is a dependency; this is a fallback
        log.warning("uvloop is not installed; using asyncio's default event loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
