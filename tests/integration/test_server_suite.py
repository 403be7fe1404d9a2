"""MariaDB's own test suite through the proxy while its sessions keep moving.

The server's tests (the `main` suite of Debian's mariadb-test and some of its other suites,
the files that tests/support/server_suite.txt names and says how they were chosen) are run by
the server's own test program, mariadb-test (mysqltest), which compares what every statement
answers with the result file the server's authors recorded, with its statements sent as text
and, again, each prepared and executed (--ps-protocol): once directly against one MariaDB
server, then through the proxy, whose two backends are two addresses of that server, with every
session asked to move every 30 ms. A test that passes directly must pass through the proxy: the
recorded results, not ours, say whether the proxy changed anything a client can see. Between
tests the server is put back as the tests expect it (database `test` empty, no database or user
left behind), over its unix socket as an account of the harness's own.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.backends import MariaDBFactory
from support.proxy import ProxyFactory, ProxyProcess
from tiproxy.playground.install import find_companion
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

SUITE = Path("/usr/share/mysql/mysql-test")
LIST = Path(__file__).resolve().parent.parent / "support" / "server_suite.txt"
TEST_TIMEOUT = 120  # seconds for one test file (they take under one here)
# How mariadb-test sends the statements: as text, or each prepared and executed (the binary
# protocol, and the proxy's prepared statements moving with the session).
PROTOCOLS = {"text": (), "prepared": ("--ps-protocol",)}

# The options of mariadb-test-run's default server configuration that the chosen tests' results
# depend on (include/default_mysqld.cnf).
SERVER_ARGS = ("--character-set-server=latin1", "--collation-server=latin1_swedish_ci",
               "--local-infile", "--log-bin-trust-function-creators=1",
               "--max-heap-table-size=1M", "--sort-buffer-size=256K", "--key-buffer-size=1M",
               "--performance-schema")
HARNESS = ("harness", "harness-pass")  # puts the server back between tests, over the socket
PROXY_ADMIN = ("suite_proxy", "suite-proxy-pass")  # the proxy's auth-sync-user
KEPT_USERS = ("root", HARNESS[0], PROXY_ADMIN[0], "mariadb.sys", "mysql", "PUBLIC", "")
SETUP_SQL = f"""
GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
CREATE DATABASE IF NOT EXISTS mtr;
CREATE TABLE mtr.test_suppressions (pattern VARCHAR(255)) ENGINE=MyISAM;
CREATE PROCEDURE mtr.add_suppression(pattern VARCHAR(255))
  INSERT INTO mtr.test_suppressions VALUES (pattern);
