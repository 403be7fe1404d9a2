"""PHP, Go, Java and MariaDB Connector/Python through the proxy: protocol implementations of
their own.

PHP's mysqlnd (tests/support/php/workload.php), through mysqli (plain and over the compressed
protocol) and PDO: long data sent in pieces with a move asked for in between, an unbuffered
result, COM_CHANGE_USER, native and emulated prepares, persistent connections. Go's
go-sql-driver/mysql under database/sql (tests/support/go/workload.go): its prepared statements
kept by the pool across moves or its own interpolation into text, session variables set from the
DSN at connect, LOAD DATA LOCAL, a deadline that ends a query. MariaDB Connector/Python
(tests/support/mariadb_py/workload.py), on Connector/C: prepared cursors that send their types once,
executemany() as COM_STMT_BULK_EXECUTE, its own reset and change_user. MariaDB Connector/J
(tests/support/java/Workload.java): its cached server-side statements or its client-side ones,
batches sent without waiting for each answer (also into a move), a streamed result. Each
workload runs directly
and then through the proxy while it moves (support/scripted.py), and every step must match.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.backends import BACKEND_ARGS, BACKEND_USERS, MariaDBFactory
from support.proxy import ProxyFactory
from support.scripted import same_through_moves
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

SUPPORT = Path(__file__).resolve().parent.parent / "support"
CONNECTOR_J = Path("/usr/share/java/mariadb-java-client.jar")  # Debian's libmariadb-java
# Debian's packaged driver (golang-github-go-sql-driver-mysql-dev), built in GOPATH mode: the
# module proxy is not reachable from every machine the tests run on.
GOPATH = "/usr/share/gocode"


@pytest.fixture(scope="module")
def server(mariadb_factory: MariaDBFactory) -> MariaDBServer:
    return mariadb_factory(BACKEND_ARGS, BACKEND_USERS)


@pytest.fixture(scope="module")
def go_workload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = shutil.which("go")
    assert go is not None, "Go is missing (scripts/setup.sh installs golang-go)"
    assert Path(GOPATH, "src/github.com/go-sql-driver/mysql").is_dir(), \
        "scripts/setup.sh installs golang-github-go-sql-driver-mysql-dev"
    binary = tmp_path_factory.mktemp("go") / "workload"
    env = {**os.environ, "GOPATH": GOPATH, "GO111MODULE": "off", "GOFLAGS": "",
           "GOCACHE": os.environ.get("GOCACHE", str(Path.home() / ".cache" / "go-build"))}
    subprocess.run([go, "build", "-o", str(binary), "workload.go"], cwd=SUPPORT / "go", env=env,
                   check=True, timeout=600)
    return binary


@pytest.fixture(scope="module")
def java_workload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    javac = shutil.which("javac")
    assert javac is not None, "the JDK is missing (scripts/setup.sh installs it)"
    classes = tmp_path_factory.mktemp("java")
    subprocess.run([javac, "-cp", str(CONNECTOR_J), "-d", str(classes),
                    str(SUPPORT / "java" / "Workload.java")], check=True, timeout=300)
    return classes


@pytest.mark.parametrize("api", ["mysqli", "mysqli_compressed", "pdo"])
def test_a_php_client_gets_through_the_proxy_what_it_gets_directly(
    server: MariaDBServer, proxy_factory: ProxyFactory, api: str,
) -> None:
    php = shutil.which("php")
    assert php is not None, "PHP is missing (scripts/setup.sh installs php-cli and php-mysql)"
    same_through_moves(server, proxy_factory, [php, str(SUPPORT / "php" / "workload.php"), api],
                       SUPPORT / "php")


@pytest.mark.parametrize("mode", ["binary", "interpolate"])
def test_a_go_client_gets_through_the_proxy_what_it_gets_directly(
    server: MariaDBServer, proxy_factory: ProxyFactory, go_workload: Path, mode: str,
) -> None:
    same_through_moves(server, proxy_factory, [str(go_workload), mode], go_workload.parent)


def test_mariadb_connector_python_gets_through_the_proxy_what_it_gets_directly(
    server: MariaDBServer, proxy_factory: ProxyFactory,
) -> None:
    same_through_moves(server, proxy_factory,
                       [sys.executable, str(SUPPORT / "mariadb_py" / "workload.py")],
                       SUPPORT / "mariadb_py")


@pytest.mark.parametrize("prepares", ["server", "text"])
def test_connector_j_gets_through_the_proxy_what_it_gets_directly(
    server: MariaDBServer, proxy_factory: ProxyFactory, java_workload: Path, prepares: str,
) -> None:
    same_through_moves(server, proxy_factory,
                       ["java", "-cp", f"{CONNECTOR_J}:{java_workload}", "Workload", prepares],
                       java_workload)
