"""The accounts and settings of the test MariaDB servers, and a PyMySQL login to them."""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from typing import Any, Protocol

import pymysql

from tiproxy.playground.mariadb import AppUser, MariaDBServer

APP = AppUser("app", "app-pass")  # mysql_native_password
# The proxy's own account ([security] auth-sync-user): credential sync, health checks, KILL.
ADMIN = AppUser("tiproxy_admin", "admin-pass")
ADMIN_TOML = (f'\n[security]\nauth-sync-user = "{ADMIN.name}"\n'
              f'auth-sync-password = "{ADMIN.password}"')
EDU = AppUser("edu", "ed-pass", plugin="ed25519")
BACKEND_USERS = (APP, EDU, ADMIN)
# 64M so rows larger than one 16 MiB protocol packet go through; LOAD DATA LOCAL for its tests.
# TIPROXY_TEST_SERVER_ARGS adds server options, to run the suite against another configuration
# (e.g. "--autocommit=0 --sql-mode=ORACLE").
BACKEND_ARGS = ("--max-allowed-packet=64M", "--local-infile=ON",
                *shlex.split(os.environ.get("TIPROXY_TEST_SERVER_ARGS", "")))


class MariaDBFactory(Protocol):
    """The callable the `mariadb_factory` fixture returns: start one more server."""

    def __call__(
        self, extra_args: Sequence[str] = (), users: Sequence[AppUser] = ()
    ) -> MariaDBServer: ...


def connect(
    server: MariaDBServer, user: AppUser = APP, **kwargs: Any
) -> pymysql.connections.Connection[Any]:
    """Log in to the server directly over TCP (no proxy) as user."""
    kwargs.setdefault("database", user.database)
    kwargs.setdefault("connect_timeout", 5)
    return pymysql.connect(
        host="127.0.0.1", port=server.port, user=user.name, password=user.password, **kwargs
    )
