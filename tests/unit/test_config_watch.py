"""The config file's watch (cli/server.py): an edit is applied however early it comes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tiproxy.cli.server import _Reloader, _stamp


def _scheduled(path: Path, read_stamp: tuple[int, int, int] | None) -> int:
    """How many reloads the watch schedules in its first moments."""
    reloader = _Reloader(Any, path, lambda cfg: cfg, read_stamp)  # type: ignore[arg-type]
    calls: list[None] = []
    reloader.schedule = lambda: calls.append(None)  # type: ignore[method-assign]

    async def run() -> None:
        task = asyncio.get_running_loop().create_task(reloader.watch())
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(run())
    return len(calls)


def test_an_edit_made_while_the_proxy_started_is_applied(tmp_path: Path) -> None:
    """The file changed after start read it and before the watch began (with workers, the SQL
    port answers before that): the watch's first look sees the change."""
    path = tmp_path / "proxy.toml"
    path.write_text("[proxy]\n")
    read = _stamp(path)
    path.write_text("[proxy]\nmax-connections = 7\n")
    assert _scheduled(path, read) == 1


def test_an_unchanged_file_is_not_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text("[proxy]\n")
    assert _scheduled(path, _stamp(path)) == 0
