"""Node.js clients through the proxy: mysql2 and MariaDB's own connector (tests/support/node).

Each client runs the same workload (workload.js) twice, directly against a MariaDB server and
through the proxy, and every step's result must be the same. Through the proxy the session is
moved at the points the workload names, between the proxy's two backends, which are two addresses
of that one server (as in test_migration_stress.py): the tables are the same, every move is a real
one. What the workloads exercise that the Python drivers do not: mysql2's statement cache (an id
kept across moves), the mariadb connector's pipelining (commands sent before the first answer,
also right after a move), its batches (COM_STMT_BULK_EXECUTE), streams, COM_CHANGE_USER and
COM_RESET_CONNECTION followed by a move.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from support.backends import BACKEND_ARGS, BACKEND_USERS, MariaDBFactory
from support.proxy import ProxyFactory
from support.scripted import same_through_moves
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

NODE_DIR = Path(__file__).resolve().parent.parent / "support" / "node"


@pytest.fixture(scope="module")
def server(mariadb_factory: MariaDBFactory) -> MariaDBServer:
    return mariadb_factory(BACKEND_ARGS, BACKEND_USERS)


@pytest.mark.parametrize("client", ["mysql2", "mariadb", "mysql"])
def test_a_node_client_gets_through_the_proxy_what_it_gets_directly(
    server: MariaDBServer, proxy_factory: ProxyFactory, client: str,
) -> None:
    node = shutil.which("node")
    assert node is not None, "Node.js is missing (scripts/setup.sh installs it)"
    assert (NODE_DIR / "node_modules" / client).is_dir(), "scripts/setup.sh installs the clients"
    same_through_moves(server, proxy_factory, [node, str(NODE_DIR / "workload.js"), client],
                       NODE_DIR)
