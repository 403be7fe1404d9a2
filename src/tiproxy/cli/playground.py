"""`tiproxy playground`: MariaDB servers and the proxy in front of them, ready to connect to.

Starts N servers from the system's mariadbd in a temporary directory, each with database `test`
and one application user, then runs the proxy on them in this process. Ctrl-C stops everything
and removes the directory.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from dataclasses import replace

from tiproxy.cli.logs import setup_logging
from tiproxy.cli.server import install_event_loop, serve
from tiproxy.config import Config
from tiproxy.playground.mariadb import AppUser, LauncherError, MariaDBCluster

DEFAULT_USER = "tiproxy"
DEFAULT_PASSWORD = "tiproxy-playground"  # noqa: S105 - a local playground on loopback


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tiproxy playground",
                                     description="MariaDB servers with the proxy in front.")
    parser.add_argument("--backends", type=int, default=2, help="how many MariaDB servers")
    parser.add_argument("--addr", default="127.0.0.1:6000", help="the proxy's SQL address")
    parser.add_argument("--api-addr", default="127.0.0.1:3080", help="the proxy's API address")
    parser.add_argument("--user", default=DEFAULT_USER)
    parser.add_argument("--password", default=DEFAULT_PASSWORD)
    parser.add_argument("--log-level", default="info")
    ns = parser.parse_args(argv)
    if not 1 <= ns.backends <= 16:
        parser.error("--backends must be between 1 and 16")
    setup_logging(ns.log_level)
    # The proxy's own account (KILL across backends; later, credential sync for migration).
    admin = AppUser("tiproxy_admin", secrets.token_urlsafe(18))
    cluster = MariaDBCluster(
        ns.backends,
        users=[AppUser(ns.user, ns.password), admin],
        extra_args=["--max-allowed-packet=64M", "--local-infile=ON"],
    )
    print(f"starting {ns.backends} MariaDB servers in {cluster.basedir} ...", flush=True)
    try:
        cluster.start_all()
    except LauncherError as e:
        print(f"tiproxy playground: {e}", file=sys.stderr)
        return 1
    try:
        base = Config()
        cfg = replace(
            base,
            proxy=replace(base.proxy, addr=ns.addr, backend_addrs=tuple(cluster.addrs)),
            api=replace(base.api, addr=ns.api_addr),
            security=replace(base.security, auth_sync_user=admin.name,
                             auth_sync_password=admin.password),
        )
        host, _, port = ns.addr.rpartition(":")
        api_host, _, api_port = ns.api_addr.rpartition(":")
        print(
            f"\nbackends: {', '.join(cluster.addrs)}\n"
            f"connect:  mariadb -h{host} -P{port} -u{ns.user} -p{ns.password} test\n"
            f"api:      curl http://{api_host}:{api_port}/api/admin/backends\n"
            f"metrics:  curl http://{api_host}:{api_port}/metrics\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        install_event_loop()
        asyncio.run(serve(cfg))
    except KeyboardInterrupt:
        pass
    except OSError as e:
        print(f"tiproxy playground: cannot start the proxy: {e}", file=sys.stderr)
        return 1
    finally:
        cluster.stop_all()
        print("playground stopped; its directory is removed", flush=True)
    return 0
