"""`tiproxy playground`: a MariaDB Galera cluster with the proxy in front, ready to connect to.

Why Galera by default: the product's main feature is a session that moves to another backend and
keeps its state, and a demo shows that only if every backend holds the same data. So the
playground starts a 3-node Galera cluster (tiproxy.playground.galera; `--nodes N` for another
size): a row written before a move is there after it. `--plain N` starts N independent servers
instead (tiproxy.playground.mariadb): sessions still move and keep their variables, but each
server has tables of its own.

Every backend gets database `test`, the application user and the proxy's own account, the
auth-sync-user that reads the password hashes a moved session needs to log in again without its
password (create_app_user grants both ALL PRIVILEGES). Everything lives in a temporary directory;
the proxy runs in this process, and the banner ends with a migration demo to paste. Ctrl-C or
SIGTERM stops everything and removes the directory.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Protocol

from tiproxy.cli.server import serve
from tiproxy.config import Config
from tiproxy.logs import setup_logging
from tiproxy.net.loop import install_event_loop
from tiproxy.playground.galera import GaleraCluster
from tiproxy.playground.install import LauncherError
from tiproxy.playground.mariadb import AppUser, MariaDBCluster

DEFAULT_USER = "tiproxy"
DEFAULT_PASSWORD = "tiproxy-playground"  # noqa: S105 - a local playground on loopback
ADMIN_USER = "tiproxy_admin"
DEFAULT_NODES = 3
MAX_NODES = 9  # each node is a mariadbd with its own buffer pool and Galera threads
MAX_PLAIN = 16
# Today's server options: rows past one 16 MiB packet, and LOAD DATA LOCAL, work in the playground.
SERVER_ARGS = ("--max-allowed-packet=64M", "--local-infile=ON")
NO_GALERA_HINT = ("Run scripts/setup.sh (it installs galera-4 and rsync), or use --plain 2 for "
                  "independent servers without Galera.")


class Backends(Protocol):
    """What the playground needs of MariaDBCluster and GaleraCluster alike."""

    basedir: Path

    @property
    def addrs(self) -> list[str]: ...
    def start_all(self) -> None: ...
    def stop_all(self) -> None: ...


@dataclass(frozen=True)
class Playground:
    """The backends to start and what the banner says about them."""

    backends: Backends
    description: str  # "a 3-node MariaDB Galera cluster"
    shared_data: bool  # every backend sees the same tables


def main(argv: list[str] | None = None) -> int:
    ns = _parse(argv)
    setup_logging(ns.log_level)
    # SIGTERM stops the playground like Ctrl-C (the servers are stopped, the directory removed)
    # while the backends start; serve() handles both signals itself once the proxy runs.
    signal.signal(signal.SIGTERM, _interrupt)
    admin = AppUser(ADMIN_USER, secrets.token_urlsafe(18))
    try:
        playground = _playground(ns, (AppUser(ns.user, ns.password), admin))
    except LauncherError as e:
        print(f"tiproxy playground: no Galera: {e}\n{NO_GALERA_HINT}", file=sys.stderr)
        return 1
    print(f"starting {playground.description} in {playground.backends.basedir} ...", flush=True)
    started = time.monotonic()
    try:
        playground.backends.start_all()
    except LauncherError as e:
        hint = "\n(--plain N starts independent servers, without Galera)" \
            if playground.shared_data else ""
        print(f"tiproxy playground: {e}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("playground stopped before it was up; its directory is removed", flush=True)
        return 130
    return _run_proxy(ns, playground, admin, time.monotonic() - started)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _parser()
    ns = parser.parse_args(argv)
    if ns.plain is not None and not 1 <= ns.plain <= MAX_PLAIN:
        parser.error(f"--plain must be between 1 and {MAX_PLAIN}")
    if ns.nodes is None:  # no default in add_argument: argparse could not tell it from --plain
        ns.nodes = DEFAULT_NODES
    if not 1 <= ns.nodes <= MAX_NODES:
        parser.error(f"--nodes must be between 1 and {MAX_NODES}")
    return ns


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiproxy playground",
        description="A MariaDB Galera cluster (or independent MariaDB servers) with the proxy "
                    "in front, and a migration demo to paste.",
    )
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--nodes", type=int, metavar="N",
                      help=f"how many Galera nodes (default {DEFAULT_NODES})")
    kind.add_argument("--plain", "--backends", type=int, metavar="N", dest="plain",
                      help="start N independent MariaDB servers instead of a Galera cluster: "
                           "sessions move between them but see other tables "
                           "(--backends is the old name)")
    parser.add_argument("--addr", default="127.0.0.1:6000", help="the proxy's SQL address")
    parser.add_argument("--api-addr", default="127.0.0.1:3080", help="the proxy's API address")
    parser.add_argument("--user", default=DEFAULT_USER)
    parser.add_argument("--password", default=DEFAULT_PASSWORD)
    parser.add_argument("--log-level", default="info")
    return parser


def _playground(ns: argparse.Namespace, users: tuple[AppUser, ...]) -> Playground:
    """The backends the arguments ask for; LauncherError if Galera is asked for but missing."""
    if ns.plain is not None:
        cluster = MariaDBCluster(ns.plain, users=users, extra_args=SERVER_ARGS)
        servers = "1 MariaDB server" if ns.plain == 1 else f"{ns.plain} independent MariaDB servers"
        return Playground(cluster, servers, shared_data=False)
    nodes: int = ns.nodes
    if nodes > 1 and shutil.which("rsync") is None:  # a joiner gets its copy of the data by rsync
        raise LauncherError("rsync not found on PATH (Galera's state transfer needs it)")
    galera = GaleraCluster(nodes, users=users, extra_args=SERVER_ARGS)
    return Playground(galera, f"a {nodes}-node MariaDB Galera cluster", shared_data=True)


def _run_proxy(ns: argparse.Namespace, playground: Playground, admin: AppUser,
               startup_seconds: float) -> int:
    """Serve until SIGINT/SIGTERM, then stop the backends and remove their directory."""
    backends = playground.backends
    try:
        print(_banner(ns, playground, startup_seconds), flush=True)
        install_event_loop()
        asyncio.run(serve(_proxy_config(ns, backends.addrs, admin)))
    except KeyboardInterrupt:
        pass
    except OSError as e:
        print(f"tiproxy playground: cannot start the proxy: {e}", file=sys.stderr)
        return 1
    finally:
        backends.stop_all()
        print("playground stopped; its directory is removed", flush=True)
    return 0


def _proxy_config(ns: argparse.Namespace, addrs: list[str], admin: AppUser) -> Config:
    base = Config()
    return replace(
        base,
        proxy=replace(base.proxy, addr=ns.addr, backend_addrs=tuple(addrs)),
        api=replace(base.api, addr=ns.api_addr),
        security=replace(base.security, auth_sync_user=admin.name,
                         auth_sync_password=admin.password),
    )


def _banner(ns: argparse.Namespace, playground: Playground, startup_seconds: float) -> str:
    host, _, port = ns.addr.rpartition(":")
    api = "http://{}:{}".format(*ns.api_addr.rpartition(":")[::2])
    addrs = playground.backends.addrs
    lines = [
        "",
        f"backends: {', '.join(addrs)} ({playground.description}, "
        f"up in {startup_seconds:.1f} s)",
        f"connect:  mariadb -h{host} -P{port} -u{ns.user} -p{ns.password} test",
        f"status:   {api}/ (the status page, in a browser on this host)",
        f"api:      curl {api}/api/admin/backends",
        f"metrics:  curl {api}/metrics",
        "",
        *(_demo(ns.api_addr, playground.shared_data) if len(addrs) > 1
          else ["(one backend: a session has nowhere to move; the demo needs two)", ""]),
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


def _demo(api_addr: str, shared_data: bool) -> list[str]:
    """A migration to paste: state made before the move, the redirect, the state after it."""
    before = ["SET @greeting = 'kept';", "SELECT @@port;"]
    after = "SELECT @@port, @greeting;"
    shown = "another port, the same variable"
    if shared_data:
        before[:0] = [
            "CREATE TABLE IF NOT EXISTS demo (id INT PRIMARY KEY, note TEXT);",
            "REPLACE INTO demo VALUES (1, 'written before the move');",
        ]
        after = "SELECT @@port, @greeting, note FROM demo;"
        shown += ", the same row"
    lines = [
        "try a migration: in the mariadb client, run",
        *(f"    {statement}" for statement in before),
        "then in another shell move every session to another backend:",
        f"    {_ctl_command()} --addr {api_addr} redirect",
        f"and in the client again ({shown}):",
        f"    {after}",
    ]
    if not shared_data:
        lines.append("(independent servers share no tables: without --plain, the data moves too)")
    return [*lines, ""]


def _ctl_command() -> str:
    """How to run tiproxyctl from here: the one beside this Python (relative if under the cwd)."""
    ctl = Path(sys.executable).parent / "tiproxyctl"
    if not ctl.is_file():
        return "tiproxyctl"
    try:
        relative = ctl.relative_to(Path.cwd())
    except ValueError:
        return str(ctl)
    return str(relative) if relative.parent != Path() else f"./{relative}"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
