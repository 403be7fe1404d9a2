"""Fixtures that start real MariaDB servers (tiproxy.playground.mariadb) for integration tests.

Servers start only when a test asks for them, so unit tests run without MariaDB installed. An
integration test on a machine without MariaDB fails with the reason rather than being skipped:
CI installs it (scripts/setup.sh), and a silent skip would hide a broken setup.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from support.backends import ADMIN, APP, BACKEND_ARGS, BACKEND_USERS, MariaDBFactory, connect
from support.galera_runs import restore
from support.proxy import ProxyFactory, ProxyProcess
from support.workload import DATABASE
from tiproxy.playground.etcd import EtcdLauncherError, EtcdServer, find_etcd
from tiproxy.playground.galera import GaleraCluster
from tiproxy.playground.install import LauncherError, find_mariadbd
from tiproxy.playground.mariadb import AppUser, MariaDBServer, create_app_user


@pytest.fixture(scope="session")
def mariadb_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDBFactory]:
    """Start servers on demand; every one is stopped at the end of the session."""
    try:
        find_mariadbd()
    except LauncherError as exc:
        pytest.fail(f"integration tests need MariaDB: {exc}", pytrace=False)
    started: list[MariaDBServer] = []

    def start(extra_args: Sequence[str] = (), users: Sequence[AppUser] = ()) -> MariaDBServer:
        server = MariaDBServer(tmp_path_factory.mktemp("mariadb"), extra_args=list(extra_args))
        started.append(server)
        server.start()
        for user in users:
            create_app_user(server, user.name, user.password, user.plugin, user.database)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def backends(mariadb_factory: MariaDBFactory) -> list[MariaDBServer]:
    """Two servers shared by the whole session, with database `test` and users APP and EDU.

    Tests must leave them running and unpaused; a test that stops, kills or pauses a server
    starts its own with mariadb_factory.
    """
    return [mariadb_factory(BACKEND_ARGS, BACKEND_USERS) for _ in range(2)]


@pytest.fixture(scope="session")
def proxy(backends: list[MariaDBServer], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """One proxy in front of the shared `backends`, shared by the tests that leave it as it is."""
    p = ProxyProcess(tmp_path_factory.mktemp("proxy"), [b.addr for b in backends]).start()
    yield p
    p.stop()


@pytest.fixture
def proxy_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyFactory]:
    """Start a proxy of a test's own; stopped when the test ends, pass or fail."""
    started: list[ProxyProcess] = []

    def start(backend_addrs: Sequence[str], extra_toml: str = "", **options: Any) -> ProxyProcess:
        p = ProxyProcess(tmp_path_factory.mktemp("proxy"), backend_addrs, extra_toml, **options)
        started.append(p)
        return p.start()

    yield start
    for p in started:
        p.stop()


@pytest.fixture(scope="session")
def galera_cluster() -> Iterator[GaleraCluster]:
    """A 3-node Galera cluster shared by the whole session, with database `test`, APP and ADMIN.

    Tests may stop and restart single nodes but must leave all three running, Synced and
    unpaused. The cluster makes its own base directory: pytest's is private to root, and as
    root the SST's rsync daemon runs as nobody (see tiproxy.playground.galera).
    """
    try:
        find_mariadbd()
        cluster = GaleraCluster(3, users=(APP, ADMIN))
    except LauncherError as exc:
        pytest.fail(f"Galera tests need MariaDB and galera-4: {exc}", pytrace=False)
    cluster.start_all()
    yield cluster
    cluster.stop_all()


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One etcd member shared by the session, standing in for PD's etcd.

    Tests may stop and restart it but must leave it running; each test registers its TiDBs
    under a prefix of its own so that tests do not see each other's servers.
    """
    try:
        find_etcd()
    except EtcdLauncherError as exc:
        pytest.fail(f"etcd discovery tests need etcd: {exc}", pytrace=False)
    server = EtcdServer(tmp_path_factory.mktemp("etcd")).start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def side_by_side() -> Iterator[dict[str, str]]:
    """The figures of a module's runs (proxy, HAProxy...), printed side by side once it is done."""
    figures: dict[str, str] = {}
    yield figures
    if figures:
        print("\nside by side: " + " | ".join(f"{k} {v}" for k, v in figures.items()))


@pytest.fixture
def workload_cluster(galera_cluster: GaleraCluster) -> Iterator[GaleraCluster]:
    """The session's cluster with the workload's database; whatever node a test leaves
    stopped, pass or fail, is started again (the cluster is shared)."""
    restore(galera_cluster)
    galera_cluster.nodes[0].sql(f"CREATE DATABASE IF NOT EXISTS {DATABASE}")
    for node in galera_cluster.nodes:  # Galera replicates it; wait until every node has it
        with connect(node, autocommit=True,
                     init_command="SET SESSION wsrep_sync_wait = 1") as conn, conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM information_schema.SCHEMATA "
                        "WHERE SCHEMA_NAME = %s", (DATABASE,))
            assert cur.fetchone() == (1,)
    yield galera_cluster
    restore(galera_cluster)