CREATE USER {HARNESS[0]}@localhost IDENTIFIED BY '{HARNESS[1]}';
GRANT ALL ON *.* TO {HARNESS[0]}@localhost WITH GRANT OPTION;
CREATE USER {PROXY_ADMIN[0]}@'%' IDENTIFIED BY '{PROXY_ADMIN[1]}';
GRANT ALL ON *.* TO {PROXY_ADMIN[0]}@'%';
"""
KEPT_DATABASES = ("mysql", "information_schema", "performance_schema", "sys", "mtr")
# What a test may leave changed that the next one relies on (after the databases and users
# a test left behind are dropped).
RESET_SQL = """
CREATE DATABASE test;
CREATE USER IF NOT EXISTS root@localhost;
ALTER USER root@localhost IDENTIFIED VIA unix_socket OR mysql_native_password USING '';
GRANT ALL ON *.* TO root@localhost WITH GRANT OPTION;
CREATE USER IF NOT EXISTS root@'127.0.0.1'; ALTER USER root@'127.0.0.1' IDENTIFIED BY '';
GRANT ALL ON *.* TO root@'127.0.0.1' WITH GRANT OPTION;
SET GLOBAL event_scheduler = OFF; SET GLOBAL sql_mode = DEFAULT;
SET GLOBAL character_set_server = latin1; SET GLOBAL collation_server = latin1_swedish_ci;
SET GLOBAL max_connections = 151;
"""


def chosen_tests() -> list[str]:
    """The list's tests, or those named in TIPROXY_SERVER_SUITE (comma-separated: to look at
    a few again)."""
    named = os.environ.get("TIPROXY_SERVER_SUITE")
    if named:
        return named.split(",")
    return [line.strip() for line in LIST.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def files(test: str) -> tuple[Path, Path]:
    """The test file and the result file of `test`: a name of the `main` suite, or
    `suite/name` of another (suite/<suite>/t/<name>.test and r/<name>.result, or both in the
    suite's own directory)."""
    suite, _, name = test.rpartition("/")
    where = SUITE / "suite" / suite if suite else SUITE / "main"
    if (where / "t").is_dir():
        return where / "t" / f"{name}.test", where / "r" / f"{name}.result"
    return where / f"{name}.test", where / f"{name}.result"


@dataclass
class Suite:
    server: MariaDBServer
    var: Path  # MYSQLTEST_VARDIR: the tests' files, and the server's secure_file_priv

    def sql(self, statements: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(find_companion("mariadb")), "--no-defaults", f"-u{HARNESS[0]}",
             f"-p{HARNESS[1]}", f"--socket={self.server.socket_path}", "--batch",
             "--skip-column-names"],
            input=statements, capture_output=True, text=True, timeout=60, check=False)

    def reset(self) -> None:
        """The server as the next test expects it: any database (`test` too) or user a test
        left behind dropped."""
        found = self.sql(
            "SELECT IF(is_role = 'Y', CONCAT('DROP ROLE ', QUOTE(User)), "
            "CONCAT('DROP USER ', QUOTE(User), '@', QUOTE(Host))) FROM mysql.user "
            "WHERE User NOT IN (" + ", ".join(f"'{u}'" for u in KEPT_USERS) + ") UNION ALL "
            "SELECT CONCAT('DROP DATABASE `', REPLACE(SCHEMA_NAME, '`', '``'), '`') "
            "FROM information_schema.SCHEMATA WHERE SCHEMA_NAME NOT IN ("
            + ", ".join(f"'{d}'" for d in KEPT_DATABASES) + ")")
        assert found.returncode == 0, found.stderr
        drops = "".join(f"{drop};\n" for drop in found.stdout.splitlines())
        done = self.sql(drops + RESET_SQL)
        assert done.returncode == 0, f"the server could not be put back: {done.stderr}"

    def run(self, test: str, port: int, protocol: str) -> tuple[bool, str]:
        """Whether `test` passed against `port`, and what mariadb-test said."""
        self.reset()
        test_file, result_file = files(test)
        try:
            result = subprocess.run(
                [str(find_companion("mariadb-test")), "--host=127.0.0.1", f"--port={port}",
                 "--protocol=tcp", "--user=root", "--database=test", f"--basedir={SUITE}",
                 f"--tmpdir={self.var / 'tmp'}", f"--logdir={self.var / 'log'}",
                 f"--test-file={test_file}", f"--result-file={result_file}",
                 "--silent", "--max-connect-retries=2", *PROTOCOLS[protocol]],
                cwd=SUITE, env=self.env(), capture_output=True, text=True, errors="replace",
                timeout=TEST_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            return False, f"no end within {TEST_TIMEOUT}s"
        return result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    def env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MYSQL_TEST_DIR": str(SUITE),
                "MYSQLTEST_VARDIR": str(self.var), "MYSQL_TMP_DIR": str(self.var / "tmp"),
                "MYSQL_CHARSETSDIR": "/usr/share/mysql/charsets",
                "MYSQL_SHAREDIR": "/usr/share/mysql"}


@pytest.fixture
def suite(mariadb_factory: MariaDBFactory, tmp_path: Path) -> Iterator[Suite]:
    assert (SUITE / "main").is_dir(), "scripts/setup.sh installs mariadb-test"
    var = tmp_path / "var"
    for sub in ("tmp", "log"):
        (var / sub).mkdir(parents=True)
    server = mariadb_factory((*SERVER_ARGS, f"--secure-file-priv={var}"))
    server.sql(SETUP_SQL)
    yield Suite(server, var)


def moving(proxy: ProxyProcess, stop: threading.Event) -> None:
    while not stop.wait(0.03):
        proxy.redirect()


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_the_servers_own_tests_pass_through_moves(suite: Suite, proxy_factory: ProxyFactory,
                                                  protocol: str) -> None:
    tests = chosen_tests()
    direct = {test: suite.run(test, suite.server.port, protocol) for test in set(tests)}
    failed = {test: said for test, (ok, said) in direct.items() if not ok}
    assert len(failed) <= 0.1 * len(direct), f"directly, {len(failed)} failed: {failed}"
    passed = [test for test in tests if direct[test][0]]
    proxy = proxy_factory(
        [suite.server.addr, f"localhost:{suite.server.port}"],
        f'\n[security]\nauth-sync-user = "{PROXY_ADMIN[0]}"\n'
        f'auth-sync-password = "{PROXY_ADMIN[1]}"')
    stop = threading.Event()
    mover = threading.Thread(target=moving, args=(proxy, stop), daemon=True)
    mover.start()
    try:
        through = [(test, *suite.run(test, proxy.port, protocol)) for test in passed]
    finally:
        stop.set()
        mover.join()
    changed = {test: said for test, ok, said in through if not ok}
    assert not changed, "\n\n".join(f"== {test}\n{said}" for test, said in changed.items())
    assert proxy.alive
    moves = proxy.log().count(" moved ")
    assert moves >= len(passed) // 3, moves  # it really moved them, over and over
