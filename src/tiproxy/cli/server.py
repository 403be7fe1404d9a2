"""The `tiproxy` command: run the proxy from a config file, or a local playground."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tiproxy import __version__
from tiproxy.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from tiproxy.net.server import ProxyServer

log = logging.getLogger("tiproxy")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def install_event_loop() -> None:
    """uvloop is the default loop: the relay spends most of its time in the loop's I/O."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:  # pragma: no cover - uvloop is a dependency; this is a fallback
        log.warning("uvloop is not installed; using asyncio's default event loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(cfg: Config, config_path: Path | None = None) -> None:
    """Run the proxy and its API until SIGINT/SIGTERM, then shut down gracefully.

    SIGHUP reloads the config file (TiProxy watches its file; a signal is the Unix way): a bad
    file is refused with the key and the reason, and the running config stays.
    """
    from tiproxy.api.server import start_api  # noqa: PLC0415
    from tiproxy.net.server import ProxyServer  # noqa: PLC0415

    server = ProxyServer(cfg)
    await server.start()
    api = await start_api(server, cfg.api.addr)
    log.info("API listening on port %d", api.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if config_path is not None:
        loop.add_signal_handler(signal.SIGHUP, _reload, server, config_path)
    await stop.wait()
    log.info("shutting down")
    server.begin_shutdown()
    if cfg.proxy.graceful_wait_before_shutdown:
        await asyncio.sleep(cfg.proxy.graceful_wait_before_shutdown)
    await server.stop()
    await api.close()


def _reload(server: ProxyServer, path: Path) -> None:
    try:
        cfg = load_config(path)
    except (ConfigError, OSError) as e:
        log.error("config reload refused, keeping the running config: %s", e)  # noqa: TRY400
        return
    server.apply_config(cfg)
    log.info("config reloaded from %s", path)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["playground"]:
        from tiproxy.cli.playground import main as playground_main  # noqa: PLC0415

        return playground_main(args[1:])
    parser = argparse.ArgumentParser(prog="tiproxy", description="A MySQL-protocol proxy.")
    parser.add_argument("--config", type=Path, help="TOML config file (TiProxy's keys)")
    parser.add_argument("--version", action="version", version=f"tiproxy {__version__}")
    ns = parser.parse_args(args)
    try:
        cfg = load_config(ns.config)
    except ConfigError as e:
        print(f"tiproxy: invalid config: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"tiproxy: cannot read config: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log.level)
    install_event_loop()
    try:
        asyncio.run(serve(cfg, ns.config))
    except OSError as e:
        log.error("cannot start: %s", e)  # noqa: TRY400 - the reason is the message
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
