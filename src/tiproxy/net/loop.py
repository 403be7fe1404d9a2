"""The event loop every process of the proxy runs on."""

from __future__ import annotations

import asyncio
import logging
import resource

log = logging.getLogger("tiproxy")


def install_event_loop() -> None:
    """uvloop is the default loop: the relay spends most of its time in the loop's I/O."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:  # pragma: no cover - uvloop is a dependency; this is a fallback
        log.warning("uvloop is not installed; using asyncio's default event loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def raise_open_files_limit() -> None:
    """The soft limit on open descriptors up to the hard one, as Go programs (TiProxy) do at
    start: each session holds two sockets, and two more while its sockets are read directly
    (net/_direct.c). Its workers inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (hard if hard != resource.RLIM_INFINITY else soft, hard))
        except (ValueError, OSError) as e:  # (a container may refuse it) the soft one stays
            log.debug("open files limit stays %d: %s", soft, e)


def open_files_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
