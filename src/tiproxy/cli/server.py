"""The `tiproxy` command: run the proxy from a config file, or a local playground.

    tiproxy [--config FILE] [--advertise-addr HOST] [--config-info json] [--version]
    tiproxy playground [...]

TiProxy's flags, with its meanings: `--advertise-addr` overrides `[proxy] advertise-addr` (the
address the proxy registers in PD's etcd) in the file and in every reload of it;
`--config-info json` prints every config key with its type, default and whether a reload may
change it, and exits. `--log_level` and `--log_encoder`, deprecated in TiProxy, which ignores
them, are accepted and ignored with a warning: `[log]` sets both.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tiproxy import __version__
from tiproxy.config import Config, ConfigError, load_config, parse_config
from tiproxy.config.files import (
    CONFIG_FILE_LIMIT,
    FileRefusedError,
    check_config_files,
    read_small_file,
)
from tiproxy.config.info import ConfigInfoError, config_info
from tiproxy.config.reload import check_reload
from tiproxy.config.values import check_host
from tiproxy.control.upgrade import Takeover, Upgrader
from tiproxy.logs import setup_logging
from tiproxy.net import direct
from tiproxy.net.loop import install_event_loop, raise_open_files_limit
from tiproxy.tls import TLSLoadError
from tiproxy.views.interface import UpgradeError

if TYPE_CHECKING:
    from tiproxy.control.proxy import Proxy

log = logging.getLogger("tiproxy")
WATCH_INTERVAL = 2.0  # seconds between looks at the config file, as TiProxy polls it


async def serve(cfg: Config, config_path: Path | None = None,
                adjust: Callable[[Config], Config] = lambda cfg: cfg,
                read_stamp: tuple[int, int, int] | None = None) -> None:
    """Run the proxy and its API until SIGINT/SIGTERM, then shut down gracefully.

    The config file is reloaded when it changes (looked at every WATCH_INTERVAL, as TiProxy
    does) and on SIGHUP: a bad file, or one that changes a key the running proxy cannot
    change, is refused with the key and the reason, and the running config stays. The
    signals are handled from before the
    ports open (a signal's default action would end the process): a SIGHUP that comes while the
    proxy starts is carried out once it has started, a SIGTERM shuts it down then. `adjust`
    applies the command line's overrides to each config read from the file. `read_stamp` is the
    file's stamp from before `cfg` was read from it: a change made while the proxy starts (its
    SQL port may answer before the watch begins) is then a change, not the starting point.
    """
    from tiproxy.api.server import start_api  # noqa: PLC0415
    from tiproxy.control.cluster import Cluster  # noqa: PLC0415
    from tiproxy.control.proxy import Proxy, SessionHolder  # noqa: PLC0415
    from tiproxy.net.server import ProxyServer  # noqa: PLC0415
    from tiproxy.workers.control import Workers  # noqa: PLC0415
    from tiproxy.workers.sockets import worker_count  # noqa: PLC0415

    takeover = Takeover.from_environment()  # an upgrade's new process (control/upgrade.py)
    cluster = Cluster(cfg)
    workers = worker_count(cfg)
    holder: SessionHolder = Workers(cluster, workers, takeover) if workers > 1 \
        else ProxyServer.of(cluster)
    server = Proxy(cluster, holder)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reload = _Reloader(server, config_path, adjust, read_stamp) \
        if config_path is not None else None
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, reload.schedule)
    if takeover is not None and isinstance(holder, ProxyServer):
        await holder.serve_sockets([s for group in takeover.sockets() for s in group])
        holder.take_ids_from(takeover.first_id)
    await server.start()
    api = await start_api(server, cfg.api.addr, cluster.tls,
                          proxy_protocol=bool(cfg.api.proxy_protocol),
                          sock=takeover.api_socket() if takeover is not None else None)
    log.info("tiproxy %s (pid %d): API listening on port %d", __version__, os.getpid(), api.port)
    if direct.COMPILED_OFF:
        log.warning("compiled relay path off (%s): every query takes the Python path",
                    direct.COMPILED_OFF)
    elif direct.DIRECT_OFF:
        log.warning("direct relay off (%s): the event loop reads every socket",
                    direct.DIRECT_OFF)
    server.upgrader = Upgrader(holder, lambda: api, lambda: _handed_over(server, stop))
    loop.add_signal_handler(signal.SIGUSR2, lambda: _upgrade_soon(server))
    if takeover is not None:
        takeover.say_ready(await holder.open_receivers())
    watch = None
    if reload is not None:
        reload.started.set()
        watch = loop.create_task(reload.watch())
    await stop.wait()
    log.info("shutting down")
    if watch is not None:
        watch.cancel()
    await server.release_virtual_ip()  # first, as TiProxy: its clients reach another proxy
    if not server.handed_over:  # else the API is closed already: the new process serves it
        server.begin_shutdown()
        wait = server.config().proxy.graceful_wait_before_shutdown  # as reloaded, if it was
        if wait:
            await asyncio.sleep(wait)
    await server.stop()
    if not server.handed_over:
        await api.close()


_upgrades: set[asyncio.Task[None]] = set()  # kept until done, or the loop may drop them


def _upgrade_soon(server: Proxy) -> None:
    """SIGUSR2: upgrade, as `tiproxyctl upgrade` does; a failure is logged, the proxy goes on."""

    async def upgrade() -> None:
        try:
            await server.upgrade()
        except UpgradeError as e:
            log.error("upgrade refused: %s", e)  # noqa: TRY400 - the reason is the message

    task = asyncio.get_running_loop().create_task(upgrade())
    _upgrades.add(task)
    task.add_done_callback(_upgrades.discard)


def _handed_over(server: Proxy, stop: asyncio.Event) -> None:
    server.handed_over = True
    stop.set()


class _Reloader:
    """Each SIGHUP, and each change of the file, schedules a reload of it; reloads run one at
    a time, in order, and read the file (and the files it names) in a thread."""

    def __init__(self, server: Proxy, path: Path, adjust: Callable[[Config], Config],
                 read_stamp: tuple[int, int, int] | None) -> None:
        self._server = server
        self._path = path
        self._last = read_stamp if read_stamp is not None else _stamp(path)
        self._adjust = adjust
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()  # kept, or the loop may drop them
        self.started = asyncio.Event()  # reloads wait until the proxy has started

    def schedule(self) -> None:
        task = asyncio.get_running_loop().create_task(self._reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def watch(self) -> None:
        """A new modification time, size or inode (an editor that writes a new file and
        renames it) means a reload. A file that is gone is not read until it is back. The first
        look is at once: the file may have changed since it was read at start."""
        while True:
            now = _stamp(self._path)
            if now != self._last:
                self._last = now
                if now is not None:
                    log.info("config file %s changed", self._path)
                    self.schedule()
            await asyncio.sleep(WATCH_INTERVAL)

    async def _reload(self) -> None:
        await self.started.wait()
        async with self._lock:
            try:
                cfg = self._adjust(await _read_config(self._path))
                await check_reload(self._server.config(), cfg)
            except ConfigError as e:
                log.error("config reload refused, keeping the running config: %s", e)  # noqa: TRY400
                return
            await self._server.apply_config(cfg)
            log.info("config reloaded from %s", self._path)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


async def _read_config(path: Path) -> Config:
    try:
        data = await asyncio.to_thread(read_small_file, path, CONFIG_FILE_LIMIT)
        return parse_config(data.decode("utf-8"))
    except FileRefusedError as e:
        raise ConfigError("", f"config file {str(path)!r}: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"config file {str(path)!r} is not UTF-8 text") from None


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["playground"]:
        from tiproxy.cli.playground import main as playground_main  # noqa: PLC0415

        return playground_main(args[1:])
    ns = _parser().parse_args(args)
    if ns.config_info is not None:
        try:
            print(config_info(ns.config_info))
        except ConfigInfoError as e:
            print(f"tiproxy: --config-info {e}", file=sys.stderr)
            return 2
        return 0
    try:
        adjust = _overrides(ns)
    except _FlagError as e:
        print(f"tiproxy: {e}", file=sys.stderr)
        return 2
    # Until the event loop handles it (serve), a SIGHUP must not end the process: the file is
    # read after this point anyway.
    signal.signal(signal.SIGHUP, lambda _signum, _frame: None)  # SIG_IGN would pass to children
    try:
        read_stamp = _stamp(ns.config) if ns.config is not None else None  # before reading
        cfg = adjust(load_config(ns.config))
        check_config_files(cfg)  # before the loop runs, so reading them blocks nothing
        _check_virtual_ip(cfg)
    except ConfigError as e:
        print(f"tiproxy: invalid config: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"tiproxy: cannot read config: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log)
    for flag in ("log_level", "log_encoder"):
        if getattr(ns, flag) is not None:
            log.warning("--%s is deprecated and ignored, as in TiProxy: [log] %s sets it", flag,
                        flag.removeprefix("log_"))
    raise_open_files_limit()
    install_event_loop()
    try:
        asyncio.run(serve(cfg, ns.config, adjust, read_stamp))
    except TLSLoadError as e:  # a certificate named in the config does not load
        print(f"tiproxy: invalid config: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        log.error("cannot start: %s", e)  # noqa: TRY400 - the reason is the message
        return 1
    return 0


def _check_virtual_ip(cfg: Config) -> None:
    """`[ha]` names an interface this machine has, and the proxy may add addresses to it and
    send ARP from it; else ConfigError with the key."""
    if cfg.ha.virtual_ip:
        from tiproxy.ha.address import problem  # noqa: PLC0415 - only when configured

        found = problem(cfg.ha.virtual_ip, cfg.ha.interface)
        if found is not None:
            raise ConfigError(*found)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiproxy", description="A MySQL-protocol proxy.")
    parser.add_argument("--config", type=Path, help="TOML config file (TiProxy's keys)")
    parser.add_argument("--advertise-addr", metavar="HOST",
                        help="the address this proxy registers in PD's etcd for clients to use "
                             "(overrides [proxy] advertise-addr)")
    parser.add_argument("--config-info", metavar="FORMAT",
                        help="print every config key with its type, default and whether a "
                             "reload may change it (FORMAT: json), and exit")
    parser.add_argument("--log_level", help="deprecated and ignored, as in TiProxy: use [log]")
    parser.add_argument("--log_encoder", help="deprecated and ignored, as in TiProxy: use [log]")
    parser.add_argument("-v", "--version", action="version", version=f"tiproxy {__version__}")
    return parser


def _overrides(ns: argparse.Namespace) -> Callable[[Config], Config]:
    """What the command line sets over every config read from the file (and its reloads)."""
    advertise: str | None = ns.advertise_addr
    if not advertise:  # an empty flag leaves the file's value, as in TiProxy
        return lambda cfg: cfg
    try:
        check_host(advertise)
    except ValueError as e:
        raise _FlagError(f"--advertise-addr: {e}") from None

    def adjust(cfg: Config) -> Config:
        return dataclasses.replace(
            cfg, proxy=dataclasses.replace(cfg.proxy, advertise_addr=advertise))

    return adjust


class _FlagError(Exception):
    """A command-line flag's value is refused; the message names the flag."""


if __name__ == "__main__":
    sys.exit(main())
